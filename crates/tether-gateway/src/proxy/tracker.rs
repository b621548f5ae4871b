//! One request's record, from head to the last byte or the abort, and the access-log line it
//! becomes. Dropping an unfinished tracker is how an abort is noticed when hyper drops the
//! handler or the response body: the drop cancels the request context and logs the abort.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether::{CancelReason, RequestContext};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cancel::ConnCancel;
use crate::error::{ProxyError, Stage};
use crate::observe::Observer;
use crate::observe::access::{Outcome, RequestRecord};
use crate::observe::metrics::RouteMetrics;
use crate::proxy::request_body::UploadProgress;
use crate::upstream::pool::closed_at;

/// How the upstream side was torn down, to measure propagation.
#[derive(Debug)]
pub enum Teardown {
    /// Nothing upstream in flight.
    None,
    /// An HTTP/1 connection: propagation ends when its task closed the socket.
    H1(watch::Receiver<Option<Instant>>),
    /// An HTTP/2 stream: propagation ends when its handles were dropped (RST_STREAM queued).
    /// Holds the stream's place on its connection until the exchange ends.
    H2(crate::upstream::pool::StreamPlace),
    /// The upstream's part ended, at this instant, before the request did (its body read ahead
    /// to the end): nothing upstream to cancel, so no propagation.
    Finished(Instant),
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct Tracker {
    /// The record being filled in. Boxed: the tracker moves several times per request (into the
    /// handler, into the response body), and the record is most of its size.
    pub rec: Box<RequestRecord>,
    start: Instant,
    /// The request's context.
    pub ctx: RequestContext,
    conn: Arc<ConnCancel>,
    observer: Observer,
    /// Where the request is now; an abort is attributed to it.
    pub stage: Stage,
    /// Upload progress, shared with the upstream request body.
    pub upload: Arc<UploadProgress>,
    /// When upstream work began (first connect or send).
    pub upstream_started: Option<Instant>,
    /// How to observe upstream teardown.
    pub teardown: Teardown,
    /// The request has a body (an abort before it was fully received is an upload abort).
    pub expects_body: bool,
    /// When the last attempt's request was handed to the upstream connection.
    pub sent_at: Option<Instant>,
    /// When the response head arrived.
    pub head_at: Option<Instant>,
    /// The request's place in its route's in-flight limit, released with the tracker.
    pub admission: Option<crate::admission::Permit>,
    /// The request counted in its endpoint's load (`least_requests` upstreams), released with
    /// the tracker.
    pub endpoint_load: Option<crate::upstream::balance::InFlight>,
    /// Its route's metric handles, once routed.
    pub route_metrics: Option<Arc<RouteMetrics>>,
    /// The request is gRPC: tether's own answers to it are gRPC statuses.
    pub grpc: Option<crate::grpc::Flavor>,
    /// Which outcomes get an access-log line (its route's setting, once routed).
    pub access_log: crate::config::AccessLogMode,
    done: bool,
}

impl Tracker {
    /// The gateway's metrics.
    pub fn metrics(&self) -> &crate::observe::metrics::Metrics {
        &self.observer.metrics
    }

    /// Starts tracking a request.
    pub fn new(
        rec: RequestRecord,
        ctx: RequestContext,
        conn: Arc<ConnCancel>,
        observer: Observer,
    ) -> Tracker {
        observer.metrics.request_started();
        crate::listen::note_request();
        Tracker {
            rec: Box::new(rec),
            start: Instant::now(),
            ctx,
            conn,
            observer,
            stage: Stage::RequestHead,
            upload: Arc::default(),
            upstream_started: None,
            teardown: Teardown::None,
            expects_body: false,
            sent_at: None,
            head_at: None,
            admission: None,
            endpoint_load: None,
            route_metrics: None,
            grpc: None,
            access_log: crate::config::AccessLogMode::All,
            done: false,
        }
    }

    /// When the request head arrived.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// The response was delivered in full.
    pub fn finish_ok(mut self) {
        self.rec.outcome = Outcome::Ok;
        self.close(None);
    }

    /// The request was refused at `stage` with an answer of `status` that is not tether's own
    /// (its auth service's).
    pub fn finish_refused(mut self, stage: Stage, status: u16) {
        self.rec.status = status;
        self.rec.stage = Some(stage.as_str());
        self.rec.outcome = Outcome::Rejected;
        self.close(None);
    }

    /// The request failed with `err`, answered with `status` (or cut mid-body).
    pub fn finish_error(mut self, err: &ProxyError, status: Option<u16>) {
        if let Some(s) = status {
            self.rec.status = s;
        }
        self.rec.stage = Some(err.stage.as_str());
        self.rec.outcome = match (err.kind, err.stage) {
            (crate::error::ErrorKind::Timeout, _) => Outcome::Timeout,
            (_, Stage::Route | Stage::Admission | Stage::RequestHead) => Outcome::Rejected,
            _ => Outcome::UpstreamError,
        };
        if err.side == crate::error::Side::Upstream
            && let Some(u) = &self.rec.upstream
        {
            self.observer.metrics.upstream_error(u, err);
        }
        tracing::debug!(request_id = %self.rec.request_id, stage = %err.stage, side = %err.side, error = %err, "request failed");
        self.close(None);
    }

