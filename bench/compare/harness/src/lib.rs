//! Shared pieces of the side-by-side benchmark (`bench/compare/run.sh`): the clock that the
//! backend and the clients both read, the backend's per-request records, and small statistics.
//!
//! The binaries are `compare-backend` (the upstream, not tether), `compare-client` (abort-capable
//! load clients and output parsers) and `compare-report` (RESULTS.md and the PNG chart).

pub mod clock;
pub mod records;
pub mod results;
pub mod stats;
