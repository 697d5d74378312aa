//! The CLI's commands that talk to a running daemon (`upgrade`, `status`, `stop`,
//! `reexec`): they print what happens and turn the outcome into the documented
//! exit code.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use supervisor::{
    config::Config,
    control::{self, Event, Request, STATUS_TIMEOUT, UpgradeWait},
    error::{EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, exit_code},
    status::render,
};

pub fn fail(error: &anyhow::Error) -> i32 {
    eprintln!("error: {error:#}");
    exit_code(error)
}

/// `supervisor check`: what `run` would refuse, refused with the same line and
/// exit code, without changing anything (no directory, mount, pin, socket or lock
/// file); one `ok` line on stdout otherwise. Nothing is logged either way.
pub fn check(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    if let Err(e) = supervisor::daemon::check(&config) {
        return fail(&e);
    }
    let listeners = config.listeners.len();
    println!(
        "config {}: ok (service {}, {listeners} listener{})",
        path.display(),
        config.service.name,
        if listeners == 1 { "" } else { "s" }
    );
    EXIT_OK
}

/// `supervisor cleanup`: see `daemon::cleanup`.
pub fn cleanup(path: &Path, unless_crashed: bool) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    if unless_crashed {
        // systemd's outcome of the main process (systemd.exec(5)): these mean it
        // died, and with `Restart=` a new supervisor takes the workers over.
        let result = std::env::var("SERVICE_RESULT").unwrap_or_default();
        if matches!(
            result.as_str(),
            "signal" | "core-dump" | "exit-code" | "watchdog"
        ) {
            println!(
                "service {}: the supervisor ended with {result}; leaving its workers for the next one to take over",
                config.service.name
            );
            return EXIT_OK;
        }
    }
    match supervisor::daemon::cleanup(&config) {
        Ok(killed) => {
            println!(
                "service {}: cleaned up ({killed} leftover processes killed)",
                config.service.name
            );
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

/// Whether `error` is the connection to the daemon breaking (the daemon died).
fn connection_lost(error: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::BrokenPipe
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
            )
        })
    })
}

pub async fn upgrade(path: &Path, wait: UpgradeWait) -> i32 {
    // Refuse a bad file here already, with the same message the daemon would give.
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut code = EXIT_FAILED;
    let mut finished = false;
    let result = control::call(
        &config.control_socket(),
        &Request::Upgrade {
            config: absolute,
            wait,
        },
        |event| match event {
            Event::Phase { at_ms, text } => {
                println!("[{:>4}.{:03}s] {text}", at_ms / 1000, at_ms % 1000);
                let _ = std::io::stdout().flush();
            }
            Event::Done { message, .. } => {
                println!("upgrade succeeded: {message}");
                code = EXIT_OK;
                finished = true;
            }
            Event::Error { exit_code, message } => {
                eprintln!("error: upgrade failed: {message}");
                code = exit_code;
                finished = true;
            }
            Event::Status { .. } => {}
        },
    )
    .await;
    match result {
        Ok(()) if finished => code,
        Err(e) if finished || exit_code(&e) == EXIT_BAD_INPUT || !connection_lost(&e) => fail(&e),
        // The connection ended without a final answer: whatever happened to the
        // upgrade, nobody can say from here.
        _ => {
            eprintln!(
                "error: the supervisor went away before the upgrade finished; check supervisor status"
            );
            EXIT_FAILED
        }
    }
}

pub async fn status(path: &Path, json: bool) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let status = match control::fetch_status(&config.control_socket()).await {
        Ok(status) => status,
        Err(e) => return fail(&e),
    };
    if json {
        match serde_json::to_string(&status) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail(&e.into()),
        }
    } else {
        print!("{}", render(&status));
    }
    EXIT_OK
}

pub async fn reexec(path: &Path, binary: Option<PathBuf>) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let binary = match binary.map(Ok).unwrap_or_else(std::env::current_exe) {
        Ok(binary) => std::fs::canonicalize(&binary).unwrap_or(binary),
        Err(e) => return fail(&anyhow::anyhow!("cannot tell which binary to exec: {e}")),
    };
    let socket = config.control_socket();
    let before = match control::fetch_status(&socket).await {
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
    let deadline = std::time::Instant::now() + STATUS_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if let Ok(after) = control::fetch_status(&socket).await
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
            return EXIT_OK;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "error: the re-executed supervisor did not answer within {:?}",
        STATUS_TIMEOUT
    );
    EXIT_FAILED
}

pub async fn stop(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return fail(&e.into()),
    };
    let mut code = EXIT_BAD_INPUT;
    let result = control::call(
        &config.control_socket(),
        &Request::Stop,
        |event| match event {
            Event::Done { message, .. } => {
                println!("{message}");
                code = EXIT_OK;
            }
            Event::Error { exit_code, message } => {
                eprintln!("error: {message}");
                code = exit_code;
            }
            _ => {}
        },
    )
    .await;
    match result {
        Ok(()) => code,
        Err(e) => fail(&e),
    }
}
