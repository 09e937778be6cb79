//! `understudyd`: the understudy daemon. Parses arguments and calls the library.

// The doc comments below are clap's --help text, where `[tls]` names a TOML
// table, not a Rust item.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use understudy::config::Config;
use understudy::daemon::{self, Role};

#[derive(Parser, Debug)]
#[command(
    name = "understudyd",
    version,
    about = "Keep a VM alive across the loss of its host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct ConfigArgs {
    /// The VM's configuration file (TOML).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Override a config field: --set epoch_interval=10ms (repeatable; dotted keys for tables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct PrimaryArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Do not boot: wait on `[primary].replication` for the VM to arrive by a
    /// live migration (`understudyctl migrate`), then run and protect it.
    #[arg(long)]
    incoming: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the VM and replicate it to the backup.
    Primary(PrimaryArgs),
    /// Keep a ready-to-resume copy and take over when the primary dies.
    Backup(ConfigArgs),
    /// Check a configuration file and exit.
    Check(ConfigArgs),
}

fn main() -> ExitCode {
    // Before any thread: chunk-sized buffers are reused, not faulted in anew.
    understudy_common::alloc::keep_freed_memory();
    // Refused TLS handshakes (a peer without a certificate from our CA) and
    // certificate files that changed are always logged (`server_tls`).
    understudy::init_logging("info", &["understudy_common::server_tls=info"]);
    let cli = Cli::parse();
    let (role, args, incoming) = match &cli.command {
        Command::Primary(a) => (Some(Role::Primary), &a.config, a.incoming),
        Command::Backup(a) => (Some(Role::Backup), a, false),
        Command::Check(a) => (None, a, false),
    };
    let config = match Config::load(&args.config, &args.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("understudyd: error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(role) = role else {
        println!(
            "{}: OK (VM {:?}, guest {})",
            args.config.display(),
            config.name,
            config.guest
        );
        // What the daemon would say of its certificates (a file it cannot
        // read yet is said, not refused: the check is of the file).
        for line in understudy::tls_watch::report(&config) {
            println!("{line}");
        }
        return ExitCode::SUCCESS;
    };
    let start = if incoming {
        daemon::Start::Incoming
    } else {
        daemon::Start::Home
    };
    match daemon::run(role, &config, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("understudyd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
