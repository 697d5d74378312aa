//! The event loop: signals, control connections, the commands they carry, the
//! selector's flow clock and the systemd watchdog; then the shutdown that follows.
//!
//! Every upgrade, whether SIGHUP or `supervisor upgrade` asked for it, is started
//! here and tracked here, so a stop never races one: at shutdown the upgrades
//! still running are cancelled first, then every generation is drained.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use supervisor_common::BalanceMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::{Daemon, startup};
use crate::{
    config::Config,
    control::{self, Command, UpgradeWait, Upgraded},
    reexec, systemd,
    upgrade::{self, Progress, Shared},
    worker::{WorkerSpec, resolve_program},
};

/// Without a `flow` listener, how often the loop checks whether one appeared.
const CLOCK_IDLE_CHECK: Duration = Duration::from_millis(500);
/// How long the control socket is not accepted from after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this long about failed accepts (and about refused peers).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Runs the event loop until a stop, then drains everything and cleans up.
pub(super) async fn serve(daemon: Daemon, config_path: &Path) -> Result<()> {
    let Daemon {
        shared,
        control,
        lock,
        notify_fd,
        metrics,
        journal_writer,
    } = daemon;
    // `/metrics` and the stall watch run on this runtime beside the event loop;
    // the endpoint keeps answering while everything drains at the end.
    let metrics_server =
        metrics.map(|listener| tokio::spawn(crate::metrics::http::serve(listener, shared.clone())));
    let stall_watch = tokio::spawn(crate::metrics::stall::watch(shared.clone()));
    let (service, pin_dir, control_path, notify_path, drain_timeout) = {
        let state = shared.lock().unwrap();
        (
            state.config.service.name.clone(),
            state.config.pin_dir(),
            state.config.control_socket(),
            state.config.notify_socket(),
            state.config.service.drain_timeout,
        )
    };
    let handoff_fds = startup::handoff_fds(&lock, notify_fd, &control);
    let mut upgrades = JoinSet::new();
    let result = event_loop(
        &shared,
        config_path.to_path_buf(),
        control,
        &handoff_fds,
        &mut upgrades,
    )
    .await;

    // Upgrades still running are cancelled (their guard releases the upgrade
    // reservation); a generation one left half-built is still `Starting`, and
    // stop_all kills rather than drains those.
    upgrades.shutdown().await;
    stall_watch.abort();
    let drain_timeout = shared
        .lock()
        .unwrap()
        .config
        .service
        .drain_timeout
        .max(drain_timeout);
    systemd::stopping("draining all generations");
    upgrade::stop_all(&shared, drain_timeout, &Progress::new(None)).await;
    // Nothing is left to adopt: the state file goes before the pins do.
    journal_writer.abort();
    shared.lock().unwrap().workers.journal.remove();
    startup::unpin(&shared.lock().unwrap().dataplanes, &pin_dir);
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_file(&notify_path);
    if let Some(server) = metrics_server {
        server.abort();
    }
    tracing::info!("service {service}: stopped");
    drop(lock);
    result
}

async fn event_loop(
    shared: &Shared,
    mut config_path: PathBuf,
    control: tokio::net::UnixListener,
    handoff_fds: &reexec::DaemonFds,
    upgrades: &mut JoinSet<()>,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<Command>();
    // Successful upgrades report the config they used: the next SIGHUP re-reads it.
    let (upgraded_tx, mut upgraded) = mpsc::unbounded_channel::<PathBuf>();
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    // The selector's flow clock (see `control_index::CLOCK_MS`) ticks only while a
    // listener uses `flow`; otherwise the word is 0 and the selector reads the
    // kernel's clock, and the daemon only wakes up to look again now and then.
    let clock = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(clock);
    let mut clock_ticking = true;
    // Control connections: bounded (see `control::Connections`), and accept
    // errors pause accepting instead of spinning on them.
    let connections = control::Connections::default();
    let mut accept_paused = false;
    let accept_resume = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(accept_resume);
    let mut accept_errors = control::RateLimitedLog::new(ACCEPT_ERROR_LOG_EVERY);
    let mut refusals = control::RateLimitedLog::new(ACCEPT_ERROR_LOG_EVERY);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining and stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining and stopping"); break; }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: upgrading with {}", config_path.display());
                let (done, outcome) = oneshot::channel();
                let request = UpgradeRequest { path: config_path.clone(), wait: UpgradeWait::Serving, progress: Progress::new(None), done };
                start_upgrade(shared, upgrades, request, upgraded_tx.clone());
                tokio::spawn(async move {
                    if let Ok(Err(e)) = outcome.await {
                        tracing::error!("upgrade refused or failed: {e:#}");
                    }
                });
            }
            Some(path) = upgraded.recv() => config_path = path,
            Some(command) = commands.recv() => match command {
                Command::Stop => { tracing::info!("stop requested"); break; }
                Command::Upgrade { config, wait, progress, done } => {
                    let request = UpgradeRequest { path: config, wait, progress, done };
                    start_upgrade(shared, upgrades, request, upgraded_tx.clone());
                }
                Command::Reexec { binary, refused } => {
                    // Only returns if the exec did not happen.
                    let why = reexec_now(shared, &config_path, &binary, handoff_fds);
                    tracing::error!("re-exec refused or failed: {why}");
                    let _ = refused.send(why);
                }
            },
            accepted = control.accept(), if !accept_paused => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of fds (EMFILE), say: the connection stays in the
                        // backlog and accept() would fail again at once. Pause.
                        if let Some(suppressed) = accept_errors.allow() {
                            tracing::warn!(
                                "control socket: accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?} ({suppressed} more such errors not logged)"
                            );
                        }
                        accept_paused = true;
                        accept_resume.as_mut().reset(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                        continue;
                    }
                };
                if !control::peer_allowed(&stream) {
                    if let Some(suppressed) = refusals.allow() {
                        tracing::warn!("control connection from a user that may not control this supervisor: refused ({suppressed} more not logged)");
                    }
                    continue;
                }
                let Ok(admitted) = connections.admit() else {
                    control::refuse(&stream);
                    continue;
                };
                let shared = shared.clone();
                let commands_tx = commands_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = control::serve_connection(&shared, stream, commands_tx, admitted).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            _ = &mut accept_resume, if accept_paused => accept_paused = false,
            _ = &mut clock => {
                let state = shared.lock().unwrap();
                let flow = state.config.listeners.iter().any(|l| l.balance.0 == BalanceMode::Flow);
                if flow || clock_ticking {
                    for dataplane in &state.dataplanes {
                        dataplane.tick_clock(flow);
                    }
                }
                clock_ticking = flow;
                let period = if flow { Duration::from_millis(supervisor_common::CLOCK_TICK_MS) } else { CLOCK_IDLE_CHECK };
                clock.as_mut().reset(tokio::time::Instant::now() + period);
            }
            _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                systemd::watchdog();
            }
            Some(_) = upgrades.join_next(), if !upgrades.is_empty() => {}
        }
    }
    Ok(())
}

