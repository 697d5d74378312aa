//! `supervisor`: zero-downtime upgrades for UDP services.
#![deny(unsafe_code)]
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use supervisor::{config::Config, daemon};

mod cli;
mod logging;

#[derive(Parser)]
#[command(
    version,
    about = "Zero-downtime upgrade supervisor for UDP services (SK_REUSEPORT + eBPF)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor in the foreground. SIGHUP upgrades, SIGTERM drains and exits.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Discard what a supervisor of this service that died left (kill its
        /// workers, remove its pins and state file) instead of taking it over.
        #[arg(long)]
        fresh: bool,
    },
    /// Discard what a supervisor of this service that died left: kill its
    /// workers, remove its pins and state file. Refused while one runs.
    Cleanup {
        #[arg(long)]
        config: PathBuf,
        /// Do nothing when systemd's $SERVICE_RESULT says the main process
        /// crashed (systemd restarts it, and the new one takes everything over):
        /// for `ExecStopPost=`.
        #[arg(long)]
        unless_crashed: bool,
    },
    /// Check a config as `run` would (file, command, user, runtime dir, bpffs,
    /// listener addresses, privileges) without changing anything; exit 0 or 2.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask the running supervisor for a new generation (re-reading the config).
    /// Prints each phase; exits 0 only when the new generation serves.
    Upgrade {
        #[arg(long)]
        config: PathBuf,
        /// Return when the new generation serves (older ones drain on their own),
        /// or only once every older generation has drained.
        #[arg(long, value_enum, default_value = "serving")]
        wait: supervisor::control::UpgradeWait,
    },
    /// Generations, workers and per-socket counters.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Drain every generation and stop the supervisor.
    Stop {
        #[arg(long)]
        config: PathBuf,
    },
    /// Replace the running supervisor with a (new) supervisor binary, in place:
    /// same pid, same workers, sockets and pins; no datagram is disturbed.
    Reexec {
        #[arg(long)]
        config: PathBuf,
        /// The binary to exec; by default this one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// What a running supervisor asks a binary before it re-execs into it: prints a
    /// JSON proof (program, version, handoff format, config and pins checked).
    #[command(hide = true)]
    HandoffCheck {
        #[arg(long)]
        config: PathBuf,
        /// The handoff format the running supervisor writes.
        #[arg(long)]
        format: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` checks its config before it logs anything: a bad file is one error
    // line, with no log lines before it.
    let run_config = match &cli.command {
        Command::Run { config, .. } => match Config::load(config) {
            Ok(loaded) => Some(loaded),
            Err(e) => return ExitCode::from(cli::fail(&e.into()) as u8),
        },
        Command::Check { config } => return ExitCode::from(cli::check(config) as u8),
        Command::HandoffCheck { config, format } => {
            return ExitCode::from(supervisor::handoff_check::run(config, *format) as u8);
        }
        _ => None,
    };
    // Journal, text or JSON lines: see logging.rs.
    if let Err(e) = logging::init() {
        eprintln!("error: {e}");
        return ExitCode::from(supervisor::error::EXIT_BAD_INPUT as u8);
    }
    // A launcher may hand us a blocked signal mask (systemd resets it, others do
    // not); the daemon must see SIGTERM, SIGINT, SIGHUP and SIGCHLD whatever it was.
    let mut wanted = nix::sys::signal::SigSet::empty();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGCHLD,
    ] {
        wanted.add(signal);
    }
    let _ = wanted.thread_unblock();
    // One thread: see daemon/mod.rs for why.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run { config, fresh } => {
                let leftovers = if fresh {
                    daemon::Leftovers::Discard
                } else {
                    daemon::Leftovers::Adopt
                };
                let loaded = run_config.expect("loaded above for `run`");
                match daemon::run(&config, loaded, leftovers).await {
                    Ok(()) => 0,
                    Err(e) => cli::fail(&e),
                }
            }
            Command::Upgrade { config, wait } => cli::upgrade(&config, wait).await,
            Command::Status { config, json } => cli::status(&config, json).await,
            Command::Stop { config } => cli::stop(&config).await,
            Command::Reexec { config, binary } => cli::reexec(&config, binary).await,
            Command::Cleanup {
                config,
                unless_crashed,
            } => cli::cleanup(&config, unless_crashed),
            Command::Check { .. } | Command::HandoffCheck { .. } => {
                unreachable!("answered before the runtime starts")
            }
        }
    });
    ExitCode::from(code as u8)
}
