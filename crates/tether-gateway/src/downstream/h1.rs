//! HTTP/1 downstream: hyper's server with `half_close(true)` so that tether, not hyper, decides
//! what a client FIN means (per route), and the disconnect watcher so that a client leaving is
//! seen even while hyper is not reading (unread request body, pipelined bytes).

use std::os::fd::OwnedFd;
use std::pin::pin;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tether::DisconnectWatcher;
use tokio_util::sync::CancellationToken;

use super::Peer;
use super::head_timeout::HeadWatch;
use super::probe::{self, Activity, GuardedBody};
use crate::cancel::{ConnCancel, DownstreamProtocol};
use crate::listen::{ListenerShared, Worker};
use crate::proxy;

/// Serves an HTTP/1 connection.
pub async fn serve<I>(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    io: I,
    peer: Peer,
    watcher: Option<DisconnectWatcher>,
    fd: Option<OwnedFd>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let cancel = Arc::new(ConnCancel::new(
        worker.root.child(),
        DownstreamProtocol::Http1,
        watcher,
    ));
    let conn = peer.conn(cancel.clone());
    let (activity, load) = Activity::new();
    let (io, head) = HeadWatch::new(io, load.clone());
    let limits = listener.limits;
    let dead_peer = listener.dead_peer;
    let svc = {
        let worker = worker.clone();
        service_fn(move |req| {
            let guard = activity.begin();
            let handled = proxy::handle(worker.clone(), listener.clone(), conn.clone(), req);
            async move {
                let resp = handled.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| GuardedBody::new(b, guard)))
            }
        })
    };
    let connection = http1::Builder::new()
        .half_close(true)
        .timer(TokioTimer::new())
        // A head larger than the buffer is answered with 431 by hyper.
        .max_buf_size(limits.max_header_bytes)
        // A slow head (slowloris) or an idle keep-alive connection past this is closed.
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, svc);
    let probing = probe::run(fd, dead_peer, load);
    let mut probing = pin!(probing);
    let mut connection = pin!(connection);
    let mut watching = cancel.watcher().is_some();
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            biased;
            r = connection.as_mut() => break r,
            // The client left: cancel what is in flight (per the route's half-close policy). hyper
            // is still driven afterwards so it can finish or fail the exchange cleanly.
            gone = watch(&cancel), if watching => {
                watching = false;
                cancel.on_peer_gone(gone);
            }
            // Never completes: switches dead-peer probing on and off as requests come and go.
            _ = probing.as_mut() => {}
            // Shutdown: finish the response in flight, then close.
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = &result {
        tracing::trace!(client = %peer.client, error = %e, "downstream connection ended with an error");
        // A request head that came too slowly (slowloris), not an idle keep-alive connection.
        if e.is_timeout()
            && let Some(took) = head.partial_head()
        {
            head.record(&worker, &peer, took);
        }
    }
    cancel.on_connection_end(result.as_ref().err());
}

async fn watch(cancel: &ConnCancel) -> tether::PeerGone {
    match cancel.watcher() {
        Some(w) => w.gone().await,
        None => std::future::pending().await,
    }
}
