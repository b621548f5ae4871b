//! Percentiles, the console table and the markdown results file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Options;
use crate::downstream::{self, Failure, Phase};
use crate::upstream::{self, Seen};

/// The target the results are checked against.
pub const TARGET_P99: Duration = Duration::from_millis(1);

/// Everything measured for one downstream × upstream pair.
#[derive(Debug)]
pub struct PairResult {
    /// Where the request was when the client gave up.
    pub phase: Phase,
    /// Client side.
    pub down: downstream::Kind,
    /// Origin side.
    pub up: upstream::Kind,
    /// Latencies of the measured (non-warm-up) iterations that were observed upstream.
    pub latencies: Vec<Duration>,
    /// What the upstream saw, over all iterations (warm-up included).
    pub seen: BTreeMap<Seen, u64>,
    /// Iterations without a measurement, over all iterations (warm-up included).
    pub failures: BTreeMap<Failure, u64>,
    /// Upstream jobs that ran to completion, over all iterations (warm-up included).
    pub completed: u64,
    /// TCP connections the upstream accepted.
    pub upstream_conns: u64,
    /// Connections the client opened to the gateway.
    pub downstream_conns: u64,
}

impl PairResult {
    /// Iterations where something other than the expected abort happened.
    pub fn problems(&self) -> u64 {
        let unexpected: u64 = self
            .seen
            .iter()
            .filter(|(s, _)| !s.is_expected())
            .map(|(_, n)| n)
            .sum();
        let failures: u64 = self.failures.values().sum();
        // Completions also show up in `seen`; count the upstream's own counter if it is larger.
        unexpected.max(self.completed) + failures
    }

    /// Nearest-rank percentile of the measured latencies.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        sorted.get(rank.clamp(1, n) - 1).copied()
    }

    fn seen_summary(&self) -> String {
        let parts: Vec<String> = self.seen.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(", ")
        }
    }

    fn failure_summary(&self) -> String {
        let parts: Vec<String> = self
            .failures
            .iter()
            .map(|(f, n)| format!("{f} ×{n}"))
            .collect();
        if parts.is_empty() {
            "0".to_string()
        } else {
            parts.join(", ")
        }
    }
}

fn us(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}", d.as_secs_f64() * 1e6),
        None => "-".to_string(),
    }
}

/// The console table.
pub fn table(results: &[PairResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<10} {:<8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6}  upstream saw / failures",
        "phase",
        "downstream",
        "upstream",
        "n",
        "p50 µs",
        "p95 µs",
        "p99 µs",
        "max µs",
        "completed",
        "problems",
        "up-cx",
        "dn-cx"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<10} {:<10} {:<8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6}  {}; failures: {}",
            r.phase.label(),
            r.down.label(),
            r.up.label(),
            r.latencies.len(),
            us(r.percentile(50.0)),
            us(r.percentile(95.0)),
            us(r.percentile(99.0)),
            us(r.percentile(100.0)),
            r.completed,
            r.problems(),
            r.upstream_conns,
            r.downstream_conns,
            r.seen_summary(),
            r.failure_summary(),
        );
    }
    out
}

/// Facts about the machine for the results file.
#[derive(Debug)]
pub struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    load_before: String,
    load_after: String,
}

impl Machine {
    /// Reads `/proc`; unknown fields stay "unknown". Call before the run; see [`Self::finish`].
    pub fn detect() -> Machine {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        Machine {
            cores,
            cpu,
            kernel,
            load_before: load_average(),
            load_after: String::new(),
        }
    }

    /// Whether the load average exceeded the core count before or after the run.
    fn busy(&self) -> bool {
        let cores = self.cores as f64;
        [&self.load_before, &self.load_after]
            .iter()
            .any(|l| l.parse::<f64>().is_ok_and(|l| l > cores))
    }

    /// Notes the load average once the run is over.
    pub fn finish(&mut self) {
        self.load_after = load_average();
    }
}

/// The 1-minute load average: other work on the machine shows in p99 and max.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Today's date (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    civil(days)
}

