//! tether's reverse proxy as a library.

pub mod config;
pub mod observe;

pub use config::{Config, ConfigError};
