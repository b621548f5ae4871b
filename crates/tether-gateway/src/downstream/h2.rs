//! HTTP/2 downstream: hyper's server. A client RST_STREAM makes hyper drop that stream's handler
//! or response body (the request's tracker turns the drop into `stream_reset`); a lost connection
//! ends the connection future, which cancels every stream on it with `connection_lost` before
//! the streams' own tasks run.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::Peer;
use crate::cancel::{ConnCancel, DownstreamProtocol};
use crate::listen::{ListenerShared, Worker};
use crate::proxy::{self, Conn};

/// Serves an HTTP/2 connection.
pub async fn serve<I>(
    worker: Arc<Worker>,
    listener: Arc<ListenerShared>,
    io: I,
    peer: Peer,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let cancel = Arc::new(ConnCancel::new(
        worker.root.child(),
        DownstreamProtocol::H2,
        None,
    ));
    let conn = Arc::new(Conn {
        client: peer.client,
        local: peer.local,
        tls: peer.tls,
        cancel: cancel.clone(),
    });
    let svc = {
        let worker = worker.clone();
        service_fn(move |req| proxy::handle(worker.clone(), listener.clone(), conn.clone(), req))
    };
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10))
        .serve_connection(io, svc);
    let mut connection = pin!(connection);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            biased;
            r = connection.as_mut() => break r,
            // Shutdown: GOAWAY, let the streams in flight finish.
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    // Runs before the stream tasks hyper just woke, so they see `connection_lost`.
    cancel.on_connection_end(result.as_ref().err());
}
