//! The PNG: one grouped bar panel per figure, cases on the x axis, one colour per proxy.

use std::path::Path;

use compare_harness::results::Table;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::PROXIES;
use crate::markdown::num;

type DrawError = Box<dyn std::error::Error>;

/// A panel: a figure of a scenario over its cases.
struct Panel {
    title: &'static str,
    scenario: &'static str,
    cases: &'static [&'static str],
    metric: &'static str,
    /// Logarithmic y axis, for figures spanning orders of magnitude.
    log: bool,
}

const PANELS: [Panel; 8] = [
    Panel {
        title: "Small responses: req/s (higher is better)",
        scenario: "throughput",
        cases: &["h1", "h2"],
        metric: "rps",
        log: false,
    },
    Panel {
        title: "Small responses: p99 latency ms (lower)",
        scenario: "throughput",
        cases: &["h1", "h2"],
        metric: "p99_ms",
        log: false,
    },
    Panel {
        title: "CPU µs per request at 12.8k req/s (lower)",
        scenario: "cpu",
        cases: &["h1", "h2"],
        metric: "cpu_us_per_req",
        log: false,
    },
    Panel {
        title: "Streaming 256 MiB: MB/s (higher)",
        scenario: "stream",
        cases: &["h1"],
        metric: "mbps",
        log: false,
    },
    Panel {
        title: "Cancellation: p95 abort→upstream ms (log, lower)",
        scenario: "cancel",
        cases: &["h1-h1", "h2-h1", "h2-h2"],
        metric: "p95_ms",
        log: true,
    },
    Panel {
        title: "Aborted jobs that still completed (lower)",
        scenario: "cancel",
        cases: &["h1-h1", "h2-h1", "h2-h2"],
        metric: "completed",
        log: false,
    },
    Panel {
        title: "Wasted upstream work % with 30% aborts (lower)",
        scenario: "waste",
        cases: &["h1-h1", "h2-h1", "h2-h2"],
        metric: "wasted_pct",
        log: false,
    },
    Panel {
        title: "RSS KiB per idle connection (lower)",
        scenario: "idle",
        cases: &["h1"],
        metric: "per_conn_kib",
        log: false,
    },
];

fn colour(proxy: &str) -> RGBColor {
    match proxy {
        "direct" => RGBColor(150, 150, 150),
        "tether" => RGBColor(214, 39, 40),
        "nginx" => RGBColor(44, 160, 44),
        "nginx-same" => RGBColor(152, 223, 138),
        "haproxy" => RGBColor(31, 119, 180),
        _ => RGBColor(255, 127, 14),
    }
}

/// Draws every panel into `png`.
pub fn draw(t: &Table, png: &Path, font: &Path) -> Result<(), DrawError> {
    let bytes = std::fs::read(font).map_err(|e| format!("{}: {e}", font.display()))?;
    // plotters keeps fonts for the whole process; one leak per run.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{}: not a usable font", font.display()))?;

    let root = BitMapBackend::new(png, (1800, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (legend, body) = root.split_vertically(40);
    draw_legend(&legend)?;
    let areas = body.split_evenly((2, 4));
    for (area, panel) in areas.iter().zip(PANELS.iter()) {
        draw_panel(t, area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw_legend(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> DrawResult {
    let mut x = 20;
    area.draw_text(
        "tether vs nginx / HAProxy / Caddy, same machine, same run:",
        &("sans-serif", 18).into_text_style(area),
        (x, 12),
    )?;
    x += 520;
    for p in PROXIES {
        area.draw(&Rectangle::new([(x, 12), (x + 18, 30)], colour(p).filled()))?;
        area.draw_text(p, &("sans-serif", 18).into_text_style(area), (x + 24, 12))?;
        x += 130;
    }
    Ok(())
}

type DrawResult = Result<(), DrawError>;

fn draw_panel(
    t: &Table,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> DrawResult {
    let cases: Vec<&str> = panel
        .cases
        .iter()
        .copied()
        .filter(|c| PROXIES.iter().any(|p| t.has(panel.scenario, c, p)))
        .collect();
    let mut bars: Vec<(usize, usize, f64)> = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        for (pi, proxy) in PROXIES.iter().enumerate() {
            if let Some(v) = t.get(panel.scenario, case, proxy, panel.metric) {
                bars.push((ci, pi, v));
            }
        }
    }
    let max = bars.iter().map(|b| b.2).fold(0.0f64, f64::max);
    let n = cases.len().max(1) as f64;
    let width = 0.8 / PROXIES.len() as f64;
    let x_of = |ci: usize, pi: usize| ci as f64 + 0.1 + pi as f64 * width;
    let label_style = ("sans-serif", 12).into_text_style(area);
    let case_style = ("sans-serif", 15).into_text_style(area);

    if panel.log {
        let lo = 0.01f64;
        let hi = (max * 4.0).max(10.0);
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..n, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(1)
            .x_labels(0)
            .y_label_formatter(&|v| num(*v))
            .draw()?;
        for (ci, pi, v) in &bars {
            let x0 = x_of(*ci, *pi);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, lo), (x0 + width, v.max(lo))],
                colour(PROXIES[*pi]).filled(),
            )))?;
        }
        // After every bar, so that no bar covers a label; every other one higher, so that
        // neighbours' labels, wider than a bar, do not overlap.
        for (ci, pi, v) in &bars {
            let lift = if pi % 2 == 0 { 1.15 } else { 1.6 };
            chart.draw_series(std::iter::once(Text::new(
                num(*v),
                (x_of(*ci, *pi), v.max(lo) * lift),
                label_style.clone(),
            )))?;
        }
        for (ci, case) in cases.iter().enumerate() {
            chart.draw_series(std::iter::once(Text::new(
                (*case).to_owned(),
                (ci as f64 + 0.42, hi),
                case_style.clone(),
            )))?;
        }
    } else {
        let hi = if max > 0.0 { max * 1.22 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..n, 0.0..hi)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(1)
            .x_labels(0)
            .y_label_formatter(&|v| num(*v))
            .draw()?;
        for (ci, pi, v) in &bars {
            let x0 = x_of(*ci, *pi);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + width, *v)],
                colour(PROXIES[*pi]).filled(),
            )))?;
        }
        // As above: labels after the bars, every other one higher.
        for (ci, pi, v) in &bars {
            let lift = if pi % 2 == 0 { 0.03 } else { 0.08 };
            chart.draw_series(std::iter::once(Text::new(
                num(*v),
                (x_of(*ci, *pi), v + hi * lift),
                label_style.clone(),
            )))?;
        }
        for (ci, case) in cases.iter().enumerate() {
            chart.draw_series(std::iter::once(Text::new(
                (*case).to_owned(),
                (ci as f64 + 0.42, hi),
                case_style.clone(),
            )))?;
        }
    }
    if bars.is_empty() {
        area.draw_text(
            "not measured",
            &("sans-serif", 16).into_text_style(area),
            (150, 200),
        )?;
    }
    Ok(())
}
