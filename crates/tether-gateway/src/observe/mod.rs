//! What the gateway tells operators: the per-request record and where it goes, metrics, and the
//! admin endpoints.

pub mod access;
pub mod admin;
pub mod metrics;
pub mod trace_context;

use std::sync::Arc;

use access::{AccessLog, RequestRecord};
use metrics::{Metrics, RouteMetrics};

/// Where a finished request is reported: the access log and the metrics.
#[derive(Debug, Clone)]
pub struct Observer {
    /// Access log sink.
    pub log: Arc<dyn AccessLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Observer {
    /// Reports one finished request; `route` holds its route's metric handles, if it was routed;
    /// `log`: it gets an access-log line (its route's `access_log` says).
    pub fn finished(&self, rec: &RequestRecord, route: Option<&RouteMetrics>, log: bool) {
        self.metrics.request_finished(rec, route);
        if log {
            self.log.record(rec);
        }
    }
}
