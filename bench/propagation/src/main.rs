//! Cancellation propagation latency through the tether gateway.
//!
//! Run with: `bench/propagation.sh [--quick]` (or `cargo run --release -p tether-bench --bin
//! propagation -- --help`).
//!
//! For every pair downstream {h1 FIN, h1 RST, h2c, h2+TLS} × upstream {h1, h2c, h2+TLS}, and
//! each phase the client gives up in (waiting for the first byte, reading a response that has
//! started), a fresh upstream and a fresh in-process gateway are started. Each iteration sends
//! `GET /slow/<id>` (or `/stream/<id>`), waits until the upstream has the request (and the client
//! the first chunk), aborts on the client side and measures the time until the upstream
//! observes the abort. One process, one monotonic clock for both ends.

mod downstream;
mod report;
mod tls;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_gateway::config::{
    Config, ListenerConfig, Protocols, RouteConfig, UpstreamConfig, UpstreamProtocol,
};
use tether_gateway::observe::access::NoAccessLog;
use tether_gateway::{Gateway, RunningGateway};
use tokio::sync::mpsc;

use crate::downstream::{Events, Failure, H2Client, Phase, Sample};
use crate::report::{Machine, PairResult};
use crate::tls::Material;

/// Errors that end the run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
usage: propagation [--quick] [--iterations N] [--warmup N] [--workers N] [--bound-ms N]
                   [--job-ms N] [--output PATH | --no-output]

  --quick          50 iterations per pair, 10 warm-up (default: 200 and 20)
  --iterations N   measured iterations per pair
  --warmup N       warm-up iterations per pair (not in the percentiles)
  --workers N      gateway worker threads (default 1)
  --bound-ms N     longest an iteration may take before it counts as a failure (default 2000)
  --job-ms N       how long an upstream job runs if nobody cancels it (default 1000)
  --output PATH    results file (default bench/RESULTS-propagation.md)
  --no-output      print the table only";

