//! What the gateway tells operators: the per-request record and where it goes, metrics, and the
//! admin endpoints.

pub mod access;
pub mod admin;
pub mod metrics;
pub mod trace_context;

use std::sync::Arc;

use access::{AccessLog, RequestRecord};
use metrics::Metrics;

/// Where a finished request is reported: the access log and the metrics.
#[derive(Debug, Clone)]
pub struct Observer {
    /// Access log sink.
    pub log: Arc<dyn AccessLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Observer {
    /// Reports one finished request.
    pub fn finished(&self, rec: &RequestRecord) {
        self.metrics.request_finished(rec);
        self.log.record(rec);
    }
}
