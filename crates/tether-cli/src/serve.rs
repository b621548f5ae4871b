//! `tether serve`: load the config (or build the embedded demo one), start the gateway, print
//! where it listens, and run until SIGINT or SIGTERM. SIGHUP reloads the `--config` file and
//! reopens the `--access-log` file; SIGUSR1 only reopens it (after log rotation).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tether_gateway::config::{
    Config, ListenerConfig, Protocols, RouteConfig, UpstreamConfig, UpstreamProtocol,
};
use tether_gateway::observe::access::{
    AccessLog, DEFAULT_BUFFER_BYTES, JsonLines, LineSink, NoAccessLog,
};
use tether_gateway::{Gateway, RunningGateway, StartError};
use tracing_subscriber::EnvFilter;

use crate::EXIT_CONFIG;
use crate::access_pretty::Pretty;
use crate::demo::Demo;
use crate::file_config::{self, DEFAULT_SHUTDOWN_GRACE};

/// Listener address of the embedded default.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Options of `tether serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML config file; without it, the embedded demo setup runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Access log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Append the access log to FILE instead of writing it to stdout. SIGUSR1 (and SIGHUP)
    /// reopens FILE after log rotation renamed it.
    #[arg(long, value_name = "FILE")]
    access_log: Option<PathBuf>,
    /// Access-log bytes gathered before a write; lines are also written whenever a worker runs
    /// out of work, so a quiet proxy logs at once. 0 writes every line as it comes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BUFFER_BYTES)]
    access_log_buffer: usize,
    /// Listener address of the embedded demo setup (default 127.0.0.1:8080; port 0 picks one).
    #[arg(long, value_name = "ADDR", conflicts_with = "config", hide = true)]
    listen: Option<SocketAddr>,
}

/// Access log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One JSON object per line.
    Json,
    /// One human-readable line per request.
    Pretty,
    /// No access log (metrics still count every request).
    Off,
}

/// Runs `serve` to completion and returns the process exit status.
pub fn run(args: ServeArgs) -> ExitCode {
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tether-main")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let sink = match &args.access_log {
        None => LineSink::stdout(),
        Some(path) => match LineSink::append(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("--access-log {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let sink = sink.with_buffer_bytes(args.access_log_buffer);
    let log: Arc<dyn AccessLog> = match args.log_format {
        LogFormat::Json => Arc::new(JsonLines::new(sink)),
        LogFormat::Pretty => Arc::new(Pretty::new(sink)),
        LogFormat::Off => Arc::new(NoAccessLog),
    };

    // With a file: its config. Without: the demo upstream first, then a config pointing at it.
    let (config, mut grace, demo, source) = match &args.config {
        Some(path) => match file_config::load(path) {
            Ok(l) => (l.config, l.shutdown_grace, None, Some((path, l.source))),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => {
            let demo = match rt.block_on(Demo::start(SocketAddr::from(([127, 0, 0, 1], 0)))) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the demo upstream");
                    return ExitCode::FAILURE;
                }
            };
            let listen = args.listen.unwrap_or(DEFAULT_LISTEN);
            eprintln!("demo upstream on http://{} (http1, h2c)", demo.addr());
            (
                demo_config(listen, demo.addr()),
                DEFAULT_SHUTDOWN_GRACE,
                Some(demo),
                None,
            )
        }
    };

    let described: Vec<(bool, Protocols)> = config
        .listeners
        .iter()
        .map(|l| (l.tls.is_some(), l.protocols))
        .collect();
    // Before the listening lines: a SIGHUP sent once they are printed must not kill the process.
    let hangups = {
        let _rt = rt.enter();
        control_signals()
    };
    let flush_log = log.clone();
    let running = match Gateway::start(config, log) {
        Ok(r) => r,
        Err(e) => return start_failed(e, source.as_ref().map(|(p, s)| (p.as_path(), s.as_str()))),
    };
    for (addr, (tls, p)) in running.listener_addrs().iter().zip(&described) {
        eprintln!("{}", listening_line(*addr, *tls, *p));
    }
    if let Some(addr) = running.admin_addr() {
        eprintln!("admin on http://{addr} (/metrics, /healthz, /readyz)");
    }
    if let (Some(_), Some(addr)) = (&demo, running.listener_addrs().first()) {
        eprintln!("try: curl -m 1 'http://{addr}/work?ms=5000'   (endpoints: curl http://{addr}/)");
    }

    let signal = rt.block_on(serve_signals(
        &running,
        hangups,
        args.config.as_deref(),
        &mut grace,
        &*flush_log,
    ));
    tracing::info!(signal, grace_ms = grace.as_millis() as u64, "shutting down");
    // A second signal during the drain ends the process at once.
    let on_exit = flush_log.clone();
    rt.spawn(async move {
        shutdown_signal().await;
        eprintln!("second signal: exiting now");
        on_exit.flush();
        std::process::exit(130);
    });
    running.shutdown(grace);
    flush_log.flush();
    if let Some(d) = demo {
        rt.block_on(d.stop());
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    ExitCode::SUCCESS
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The embedded default: every path on `listen` goes to the demo upstream over HTTP/1.1.
fn demo_config(listen: SocketAddr, demo: SocketAddr) -> Config {
    Config::new(
        vec![ListenerConfig::new(
            listen,
            vec![RouteConfig::new("/", "demo")],
        )],
        vec![UpstreamConfig::new(
            "demo",
            vec![demo.into()],
            UpstreamProtocol::Http1,
        )],
    )
}

/// `listening on http://127.0.0.1:8080 (http1, h2c)`; tests read the port from it.
fn listening_line(addr: SocketAddr, tls: bool, p: Protocols) -> String {
    let mut names = Vec::new();
    if p.http1 {
        names.push("http1");
    }
    if p.h2 {
        names.push(if tls { "h2" } else { "h2c" });
    }
    let scheme = if tls { "https" } else { "http" };
    format!("listening on {scheme}://{addr} ({})", names.join(", "))
}

/// Reports a start failure. Errors that name a config key are reported like `check-config`
/// (with the line, exit 64); the rest (a port in use) exit with 1.
fn start_failed(e: StartError, file: Option<(&std::path::Path, &str)>) -> ExitCode {
    match (keyed(&e), file) {
        (Some((key, message)), Some((path, src))) => {
            eprintln!("{}", file_config::locate(path, src, key, message));
            ExitCode::from(EXIT_CONFIG)
        }
        _ => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    }
}

/// The config key and message of an error that names one.
fn keyed(e: &StartError) -> Option<(String, String)> {
    match e {
        StartError::Config(c) => Some((c.key.clone(), c.message.clone())),
        StartError::ListenerTls { index, source } => {
            Some((format!("listeners[{index}].tls"), source.to_string()))
        }
        StartError::UpstreamTls { index, source } => {
            Some((format!("upstreams[{index}].tls"), source.to_string()))
        }
        _ => None,
    }
}

/// The signals that steer a running gateway: SIGHUP (reload and reopen the access log) and
/// SIGUSR1 (reopen the access log).
#[derive(Default)]
struct Controls {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    reopen: Option<tokio::signal::unix::Signal>,
}

/// Subscribes to SIGHUP and SIGUSR1; needs a runtime context.
fn control_signals() -> Controls {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let subscribe = |kind: SignalKind, name: &str, what: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}; {what} is off");
                None
            }
        };
        Controls {
            hangup: subscribe(SignalKind::hangup(), "SIGHUP", "reloading"),
            reopen: subscribe(
                SignalKind::user_defined1(),
                "SIGUSR1",
                "reopening the access log",
            ),
        }
    }
    #[cfg(not(unix))]
    Controls::default()
}

