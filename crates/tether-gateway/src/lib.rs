//! tether's reverse proxy as a library.
//!
//! A request's path through the crate, in order: [`listen`] accepts a connection on a worker;
//! [`downstream`] speaks HTTP/1.1 or HTTP/2 to the client; [`cancel`] ties each request to a
//! [`tether::RequestContext`] that fires when the client leaves; [`route`] picks the upstream;
//! [`proxy`] sends the request through [`upstream`] (connector and pool), racing every wait
//! against the context, and streams the answer back; [`respond`] makes tether's own error
//! responses from [`error`]'s classification; [`observe`] writes the access log.
//!
//! Configuration arrives typed and validated ([`config`]); file formats belong to the binary.

pub mod admission;
pub mod cancel;
pub mod config;
pub mod deadline;
pub mod downstream;
pub mod error;
pub mod grpc;
pub mod lifetime;
pub mod listen;
pub mod observe;
pub mod proxy;
pub mod respond;
pub mod route;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use listen::{Gateway, RunningGateway, StartError};

/// Locks `m`, taking over a lock poisoned by a panicking holder: every mutex here guards state
/// that is whole between statements (counters, lists, buffers of whole lines), so it stays
/// usable, and one failed request must not take the proxy down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
