//! `supervisor`: zero-downtime upgrades for UDP services.
use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use supervisor::{
    config::Config,
    control::{self, Event, Request},
    daemon,
    error::{EXIT_BAD_INPUT, EXIT_FAILED, exit_code},
    status,
};

#[derive(Parser)]
#[command(
    version,
    about = "Zero-downtime upgrade supervisor for UDP services (SK_REUSEPORT + eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor in the foreground. SIGHUP upgrades, SIGTERM drains and exits.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask the running supervisor for a new generation (re-reading the config).
    /// Prints each phase; exits 0 only when the new generation serves.
    Upgrade {
        #[arg(long)]
        config: PathBuf,
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SUPERVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
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
    // One thread: see daemon.rs for why.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => match daemon::run(&config).await {
                Ok(()) => 0,
                Err(e) => fail(&e),
            },
            Command::Upgrade { config } => upgrade(&config).await,
            Command::Status { config, json } => status_command(&config, json).await,
            Command::Stop { config } => stop(&config).await,
            Command::Reexec { config, binary } => reexec(&config, binary).await,
        }
    });
    ExitCode::from(code as u8)
}

fn fail(error: &anyhow::Error) -> i32 {
    eprintln!("error: {error:#}");
    exit_code(error)
}

async fn upgrade(path: &std::path::Path) -> i32 {
    // Refuse a bad file here already, with the same message the daemon would give.
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut code = EXIT_FAILED;
    let result = control::call(
        &config.control_socket(),
        &Request::Upgrade { config: absolute },
        |event| match event {
            Event::Phase { at_ms, text } => {
                println!("[{:>4}.{:03}s] {text}", at_ms / 1000, at_ms % 1000);
                let _ = std::io::stdout().flush();
            }
            Event::Done { message } => {
                println!("upgrade succeeded: {message}");
                code = 0;
            }
            Event::Error { exit_code, message } => {
                eprintln!("error: upgrade failed: {message}");
                code = exit_code;
            }
            Event::Status { .. } => {}
        },
    )
    .await;
    match result {
        Ok(()) => code,
        Err(e) => fail(&e),
    }
}

async fn status_command(path: &std::path::Path, json: bool) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let status = match fetch_status(&config.control_socket()).await {
        Ok(status) => status,
        Err(e) => return fail(&e),
    };
    if json {
        println!("{status}");
    } else {
        match serde_json::from_value::<status::Status>(status) {
            Ok(status) => print!("{}", status::render(&status)),
            Err(e) => eprintln!("error: malformed status: {e}"),
        }
    }
    0
}

/// One `status` request to the daemon, bounded by `STATUS_TIMEOUT`.
async fn fetch_status(socket: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let mut status = None;
    let call = control::call(socket, &Request::Status, |event| {
        if let Event::Status { status: value } = event {
            status = Some(value);
        }
    });
    match tokio::time::timeout(daemon::STATUS_TIMEOUT, call).await {
        Ok(result) => result?,
        Err(_) => anyhow::bail!(
            "the supervisor did not answer within {:?}",
            daemon::STATUS_TIMEOUT
        ),
    }
    status.ok_or_else(|| anyhow::anyhow!("no status from the supervisor"))
}

async fn reexec(path: &std::path::Path, binary: Option<PathBuf>) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let binary = match binary.map(Ok).unwrap_or_else(std::env::current_exe) {
        Ok(binary) => std::fs::canonicalize(&binary).unwrap_or(binary),
        Err(e) => return fail(&anyhow::anyhow!("cannot tell which binary to exec: {e}")),
    };
    let socket = config.control_socket();
    let before = match status_json(&socket).await {
        Ok(status) => status,
        Err(e) => return fail(&e),
    };
    let mut refused = None;
    let result = control::call(
        &socket,
        &Request::Reexec {
            binary: binary.clone(),
        },
        |event| match event {
            Event::Phase { text, .. } => println!("{text}"),
            Event::Error { exit_code, message } => refused = Some((exit_code, message)),
            _ => {}
        },
    )
    .await;
    if let Some((code, message)) = refused {
        eprintln!("error: re-exec refused: {message}");
        return code;
    }
    if let Err(e) = result {
        return fail(&e);
    }
    // The connection closed with the old image. Wait for the new one to answer.
    let deadline = std::time::Instant::now() + daemon::STATUS_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if let Ok(after) = status_json(&socket).await
            && after.image_started_unix_ms != before.image_started_unix_ms
        {
            let serving: Vec<String> = after
                .generations
                .iter()
                .map(|g| format!("{} {}", g.generation, g.state))
                .collect();
            println!(
                "re-exec succeeded: supervisor pid {} now runs {}; generation {}",
                after.pid,
                binary.display(),
                serving.join(", ")
            );
            return 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "error: the re-executed supervisor did not answer within {:?}",
        daemon::STATUS_TIMEOUT
    );
    EXIT_FAILED
}

async fn status_json(socket: &std::path::Path) -> anyhow::Result<status::Status> {
    Ok(serde_json::from_value(fetch_status(socket).await?)?)
}

async fn stop(path: &std::path::Path) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let mut code = EXIT_BAD_INPUT;
    let result = control::call(&config.control_socket(), &Request::Stop, |event| {
        if let Event::Done { message } = event {
            println!("{message}");
            code = 0;
        }
    })
    .await;
    match result {
        Ok(()) => code,
        Err(e) => fail(&e),
    }
}
