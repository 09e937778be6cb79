//! The `understudy` binaries' library: command implementations behind
//! `understudyctl` (and later `understudyd`). The binaries only parse
//! arguments and call in here.

pub mod console;
pub mod local;
