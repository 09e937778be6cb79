//! The `understudy` binaries' library: command implementations behind
//! `understudyd` and `understudyctl`. The binaries only parse arguments and
//! call in here.

pub mod config;
pub mod console;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod local;
pub mod migrate;
pub mod pair;
pub mod record;
pub mod remote;
pub mod supervise;
pub mod switchover;
pub mod tls_watch;

/// Logs to standard error, filtered by `UNDERSTUDY_LOG` (default `default`)
/// plus `always` directives; colours only on a terminal, so the journal and
/// log files get plain text.
pub fn init_logging(default: &str, always: &[&str]) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    for directive in always {
        match directive.parse() {
            Ok(d) => filter = filter.add_directive(d),
            Err(e) => eprintln!("bad built-in log directive {directive:?}: {e}"),
        }
    }
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
}
