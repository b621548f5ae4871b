//! The results file that `run.sh` appends to (one JSON object a line) and its aggregation over
//! rounds.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::stats::median;

/// One measurement: a scenario, a proxy, a case (protocol pair), a round, and its figures.
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    /// `throughput`, `stream`, `cancel`, `waste`, `idle` or `cpu`.
    pub scenario: String,
    /// `direct`, `tether`, `nginx`, `haproxy` or `caddy`.
    pub proxy: String,
    /// The protocol pair or client protocol (`h1`, `h2`, `h1-h1`, `h2-h1`, `h2-h2`).
    pub case: String,
    /// Round number, from 1.
    #[serde(default)]
    pub round: u32,
    /// The figures (names depend on the scenario).
    pub m: serde_json::Map<String, Value>,
}

/// Reads every line of `path` that parses; the others are reported on stderr and skipped.
pub fn load(path: &Path) -> std::io::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Row>(line) {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("{}:{}: skipped: {e}", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// Rows grouped by (scenario, case, proxy); each figure is the median over rounds.
#[derive(Debug, Default)]
pub struct Table {
    cells: BTreeMap<(String, String, String), BTreeMap<String, Vec<f64>>>,
}

impl Table {
    /// Groups `rows`.
    pub fn new(rows: &[Row]) -> Self {
        let mut t = Table::default();
        for r in rows {
            let cell = t
                .cells
                .entry((r.scenario.clone(), r.case.clone(), r.proxy.clone()))
                .or_default();
            for (k, v) in &r.m {
                if let Some(x) = v.as_f64() {
                    cell.entry(k.clone()).or_default().push(x);
                }
            }
        }
        t
    }

    /// The median of `metric` for the cell, if measured.
    pub fn get(&self, scenario: &str, case: &str, proxy: &str, metric: &str) -> Option<f64> {
        let cell = self
            .cells
            .get(&(scenario.into(), case.into(), proxy.into()))?;
        median(cell.get(metric)?)
    }

    /// All values (one per round) of `metric` for the cell.
    pub fn rounds(&self, scenario: &str, case: &str, proxy: &str, metric: &str) -> Vec<f64> {
        self.cells
            .get(&(scenario.into(), case.into(), proxy.into()))
            .and_then(|c| c.get(metric))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether anything was measured for the cell.
    pub fn has(&self, scenario: &str, case: &str, proxy: &str) -> bool {
        self.cells
            .contains_key(&(scenario.into(), case.into(), proxy.into()))
    }

    /// The cases measured in `scenario`, in `order` first, then any others.
    pub fn cases(&self, scenario: &str, order: &[&str]) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for (s, c, _) in self.cells.keys() {
            if s == scenario && !seen.contains(c) {
                seen.push(c.clone());
            }
        }
        let mut out: Vec<String> = order
            .iter()
            .filter(|o| seen.iter().any(|s| s == *o))
            .map(|s| (*s).to_owned())
            .collect();
        out.extend(seen.into_iter().filter(|s| !order.contains(&s.as_str())));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_over_rounds() {
        let rows: Vec<Row> = [
            r#"{"scenario":"throughput","proxy":"nginx","case":"h1","round":1,"m":{"rps":100.0}}"#,
            r#"{"scenario":"throughput","proxy":"nginx","case":"h1","round":2,"m":{"rps":300.0}}"#,
            r#"{"scenario":"throughput","proxy":"tether","case":"h2","round":1,"m":{"rps":5,"p99_ms":null}}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let t = Table::new(&rows);
        assert_eq!(t.get("throughput", "h1", "nginx", "rps"), Some(200.0));
        assert_eq!(t.get("throughput", "h2", "tether", "p99_ms"), None);
        assert_eq!(t.cases("throughput", &["h2", "h1"]), vec!["h2", "h1"]);
        assert!(t.has("throughput", "h2", "tether"));
    }
}
