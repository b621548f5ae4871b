//! Request-scoped cancellation for Rust HTTP services.
//!
//! When a client gives up on a request, the work done for it should stop: the handler, the tasks
//! it spawned, its blocking CPU work, its outbound calls. `tether` gives every request a
//! [`RequestContext`]: a cancellation token that carries *why* it fired ([`CancelReason`]), a
//! [`Deadline`] with its original budget, and a request id.
//!
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
//! # Cancel safety
//! Dropping a future cancels it, and in Rust that is how an HTTP stack says "the client left":
//! - **HTTP/1 server (hyper):** the handler future is dropped on client FIN/RST only when the
//!   request body was read and nothing is pipelined; [`DisconnectWatcher`] covers the other cases.
//! - **HTTP/2 server:** a client RST_STREAM drops that stream's handler and response body; other
//!   streams continue.
//! - **HTTP/1 client:** dropping a response future or body closes the connection, so the server
//!   sees EOF; it is never reused.
//! - **HTTP/2 client:** dropping a response future or body sends RST_STREAM(CANCEL) on that stream
//!   only.
//! - **Spawned tasks and blocking work are not dropped with the handler**: bound them by the
//!   context.

mod context;
mod reason;
pub mod watch;

pub use context::{CancelOnDrop, Cause, Deadline, RequestContext, RequestId};
pub use reason::{CancelReason, Cancelled};
pub use watch::{DisconnectWatcher, PeerGone};
