//! HTTP/2 downstream: hyper's server. A client RST_STREAM makes hyper drop that stream's handler
//! or response body (the request's tracker turns the drop into `stream_reset`); a lost connection
//! ends the connection future, which cancels every stream on it with `connection_lost` before
//! the streams' own tasks run.

use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::gate::Gate;
use super::probe::{self, Activity, GuardedBody, ProbeSocket};
use crate::admission::CALM_DOWN_GRACE;
use crate::cancel::{ConnCancel, DownstreamProtocol};
use crate::listen::{ConfigSource, ListenerShared, Worker};
use crate::proxy;

/// Serves an HTTP/2 connection. Its settings (limits, dead-peer probing) come from `listener`,
/// the generation it was accepted under; each new stream is routed with `source`'s current one.
pub async fn serve<I>(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    source: ConfigSource,
    io: I,
    peer: Peer,
    probe_socket: Option<ProbeSocket>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = listener.limits;
    let dead_peer = listener.dead_peer;
    let cancel = Arc::new(
        ConnCancel::new(worker.root.child(), DownstreamProtocol::H2, None)
            .with_reset_budget(limits.h2_reset_budget),
    );
    let conn = peer.conn(cancel.clone());
    let activity = Activity::new();
    let probe_activity = activity.clone();
    let born = tokio::time::Instant::now();
    // Cancelled by the connection's last stream (`max_requests_per_connection`): GOAWAY. (Its
    // age has a timer below.)
    let retire = CancellationToken::new();
    let by_count = limits.lifetime().by_count();
    let svc = {
        let accepted = (worker.clone(), listener.clone());
        let retire = retire.clone();
        service_fn(move |req| {
            let guard = activity.begin();
            if by_count.spent(activity.started(), born) {
                retire.cancel();
            }
            // A reload since the connection opened applies to this stream; the stream keeps what
            // it starts with.
            let (worker, listener) = source.current().unwrap_or_else(|| accepted.clone());
            let handled = proxy::handle(worker, listener, conn.clone(), req);
            async move {
                // hyper polls a new stream's handler before checking whether the client already
                // reset it (HEADERS and RST_STREAM in one read: the rapid-reset pattern). Yield
                // once so that check comes first: a stream reset on arrival is dropped before it
                // takes a pooled connection or starts a connect.
                tokio::task::yield_now().await;
                let resp = handled.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| GuardedBody::new(b, guard)))
            }
        })
    };
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid reset (CVE-2023-44487): streams reset before they were accepted, and streams
        // refused or reset for client errors, are bounded; beyond, GOAWAY(ENHANCE_YOUR_CALM).
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_resets)
        .keep_alive_interval(dead_peer.h2_ping_interval)
        .keep_alive_timeout(dead_peer.h2_ping_timeout)
        // WebSockets over HTTP/2 (RFC 8441): tunnelled to HTTP/1.1 upstreams.
        .enable_connect_protocol()
        .serve_connection(io, svc);
    let mut connection = pin!(connection);
    let probing = probe::run(probe_socket, dead_peer, probe_activity);
    let mut probing = pin!(probing);
    let mut stopping = false;
    let mut calming = false;
    let calm_deadline = tokio::time::sleep(CALM_DOWN_GRACE);
    let mut calm_deadline = pin!(calm_deadline);
    let stop_fut = stop.cancelled();
    let mut stop_fut = pin!(stop_fut);
    let exhausted = cancel.reset_budget_exhausted();
    let mut exhausted = pin!(exhausted);
    let retired = retire.cancelled();
    let mut retired = pin!(retired);
    // `max_connection_age`: GOAWAY when it passes.
    let aged = limits
        .max_connection_age
        .map(|a| Box::pin(tokio::time::sleep_until(born + a)));
    let mut aged = aged;
    // Only hyper's connection is polled on every turn; the other branches when one of them woke.
    let (gate, gated) = Gate::new();
    let result = loop {
        let turn = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = connection.as_mut().poll(cx) {
                return Poll::Ready(Turn::Done(r));
            }
            if !gate.open(cx.waker()) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(&gated);
            // Never completes: switches dead-peer probing on and off as streams come and go.
            let _ = probing.as_mut().poll(&mut cx);
            if !stopping && stop_fut.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Turn::Stop);
            }
            if !stopping
                && (retired.as_mut().poll(&mut cx).is_ready()
                    || aged
                        .as_mut()
                        .is_some_and(|a| a.as_mut().poll(&mut cx).is_ready()))
            {
                return Poll::Ready(Turn::Retire);
            }
            if !calming && exhausted.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Turn::Calm);
            }
            if calming && calm_deadline.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Turn::CalmOver);
            }
            Poll::Pending
        })
        .await;
        // A branch completed, so which branches are polled, or their state, changed.
        gate.reopen();
        match turn {
            Turn::Done(r) => break r,
            // Shutdown, or the connection has done its share: GOAWAY, let the streams in
            // flight finish.
            Turn::Stop | Turn::Retire => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            // The client spent its stream-reset budget (accepted streams reset as fast as they
            // are opened): GOAWAY so no new stream is accepted, and a short grace before close.
            Turn::Calm => {
                calming = true;
                tracing::warn!(client = %peer.client, "http/2 client exceeded its stream reset budget, sending GOAWAY");
                if !stopping {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
                calm_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CALM_DOWN_GRACE);
            }
            Turn::CalmOver => break Ok(()),
        }
    };
    // Runs before the stream tasks hyper just woke, so they see `connection_lost`.
    cancel.on_connection_end(result.as_ref().err());
}

/// What ended one turn of a connection's loop.
enum Turn<R> {
    Done(R),
    Stop,
    Retire,
    Calm,
    CalmOver,
}
