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
/// few dozen), and its background thread gives freed pages back to the system a second after a
/// burst (`.cargo/config.toml` sets the decay), so memory follows the connections open now,
/// not the most ever open. Measured in bench/RESULTS.md and bench/idle-memory.sh.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Returns the calling thread's cached free blocks to jemalloc's arenas, from where the
/// background thread can give their pages back. A worker that has gone idle allocates nothing,
/// so its cache would otherwise keep what the last burst freed.
#[cfg(feature = "jemalloc")]
fn flush_thread_cache() {
    // SAFETY: `thread.tcache.flush` reads and writes no value (null pointers, zero length) and
    // the name is a NUL-terminated literal.
    #[allow(unsafe_code)]
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
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
    tether_gateway::listen::on_worker_idle(flush_thread_cache);
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