/// Run settings.
#[derive(Debug, Clone)]
pub struct Options {
    iterations: usize,
    warmup: usize,
    workers: usize,
    bound: Duration,
    job: Duration,
    output: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            iterations: 200,
            warmup: 20,
            workers: 1,
            bound: Duration::from_millis(2000),
            job: Duration::from_millis(1000),
            output: Some("bench/RESULTS-propagation.md".to_string()),
        }
    }
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut o = Options::default();
        let mut args = args.peekable();
        fn num(flag: &str, v: Option<String>) -> Result<u64, String> {
            v.ok_or_else(|| format!("{flag} needs a value"))?
                .parse()
                .map_err(|_| format!("{flag} needs a non-negative integer"))
        }
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => {
                    o.iterations = 50;
                    o.warmup = 10;
                }
                "--iterations" => o.iterations = num(&a, args.next())? as usize,
                "--warmup" => o.warmup = num(&a, args.next())? as usize,
                "--workers" => o.workers = num(&a, args.next())? as usize,
                "--bound-ms" => o.bound = Duration::from_millis(num(&a, args.next())?),
                "--job-ms" => o.job = Duration::from_millis(num(&a, args.next())?),
                "--output" => o.output = Some(args.next().ok_or("--output needs a value")?),
                "--no-output" => o.output = None,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if o.iterations == 0 || o.workers == 0 {
            return Err("--iterations and --workers must be at least 1".to_string());
        }
        if o.job >= o.bound {
            return Err("--job-ms must be below --bound-ms, or completions go unseen".to_string());
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("propagation: {msg}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    // Clients and upstreams share one thread; the gateway runs on its own worker threads.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("propagation: cannot build runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut machine = Machine::detect();
    match rt.block_on(run(&opts)) {
        Ok(results) => {
            machine.finish();
            print!("{}", report::table(&results));
            if let Some(path) = &opts.output {
                let md = report::markdown(&results, &opts, &machine);
                if let Err(e) = std::fs::write(path, md) {
                    eprintln!("propagation: cannot write {path}: {e}");
                    return ExitCode::FAILURE;
                }
                println!("results written to {path}");
            }
            if results.iter().any(|r| r.problems() > 0) {
                eprintln!("propagation: some pairs did not propagate the cancellation cleanly");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("propagation: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: &Options) -> Result<Vec<PairResult>, BoxError> {
    let material = Material::generate()?;
    let mut results = Vec::new();
    for phase in Phase::ALL {
        for down in downstream::Kind::ALL {
            for up in upstream::Kind::ALL {
                let r = run_pair(phase, down, up, opts, &material).await?;
                eprintln!(
                    "{} {} -> {}: {} samples, p99 {:?}, {} problem(s)",
                    phase.label(),
                    down.label(),
                    up.label(),
                    r.latencies.len(),
                    r.percentile(99.0),
                    r.problems()
                );
                results.push(r);
            }
        }
    }
    Ok(results)
}

fn gateway_config(
    down: downstream::Kind,
    up: upstream::Kind,
    upstream_addr: SocketAddr,
    material: &Material,
    workers: usize,
) -> Config {
    let (protocols, tls) = match down {
        downstream::Kind::H1Fin | downstream::Kind::H1Rst => (
            Protocols {
                http1: true,
                h2: false,
            },
            None,
        ),
        downstream::Kind::H2c => (
            Protocols {
                http1: false,
                h2: true,
            },
            None,
        ),
        downstream::Kind::H2Tls => (
            Protocols {
                http1: false,
                h2: true,
            },
            Some(material.listener()),
        ),
    };
    let (protocol, upstream_tls) = match up {
        upstream::Kind::H1 => (UpstreamProtocol::Http1, None),
        upstream::Kind::H2c => (UpstreamProtocol::H2c, None),
        upstream::Kind::H2Tls => (UpstreamProtocol::H2, Some(material.upstream())),
    };
    let mut upstream = UpstreamConfig::new("origin", vec![upstream_addr.into()], protocol);
    upstream.tls = upstream_tls;
    let mut listener = ListenerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        vec![RouteConfig::new("/", "origin")],
    );
    listener.protocols = protocols;
    listener.tls = tls.map(Into::into);
    let mut config = Config::new(vec![listener], vec![upstream]);
    config.workers = NonZeroUsize::new(workers);
    config
}

async fn run_pair(
    phase: Phase,
    down: downstream::Kind,
    up: upstream::Kind,
    opts: &Options,
    material: &Material,
) -> Result<PairResult, BoxError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = match up {
        upstream::Kind::H2Tls => Some(material.acceptor()?),
        _ => None,
    };
    let origin = upstream::start(up, acceptor, opts.job, tx).await?;
    let config = gateway_config(down, up, origin.addr, material, opts.workers);
    let gateway = Gateway::start(config, Arc::new(NoAccessLog))?;
    let gateway_addr = *gateway
        .listener_addrs()
        .first()
        .ok_or("the gateway reported no listener address")?;

    let mut events = Events(rx);
    let connector = match down {
        downstream::Kind::H2Tls => Some(material.connector()?),
        _ => None,
    };
    let mut h2: Option<H2Client> = None;
    let mut result = PairResult {
        phase,
        down,
        up,
        latencies: Vec::with_capacity(opts.iterations),
        seen: BTreeMap::new(),
        failures: BTreeMap::new(),
        completed: 0,
        upstream_conns: 0,
        downstream_conns: 0,
    };

    for i in 0..opts.warmup + opts.iterations {
        let id = i as u64;
        let deadline = tokio::time::Instant::now() + opts.bound;
        let outcome: Result<Sample, Failure> = match down {
            downstream::Kind::H1Fin | downstream::Kind::H1Rst => {
                result.downstream_conns += 1;
                let rst = down == downstream::Kind::H1Rst;
                downstream::h1_iteration(gateway_addr, id, rst, phase, &mut events, deadline).await
            }
            downstream::Kind::H2c | downstream::Kind::H2Tls => {
                if h2.as_ref().is_none_or(H2Client::is_closed) {
                    result.downstream_conns += 1;
                    h2 = H2Client::connect(gateway_addr, connector.as_ref())
                        .await
                        .ok();
                }
                match h2.as_mut() {
                    Some(client) => client.iteration(id, phase, &mut events, deadline).await,
                    None => Err(Failure::Client("cannot connect over h2".to_string())),
                }
            }
        };
        match outcome {
            Ok(sample) => {
                if i >= opts.warmup && sample.seen != upstream::Seen::Completed {
                    result.latencies.push(sample.latency);
                }
                *result.seen.entry(sample.seen).or_default() += 1;
            }
            Err(failure) => {
                *result.failures.entry(failure).or_default() += 1;
                // A failed iteration may leave its job running: let it end before the next one,
                // so its late events and completion are attributed to this pair.
                tokio::time::sleep(opts.job + Duration::from_millis(50)).await;
            }
        }
    }

    drop(h2);
    result.completed = origin.counters.completed.load(Ordering::Relaxed);
    result.upstream_conns = origin.counters.accepted.load(Ordering::Relaxed);
    stop(gateway).await;
    drop(origin);
    Ok(result)
}

/// Shuts the gateway down without blocking this runtime (the upstreams must keep running).
async fn stop(gateway: RunningGateway) {
    let _ = tokio::task::spawn_blocking(move || gateway.shutdown(Duration::ZERO)).await;
}
