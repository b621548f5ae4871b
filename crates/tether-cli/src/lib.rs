//! The parts of the `tether` binary that are useful on their own: the config file format and its
//! durations. The binary (`src/main.rs`) uses them from here; so do the fuzz targets.

pub mod duration;
pub mod file_config;
