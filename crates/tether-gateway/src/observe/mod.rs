//! What the gateway tells operators: the per-request record and where it goes.

pub mod access;
