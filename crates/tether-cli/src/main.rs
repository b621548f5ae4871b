//! The `tether` binary: `serve` runs the gateway from a config file (or, without one, in front of an
//! in-process demo upstream); `check-config` validates a config file; `trace` follows one request
//! stage by stage.

mod access_pretty;
mod demo;
mod serve;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_cli::{duration, file_config};

/// jemalloc: fewer instructions per allocation than glibc's malloc (a proxied request makes a
/// few dozen). Memory freed after a burst of connections goes back to the system when a worker
/// goes quiet ([`return_idle_memory`]), so memory follows the connections open now, not the most
/// ever open. Measured in bench/RESULTS.md, bench/idle-memory.sh and bench/sparse.sh.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Run by a worker that has gone quiet (see `listen::on_worker_idle`): returns the thread's
/// cached free blocks to its arena, then gives the arena's unused pages back to the system at
/// once. Only then: jemalloc's own decay (`.cargo/config.toml`) is slow, so that a worker busy
/// with a trickle of requests, whose memory is freed and needed again every few hundred
/// milliseconds (a keep-alive connection parking and coming back), does not hand pages back only
/// to fault them in again.
#[cfg(feature = "jemalloc")]
fn return_idle_memory() {
    use std::ffi::c_void;
    use std::ptr::null_mut;
    // SAFETY: `thread.tcache.flush` reads and writes no value (null pointers, zero length) and
    // the name is a NUL-terminated literal.
    #[allow(unsafe_code)]
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            null_mut(),
            null_mut(),
            null_mut(),
            0,
        )
    };
    let mut arena: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: `thread.arena` is an `unsigned` (u32 here): jemalloc writes at most `len` bytes to
    // `arena` and sets `len`; nothing is written to it (null new value, zero length).
    #[allow(unsafe_code)]
    let read = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.arena".as_ptr(),
            (&raw mut arena).cast::<c_void>(),
            &mut len,
            null_mut(),
            0,
        )
    };
    if read != 0 || len != std::mem::size_of::<u32>() {
        return;
    }
    let Ok(name) = std::ffi::CString::new(format!("arena.{arena}.purge")) else {
        return;
    };
    // SAFETY: `arena.<i>.purge` reads and writes no value, and `name` is NUL-terminated.
    #[allow(unsafe_code)]
    let _ =
        unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), null_mut(), null_mut(), null_mut(), 0) };
}

/// Exit status for an unusable config file (BSD `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// tether: a reverse proxy that stops upstream work the moment a client gives up.
#[derive(Debug, Parser)]
#[command(name = "tether", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config, runs an embedded demo: a listener on 127.0.0.1:8080 in
    /// front of an in-process demo upstream with slow, streaming and failing endpoints.
    Serve(serve::ServeArgs),
    /// Validate a config file: prints `ok`, or `FILE:LINE: KEY: message` and exits with 64.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Follow one request stage by stage (dns, connect, tls, send, first byte, body) and show
    /// where time goes or where it fails. Exit codes: 0 ok, 10 dns, 11 connect, 12 tls, 13 send,
    /// 14 first byte, 15 body, 64 bad arguments.
    Trace(trace::TraceArgs),
}

fn main() -> ExitCode {
    #[cfg(feature = "jemalloc")]
    tether_gateway::listen::on_worker_idle(return_idle_memory);
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match file_config::load(&file) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve(args) => serve::run(args),
        Command::Trace(args) => trace::run(args),
    }
}