/// Waits for the next signal of `s`; never, if there is none.
#[cfg(unix)]
async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(sig) = s
        && sig.recv().await.is_some()
    {
        return;
    }
    std::future::pending().await
}

/// Reloads on every SIGHUP and reopens the access log on SIGUSR1 (and SIGHUP) until SIGINT or
/// SIGTERM, and names the signal that stopped it.
async fn serve_signals(
    running: &RunningGateway,
    controls: Controls,
    config: Option<&Path>,
    grace: &mut Duration,
    log: &dyn AccessLog,
) -> &'static str {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    #[cfg(unix)]
    {
        let Controls {
            mut hangup,
            mut reopen,
        } = controls;
        loop {
            tokio::select! {
                s = &mut stop => return s,
                () = next(&mut hangup) => {
                    reload(running, config, grace);
                    reopen_log(log);
                }
                () = next(&mut reopen) => reopen_log(log),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (controls, running, config, &grace, log);
        stop.await
    }
}

/// Opens the access log file again; on error the old one stays in use.
fn reopen_log(log: &dyn AccessLog) {
    match log.reopen() {
        Ok(true) => tracing::info!("access log reopened"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot reopen the access log; writing to the old file")
        }
    }
}

/// Re-reads the config file and switches to it; on any error the running config stays.
fn reload(running: &RunningGateway, path: Option<&Path>, grace: &mut Duration) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP ignored: no --config file to reload");
        return;
    };
    let loaded = match file_config::load(path) {
        Ok(l) => l,
        Err(e) => {
            return tracing::error!(error = %e, "reload failed; the running config stays");
        }
    };
    match running.reload(loaded.config) {
        Ok(()) => {
            *grace = loaded.shutdown_grace;
            tracing::info!(file = %path.display(), "reloaded");
        }
        Err(e) => {
            let error = match keyed(&e) {
                Some((key, message)) => {
                    file_config::locate(path, &loaded.source, key, message).to_string()
                }
                None => e.to_string(),
            };
            tracing::error!(%error, "reload failed; the running config stays");
        }
    }
}

/// Waits for SIGINT or SIGTERM and names it.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                // Ctrl-C in a terminal.
                _ = tokio::signal::ctrl_c() => "SIGINT",
                // Service managers and `kill`.
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops tether");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines() {
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            listening_line(a, false, Protocols::BOTH),
            "listening on http://127.0.0.1:8080 (http1, h2c)"
        );
        assert_eq!(
            listening_line(
                a,
                true,
                Protocols {
                    http1: false,
                    h2: true
                }
            ),
            "listening on https://127.0.0.1:8080 (h2)"
        );
    }

    #[test]
    fn demo_config_is_valid() {
        let c = demo_config(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        );
        c.validate().unwrap();
    }
}
