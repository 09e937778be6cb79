//! The `understudy` binaries' library: command implementations behind
//! `understudyd` and `understudyctl`. The binaries only parse arguments and
//! call in here.

pub mod config;
pub mod console;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod local;
pub mod remote;
pub mod supervise;
