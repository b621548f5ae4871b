//! Request-scoped cancellation for Rust HTTP services.
//!
//! When a client gives up on a request, the work done for it should stop: the handler, the tasks
//! it spawned, its blocking CPU work, its outbound calls. `tether` gives every request a
//! [`RequestContext`]: a cancellation token that carries *why* it fired ([`CancelReason`]), a
//! [`Deadline`] with its original budget, and a request id.
//!
//! # Contexts
//! ```
//! use std::time::Duration;
//! use tether::{CancelReason, Deadline, RequestContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ctx = RequestContext::new().child_with_deadline(Deadline::after(Duration::from_secs(2)));
//! let worker = ctx.child();
//!
//! // Something notices the client left (the disconnect watcher, an h2 stream reset, ...).
//! ctx.cancel(CancelReason::ClientClosed);
//!
//! // Work bounded by the context stops, and knows why.
//! let out = worker.run(tokio::time::sleep(Duration::from_secs(30))).await;
//! assert_eq!(out.unwrap_err().reason, CancelReason::ClientClosed);
//! # }
//! ```
//!
//! # Serving
//! [`serve::serve`] runs any tower service of `Request<hyper::body::Incoming>` (an axum `Router`
//! fits) over HTTP/1.1 and h2c (or over TLS with ALPN, feature `tls`), gives every request a
//! context in its extensions, and cancels it when the client leaves, with the reason. Bound the
//! work done for the request by the context:
//!
//! ```no_run
//! use std::time::Duration;
//! use tether::serve::{ServeOptions, serve};
//! use tether::{ContextLayer, RequestContext, work};
//!
//! async fn handler(ctx: RequestContext) -> String {
//!     // CPU work stops at its next check once the client is gone.
//!     let sum = work::spawn_blocking(&ctx, |check| {
//!         let mut sum = 0u64;
//!         for i in 0..50_000_000u64 {
//!             if i % 100_000 == 0 {
//!                 check.check()?;
//!             }
//!             sum = sum.wrapping_add(i);
//!         }
//!         Ok(sum)
//!     });
//!     match sum.await {
//!         Ok(sum) => sum.to_string(),
//!         Err(cancelled) => format!("stopped: {}", cancelled.reason),
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! # #[cfg(feature = "axum")] {
//! let app = axum::Router::new().route("/", axum::routing::get(handler));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let options = ServeOptions::new().layer(ContextLayer::new().timeout(Duration::from_secs(10)));
//! serve(listener, app, options).await;
//! # }
//! # Ok(()) }
//! ```
//!
//! | module | what it bounds |
//! |---|---|
//! | [`work`] | spawned tasks, blocking CPU work (cooperative checks), cleanup windows |
//! | [`layer`], [`serve`] | the request context itself: deadline, client gone, shutdown |
//! | [`body`] | request bodies (a read error cancels) and response bodies (cut on cancel) |
//! | [`client`] (feature `client`, default) | outbound HTTP calls and their response bodies |
//! | `postgres` (feature `postgres`) | PostgreSQL queries, cancelled on the server |
//! | [`budget`] | deadline budget headers (`x-request-timeout-ms`, `grpc-timeout`) |
//!
//! With the `axum` feature, `RequestContext` is an axum extractor (500 when the layer is
//! missing).
//!
//! # Cancel safety
//! Dropping a future cancels it, and in Rust that is how an HTTP stack says "the client left".
//! What each protocol does, and what tether adds:
//! - **HTTP/1 server (hyper):** the handler future is dropped on client FIN/RST only when the
//!   request body was read and nothing is pipelined. [`serve::serve`] runs a
//!   [`DisconnectWatcher`] per connection that catches the other cases (unread or half-sent body,
//!   pipelined requests): it cancels the contexts with `client_closed`/`client_reset` and drops
//!   the connection. A body read error does **not** make hyper drop the handler; wrap the body in
//!   [`body::CancelOnError`] so that it cancels the context.
//! - **HTTP/2 server:** a client RST_STREAM drops that stream's handler and response body, and the
//!   layer cancels the context with `stream_reset`; other streams continue. A lost connection
//!   cancels every stream on it with `connection_lost`.
//! - **HTTP/1 client:** dropping a response future or body closes the connection, so the upstream
//!   sees EOF; it is never reused. [`client::Client`] drops them when the context fires.
//! - **HTTP/2 client:** dropping a response future or body sends RST_STREAM(CANCEL) on that stream
//!   only.
//! - **Response bodies:** a body that fails makes hyper close the HTTP/1 connection without the
//!   final chunk, or reset the HTTP/2 stream; [`body::BodyCancelled`] carries `CANCEL` so the
//!   reset says CANCEL, not INTERNAL_ERROR.
//! - **Spawned tasks and blocking work are not dropped with the handler**: start them with
//!   [`work::spawn`] / [`work::spawn_blocking`], or bound them by the context yourself.
//! - **PostgreSQL (tokio-postgres):** dropping a query future leaves the query running on the
//!   server. The `postgres` module sends the server-side cancel request.
//! - **Cleanup:** code after an `.await` in a dropped handler never runs; use
//!   [`RequestContext::run_with_cleanup`] to release resources or record partial work within a
//!   bounded window.

pub mod body;
pub mod budget;
#[cfg(feature = "client")]
pub mod client;
mod context;
#[cfg(feature = "axum")]
pub mod extract;
pub mod layer;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reason;
pub mod serve;
pub mod watch;
pub mod work;

pub use context::{CancelOnDrop, Cause, Deadline, RequestContext, RequestId};
pub use layer::{ContextLayer, Downstream};
pub use reason::{CancelReason, Cancelled};
pub use watch::{DisconnectWatcher, PeerGone};
pub use work::CancelCheck;
