//! `fep --config PATH [--check | --cleanup]`: the front-end dispatcher daemon.

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
    /// Remove what fep set up on this host (TUN device, VIP routes,
    /// return-path rules and table, sysctls it changed), and exit: how a
    /// gateway is decommissioned. A stop leaves them in place, so that a
    /// restart breaks no connection. Refused while fep runs.
    #[arg(long, conflicts_with = "check")]
    cleanup: bool,
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
    if args.cleanup {
        return match fep::daemon::cleanup(&cfg) {
            Ok(removed) if removed.is_empty() => {
                println!("nothing to remove: fep's set-up is not on this host");
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for line in removed {
                    println!("removed {line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fep: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    match fep::daemon::run(&args.config, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