    /// Nothing crossed for the route's idle timeout (`err` says where): the request's context
    /// is cancelled as past its deadline, and the request ends failed.
    pub fn finish_idle(self, err: &ProxyError) {
        self.ctx.cancel(CancelReason::Deadline);
        self.finish_error(err, None);
    }

    /// The request was cancelled with `reason` (or hyper dropped it: the reason is inferred).
    pub fn finish_cancelled(mut self, reason: CancelReason) {
        self.ctx.cancel(reason);
        self.abort();
    }

    fn abort(&mut self) {
        let cause = match self.ctx.cause() {
            Some(c) => c,
            None => {
                self.ctx.cancel(self.conn.fallback_reason());
                match self.ctx.cause() {
                    Some(c) => c,
                    None => return self.close(None),
                }
            }
        };
        let reason = cause.reason;
        self.rec.abort_reason = Some(reason);
        let stage = if self.stage != Stage::Body
            && !self.upload.complete.load(Ordering::Relaxed)
            && self.expects_body
        {
            Stage::RequestBody
        } else {
            self.stage
        };
        self.rec.stage = Some(stage.as_str());
        if reason.is_client_gone() {
            self.rec.status = 499;
            self.rec.outcome = Outcome::ClientAbort;
        } else {
            if self.rec.status == 0 {
                self.rec.status = 504;
            }
            self.rec.outcome = Outcome::Timeout;
        }
        self.close(Some(cause.at));
    }

    fn close(&mut self, cancelled_at: Option<Instant>) {
        if self.done {
            return;
        }
        self.done = true;
        self.conn.end_h1_request();
        let now = Instant::now();
        self.rec.duration = now - self.start;
        self.rec.bytes_received = self.upload.bytes.load(Ordering::Relaxed);
        if let Some(s) = self.upstream_started {
            let end = match self.teardown {
                Teardown::Finished(at) => at,
                _ => now,
            };
            self.rec.upstream_time = Some(end.saturating_duration_since(s));
        }
        self.fill_exchange_timings(now);
        let teardown = std::mem::replace(&mut self.teardown, Teardown::None);
        match (cancelled_at, teardown) {
            (Some(at), Teardown::H1(rx)) => match tokio::runtime::Handle::try_current() {
                // The socket closes a moment later, in the connection's task: wait for it off the
                // request path (bounded) and log then.
                Ok(h) => {
                    let mut rec = self.rec.clone();
                    let observer = self.observer.clone();
                    let log = self.logs();
                    let route = self.route_metrics.take();
                    h.spawn(async move {
                        if let Some(closed) = closed_at(rx, Duration::from_secs(2)).await {
                            rec.propagation = Some(closed.saturating_duration_since(at));
                        }
                        observer.finished(&rec, route.as_deref(), log);
                    });
                }
                Err(_) => self.report(),
            },
            (Some(at), Teardown::H2(_) | Teardown::None) if self.upstream_started.is_some() => {
                self.rec.propagation = Some(now.saturating_duration_since(at));
                self.report();
            }
            _ => self.report(),
        }
    }
}

impl Tracker {
    /// Whether the request gets an access-log line.
    fn logs(&self) -> bool {
        self.access_log.logs(
            self.rec.status,
            self.rec.outcome == Outcome::Ok,
            &self.rec.request_id,
        )
    }

    fn report(&self) {
        self.observer
            .finished(&self.rec, self.route_metrics.as_deref(), self.logs());
    }

    /// Splits the last attempt's exchange into send, first byte and body, ending the stage the
    /// request was in at `now`.
    fn fill_exchange_timings(&mut self, now: Instant) {
        let Some(sent) = self.sent_at else { return };
        let head = self.head_at.unwrap_or(now);
        let sent_end = if self.expects_body {
            // A body read whole before the send ends with the send.
            self.upload
                .completed_at
                .get()
                .map(|&c| c.max(sent))
                .filter(|&c| c <= head)
        } else {
            Some(sent)
        };
        let t = &mut self.rec.timings;
        match sent_end {
            Some(end) => {
                t.send = Some(end.saturating_duration_since(sent));
                t.first_byte = Some(head.saturating_duration_since(end));
            }
            // Still uploading when the answer came (or the request ended): it was all sending.
            None if self.head_at.is_none() => t.send = Some(head.saturating_duration_since(sent)),
            None => t.first_byte = Some(head.saturating_duration_since(sent)),
        }
        if let Some(h) = self.head_at {
            t.body = Some(now.saturating_duration_since(h));
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}