/// Days since 1970-01-01 to `YYYY-MM-DD`.
fn civil(days: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The markdown results file.
pub fn markdown(results: &[PairResult], opts: &Options, machine: &Machine) -> String {
    let profile = if cfg!(debug_assertions) {
        "debug (not representative)"
    } else {
        "release (workspace profile: lto = \"fat\", codegen-units = 1, panic = \"abort\")"
    };
    let mut out = String::new();
    let _ = writeln!(out, "# Cancellation propagation latency\n");
    let _ = writeln!(
        out,
        "Generated by `bench/propagation.sh` (see [README.md](README.md) for the method).\n"
    );
    let _ = writeln!(out, "- Date: {} (UTC)", today());
    let _ = writeln!(
        out,
        "- Machine: {} cores, {}, Linux {}",
        machine.cores, machine.cpu, machine.kernel
    );
    let _ = writeln!(
        out,
        "- Load average (1 min) before / after the run: {} / {}",
        machine.load_before, machine.load_after
    );
    let _ = writeln!(out, "- Build: {profile}");
    let _ = writeln!(
        out,
        "- Gateway: in-process, {} worker thread(s); clients and upstreams on one separate \
         current-thread runtime; everything on 127.0.0.1",
        opts.workers
    );
    let _ = writeln!(
        out,
        "- Iterations per pair: {} measured after {} warm-up; each bounded by {} ms; the upstream \
         job lasts {} ms unless cancelled",
        opts.iterations,
        opts.warmup,
        opts.bound.as_millis(),
        opts.job.as_millis()
    );
    let _ = writeln!(
        out,
        "- Latency: the instant the upstream observed the abort (h1: `read()` returned EOF or an \
         error; h2: `poll_reset` yielded) minus the instant the client aborted (h1: socket \
         dropped; h2: `send_reset(CANCEL)`), in microseconds"
    );
    let _ = writeln!(
        out,
        "- Phase: `first byte`, the client gives up while the upstream works on `/slow/<id>` \
         before answering; `body`, while it streams `/stream/<id>` (head and first chunk \
         received by the client, the rest held back until the job ends)\n"
    );

    let all_ok = results.iter().all(|r| r.problems() == 0);
    let all_fast = results
        .iter()
        .all(|r| r.percentile(99.0).is_some_and(|p| p < TARGET_P99));
    let _ = writeln!(
        out,
        "Target p99 < {} µs on loopback: **{}**. Upstream jobs completed despite the abort: \
         **{}**. Iterations with a problem: **{}**.\n",
        TARGET_P99.as_micros(),
        if all_fast { "met" } else { "NOT met" },
        results.iter().map(|r| r.completed).sum::<u64>(),
        results.iter().map(PairResult::problems).sum::<u64>(),
    );
    if machine.busy() {
        let _ = writeln!(
            out,
            "The machine was busy during the run (load average above its {} cores): outliers of a \
             few milliseconds in p99 and max are then likely scheduling delays of the gateway or \
             bench threads, not protocol behaviour. Rerun on a quiet machine before comparing.\n",
            machine.cores
        );
    }
    if !all_ok {
        let _ = writeln!(
            out,
            "**Some pairs did not propagate the cancellation as expected; see the columns \
             \"upstream saw\" and \"failures\".**\n"
        );
    }

    let _ = writeln!(
        out,
        "| phase | downstream | upstream | p50 µs | p95 µs | p99 µs | max µs | completed anyway | \
         upstream conns accepted | downstream conns | upstream saw | failures |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.phase.label(),
            r.down.label(),
            r.up.label(),
            us(r.percentile(50.0)),
            us(r.percentile(95.0)),
            us(r.percentile(99.0)),
            us(r.percentile(100.0)),
            r.completed,
            r.upstream_conns,
            r.downstream_conns,
            r.seen_summary(),
            r.failure_summary(),
        );
    }
    let _ = writeln!(
        out,
        "\nPercentiles cover the measured iterations; the counts (completed, connections, \
         upstream saw, failures) cover warm-up and measured iterations together. An h1 upstream \
         connection is closed by every abort, so it accepts one connection per iteration; an h2 \
         upstream connection should stay open, one per gateway worker. An h2 client keeps its \
         connection across iterations, so every stream reset also shows that the other streams \
         and the connection survive; past about 200 resets in quick succession (the listener's \
         default `h2_reset_burst`) tether takes them for a reset flood and sends GOAWAY, and \
         the client reconnects once (2 downstream connections)."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(latencies_us: &[u64]) -> PairResult {
        PairResult {
            phase: Phase::FirstByte,
            down: downstream::Kind::H2c,
            up: upstream::Kind::H1,
            latencies: latencies_us
                .iter()
                .map(|&u| Duration::from_micros(u))
                .collect(),
            seen: BTreeMap::new(),
            failures: BTreeMap::new(),
            completed: 0,
            upstream_conns: 0,
            downstream_conns: 0,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let r = result(&(1..=100).rev().collect::<Vec<_>>());
        assert_eq!(r.percentile(50.0), Some(Duration::from_micros(50)));
        assert_eq!(r.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(r.percentile(100.0), Some(Duration::from_micros(100)));
        assert_eq!(result(&[7]).percentile(1.0), Some(Duration::from_micros(7)));
        assert_eq!(result(&[]).percentile(50.0), None);
    }

    #[test]
    fn completions_and_wrong_reasons_are_problems() {
        let mut r = result(&[10]);
        r.seen.insert(Seen::Reset(h2::Reason::CANCEL.into()), 3);
        r.seen.insert(Seen::Eof, 2);
        assert_eq!(r.problems(), 0);
        r.seen
            .insert(Seen::Reset(h2::Reason::INTERNAL_ERROR.into()), 1);
        r.seen.insert(Seen::Completed, 2);
        r.completed = 2;
        r.failures.insert(Failure::NotObserved, 1);
        assert_eq!(r.problems(), 4);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), "1970-01-01");
        assert_eq!(civil(11_016), "2000-02-29");
        assert_eq!(civil(20_454), "2026-01-01");
    }
}
