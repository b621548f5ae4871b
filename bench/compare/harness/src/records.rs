//! What the backend remembers about each `/work` request, keyed by the client's request id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How a `/work` request ended, as the backend saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still working.
    Running,
    /// The work ran its full time and the response was handed to the server.
    Completed,
    /// The handler was dropped first: the proxy closed the connection or reset the stream.
    Cancelled,
}

/// One `/work` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkRecord {
    /// CLOCK_MONOTONIC ns when the handler started.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns when it completed or observed cancellation.
    pub end_ns: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
}

/// The body of the backend's `/records`: request id → record.
pub type Records = HashMap<String, WorkRecord>;