/// One upgrade to run: from which config, when to answer, and where.
struct UpgradeRequest {
    path: PathBuf,
    wait: UpgradeWait,
    progress: Progress,
    done: oneshot::Sender<Result<Upgraded>>,
}

/// Starts an upgrade as a tracked task; its outcome goes to `request.done`, and on
/// success its config path to `upgraded`.
fn start_upgrade(
    shared: &Shared,
    upgrades: &mut JoinSet<()>,
    request: UpgradeRequest,
    upgraded: mpsc::UnboundedSender<PathBuf>,
) {
    let shared = shared.clone();
    upgrades.spawn(async move {
        let UpgradeRequest {
            path,
            wait,
            progress,
            done,
        } = request;
        let result = upgrade_from_file(&shared, &path, &progress).await;
        let result = match result {
            Ok(mut outcome) => {
                let _ = upgraded.send(path);
                if wait == UpgradeWait::Drained && !outcome.draining.is_empty() {
                    progress.emit(format!(
                        "waiting for generations {:?} to drain (--wait drained)",
                        outcome.draining
                    ));
                    upgrade::wait_drained(&shared, &outcome.draining).await;
                    outcome.draining.clear();
                }
                Ok(outcome)
            }
            Err(e) => Err(e),
        };
        let _ = done.send(result);
    });
}

/// Re-reads the config and upgrades. `InputError`s mean nothing changed.
///
/// systemd hears `RELOADING=1` first and `READY=1` whatever the outcome, refusals
/// included: a `Type=notify-reload` unit's `systemctl reload` waits for that
/// `READY=1`, and would otherwise hang until its timeout on a bad config.
async fn upgrade_from_file(shared: &Shared, path: &Path, progress: &Progress) -> Result<Upgraded> {
    systemd::reloading(&format!("upgrading with {}", path.display()));
    let result = async {
        let config = Config::load(path)?;
        let notify_socket = shared.lock().unwrap().spec.notify_socket.clone();
        let spec = Arc::new(WorkerSpec::from_config(&config, notify_socket)?);
        let generation = upgrade::begin(shared, &config, progress)?;
        let draining = upgrade::run(shared, generation, config, spec, progress).await?;
        Ok(Upgraded {
            generation,
            draining,
        })
    }
    .await;
    crate::metrics::upgrade_result(match &result {
        Ok(_) => "ok",
        Err(e) if crate::error::exit_code(e) == crate::error::EXIT_BAD_INPUT => "refused",
        Err(_) => "failed",
    });
    let serving = shared.lock().unwrap().serving();
    match &result {
        Ok(upgraded) => systemd::ready(&format!("generation {} serving", upgraded.generation)),
        Err(e) => systemd::ready(&format!(
            "upgrade refused or failed ({e:#}); generation {serving} serving"
        )),
    }
    result
}

/// Checks, writes the handoff and execs `binary`; returns why not if it did not.
fn reexec_now(
    shared: &Shared,
    config_path: &Path,
    binary: &Path,
    fds: &reexec::DaemonFds,
) -> String {
    // The new image re-reads the config: refuse now rather than fail after exec.
    let state = shared.lock().unwrap();
    match Config::load(config_path) {
        Ok(config) => {
            if let Err(e) = upgrade::check_compatible(&state.config, &config) {
                return e.to_string();
            }
        }
        Err(e) => return e.to_string(),
    }
    if resolve_program(&binary.to_string_lossy()).is_none() {
        return format!("{} is not an executable file", binary.display());
    }
    drop(state);
    if let Err(why) = crate::reexec_vet::vet(binary, config_path) {
        return why;
    }
    let state = shared.lock().unwrap();
    let (handoff, kept) = match reexec::prepare(&state, config_path, fds) {
        Ok(prepared) => prepared,
        Err(e) => return format!("{e:#}"),
    };
    drop(state);
    tracing::info!(
        "re-executing {} (pid {} stays)",
        binary.display(),
        std::process::id()
    );
    systemd::status(&format!("re-executing {}", binary.display()));
    let error = reexec::exec(binary, config_path, &handoff);
    reexec::abort(&handoff, &kept);
    format!("exec {}: {error}", binary.display())
}
