//! `fep --config PATH [--check | --cleanup | --discard-state]`: the front-end
//! dispatcher daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use fep_shared::FepConfig;

/// Front-end processor: dispatches client connections to back-end nodes by
/// ratio through a TUN device, and relays the replies.
///
/// The packaged config is /etc/fep/fep.toml (`systemctl enable --now fep`
/// serves it); runtime changes made with fepctl are kept in its `state_dir`
/// (/var/lib/fep) across restarts, and fepctl talks to its `control_socket`
/// (/run/fep/fep.sock). SIGHUP (`systemctl reload fep`) re-reads the config;
/// SIGINT and SIGTERM stop fep and leave its network set-up in place, so that
/// a restart breaks no connection. Exit status 2: a bad config or a state
/// file fep cannot use (the message says what to do).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, required_unless_present = "generate_docs")]
    config: Option<PathBuf>,
    /// Validate the config, print what would be served, and exit.
    #[arg(long)]
    check: bool,
    /// Remove what fep set up on this host (TUN device, VIP routes,
    /// return-path rules and table, sysctls it changed), and exit: how a
    /// gateway is decommissioned. A stop leaves them in place, so that a
    /// restart breaks no connection. Refused while fep runs.
    #[arg(long, conflicts_with = "check")]
    cleanup: bool,
    /// Start even if a file in the state directory cannot be used (damaged,
    /// unreadable, of a newer version, or runtime changes that no longer fit
    /// the config file): move it aside to FILE.discarded-SECONDS and start
    /// without it. Without this flag fep refuses to start (exit status 2).
    #[arg(long, conflicts_with_all = ["check", "cleanup"])]
    discard_state: bool,
    /// Write the man page and shell completions to DIR, and exit (the
    /// package's build runs this).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        return fep_shared::cli_docs::generate(Args::command(), dir);
    }
    let config = args
        .config
        .expect("clap requires --config without --generate-docs");
    fep_shared::init_logging();
    let cfg = match FepConfig::load(&config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("fep: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match fep::daemon::check(&cfg) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fep: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if args.cleanup {
        return match fep::daemon::cleanup(&cfg) {
            Ok(removed) if removed.is_empty() => {
                println!("nothing to remove: fep's set-up is not on this host");
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for line in removed {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fep: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let _lock = match fep::daemon::lock_state_dir(&cfg.state_dir) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("fep: {e:#}");
            return ExitCode::from(1);
        }
    };
    let start = match fep::prepare(&cfg, args.discard_state) {
        Ok(start) => start,
        Err(e) => {
            eprintln!("fep: {e}");
            return ExitCode::from(2);
        }
    };
    match fep::daemon::run(&config, cfg, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
