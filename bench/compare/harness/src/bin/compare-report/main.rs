//! Turns a run's results (`results.jsonl`, `meta.json`) into `bench/RESULTS.md` and the PNG chart.
//!
//! Run with `compare-report --results R/results.jsonl --meta R/meta.json --md bench/RESULTS.md
//! --png bench/results.png` (run.sh does).

mod chart;
mod markdown;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use compare_harness::results::{Table, load};
use serde::Deserialize;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    results: PathBuf,
    #[arg(long)]
    meta: PathBuf,
    #[arg(long)]
    md: PathBuf,
    #[arg(long)]
    png: PathBuf,
    /// The PNG's path as RESULTS.md should link it.
    #[arg(long, default_value = "results.png")]
    png_link: String,
    /// TrueType font for the chart's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

/// What run.sh knows about the run besides the figures.
#[derive(Debug, Default, Deserialize)]
pub struct Meta {
    date: String,
    mode: String,
    rounds: u32,
    /// Rounds of the CPU-at-fixed-load scenario (older runs: as many as `rounds`).
    #[serde(default)]
    cpu_rounds: Option<u32>,
    nproc: String,
    cpu: String,
    kernel: String,
    memory: String,
    /// (name, version) in display order.
    versions: Vec<(String, String)>,
    /// Settings that apply to every proxy.
    settings: Vec<String>,
    /// Proxies or cases left out, and why.
    #[serde(default)]
    skipped: Vec<String>,
    /// (title, file) of profile outputs to include.
    #[serde(default)]
    profiles: Vec<(String, PathBuf)>,
    /// Load average at the start and end, as a sentence.
    #[serde(default)]
    load: String,
    /// Seconds the measurements took (installs and build not included).
    #[serde(default)]
    elapsed_s: u64,
    /// Seconds spent installing tools and building before the measurements.
    #[serde(default)]
    setup_s: u64,
}

/// Proxies in display order.
/// `nginx-same` is nginx configured to do per request what tether does by default (run.sh says
/// how); the targets are judged against plain `nginx`.
pub const PROXIES: [&str; 6] = [
    "direct",
    "tether",
    "nginx",
    "nginx-same",
    "haproxy",
    "caddy",
];

fn main() -> ExitCode {
    let args = Args::parse();
    let rows = match load(&args.results) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("compare-report: {}: {e}", args.results.display());
            return ExitCode::FAILURE;
        }
    };
    let meta: Meta = match std::fs::read_to_string(&args.meta)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("compare-report: {}: {e}", args.meta.display());
            return ExitCode::FAILURE;
        }
    };
    let table = Table::new(&rows);
    let chart_ok = match chart::draw(&table, &args.png, &args.font) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("compare-report: chart not drawn: {e}");
            false
        }
    };
    let md = markdown::render(&table, &meta, chart_ok.then_some(args.png_link.as_str()));
    if let Err(e) = std::fs::write(&args.md, md) {
        eprintln!("compare-report: {}: {e}", args.md.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
