//! One module per subcommand; each has `Args` (clap) and `run`.

pub mod bench;
pub mod cluster;
pub mod config;
pub mod conformance;
pub mod daemon;
pub mod dashboard;
pub mod fence;
pub mod import;
pub mod lab;
pub mod simulate;
pub mod status;
pub mod volume;
