//! The `tether` binary.

mod duration;
mod file_config;

fn main() {}
