//! `fep --config PATH [--check]`: the front-end dispatcher daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fep_shared::FepConfig;

/// Front-end processor: dispatches client connections to back-end nodes by
/// ratio through a TUN device, and relays the replies.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long)]
    config: PathBuf,
    /// Validate the config, print what would be served, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    fep_shared::init_logging();
    let cfg = match FepConfig::load(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("fep: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        print!("{}", fep::daemon::describe(&cfg));
        return ExitCode::SUCCESS;
    }
    match fep::daemon::run(&args.config, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
