//! `supervisor run`: start-up, the event loop, and shutdown.
//!
//! Start-up checks everything an operator can get wrong before it changes
//! anything (config, privileges, the port, the command), and undoes what it did if
//! a later step fails: a refused start leaves no pins, sockets or processes.
//!
//! Everything runs on one thread (a current-thread tokio runtime on the main
//! thread). That is a correctness choice, not only a simple one: workers are forked
//! with `PR_SET_PDEATHSIG`, which is tied to the forking thread.
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    io::BufReader,
    net::UnixStream,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    bpffs,
    config::Config,
    control::{self, Event, Request},
    error::{InputError, exit_code},
    maps::ListenerDataplane,
    notify::{NotifySocket, Registry},
    status, systemd,
    upgrade::{self, Progress, Shared, State},
    worker::WorkerSpec,
};

pub async fn run(config_path: &Path) -> Result<()> {
    crate::reexec::image_started();
    if let Some(handoff) = std::env::var_os(crate::reexec::HANDOFF_ENV) {
        return run_adopted(config_path, Path::new(&handoff)).await;
    }
    let config = Config::load(config_path)?;
    let service = config.service.name.clone();

    std::fs::create_dir_all(&config.service.runtime_dir).map_err(|e| {
        InputError::new(format!(
            "cannot create runtime_dir {}: {e}",
            config.service.runtime_dir.display()
        ))
    })?;
    let lock = lock(&config)?;
    let spec = Arc::new(worker_spec(&config, String::new())?);
    bpffs::ensure(&config.service.bpffs)?;

    let pin_dir = config.pin_dir();
    let mut dataplanes = Vec::new();
    for listener in &config.listeners {
        // A listener that fails to load removes its own pins (`ListenerDataplane::load`).
        match ListenerDataplane::load(
            &listener.name,
            &pin_dir.join(&listener.name),
            listener.flow_table_size,
        ) {
            Ok(dataplane) => dataplanes.push(dataplane),
            Err(e) => {
                unpin_dataplanes(&dataplanes, &pin_dir);
                return Err(e);
            }
        }
    }

    // The XDP filter: adopted from a previous run when its link is pinned, attached
    // otherwise; a stale one of ours is removed when the config has no [xdp].
    let xdp = match &config.xdp {
        Some(xdp) => {
            crate::xdp::XdpFilter::start(xdp, &pin_dir, &config.listener_addresses()).map(Some)
        }
        None => crate::xdp::remove_stale(&pin_dir).map(|()| None),
    };
    let xdp = match xdp {
        Ok(xdp) => xdp,
        Err(e) => {
            unpin_dataplanes(&dataplanes, &pin_dir);
            return Err(e);
        }
    };

    let notify = NotifySocket::bind(&service)?;
    let notify_fd = notify.raw_fd();
    let spec = Arc::new(WorkerSpec {
        notify_socket: notify.env_value.clone(),
        ..(*spec).clone()
    });
    let registry = Registry::default();
    tokio::spawn(notify.serve(registry.clone()));
    let control_path = config.control_socket();
    let listener = control::bind(&control_path)?;

    let shared: Shared = Arc::new(Mutex::new(State {
        config: config.clone(),
        dataplanes,
        generations: Vec::new(),
        next_generation: 1,
        upgrading_to: None,
        spec: spec.clone(),
        registry,
        xdp,
    }));

    let progress = Progress::new(None);
    let first = upgrade::begin(&shared, &config)?;
    if let Err(e) = upgrade::run(&shared, first, config.clone(), spec, &progress).await {
        unpin_everything(&shared, &pin_dir);
        let _ = std::fs::remove_file(&control_path);
        return Err(e.context(format!(
            "service {service}: the first generation did not start"
        )));
    }
    systemd::ready(&format!("generation {first} serving"));
    serve(shared, config_path, listener, lock, notify_fd).await
}

/// The start of a re-exec'd image: everything taken over, nothing started.
async fn run_adopted(config_path: &Path, handoff_path: &Path) -> Result<()> {
    let adopted = crate::reexec::read(handoff_path)?;
    let config = Config::load(config_path)?;
    let lock = Flock::lock(File::from(adopted.lock), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("re-taking the service lock: {e}"))?;
    let pin_dir = config.pin_dir();
    let dataplanes = config
        .listeners
        .iter()
        .map(|l| ListenerDataplane::adopt(&l.name, &pin_dir.join(&l.name)))
        .collect::<Result<Vec<_>>>()?;
    let xdp = match &config.xdp {
        Some(xdp) => Some(crate::xdp::XdpFilter::start(
            xdp,
            &pin_dir,
            &config.listener_addresses(),
        )?),
        None => None,
    };
    let notify = NotifySocket::from_fd(adopted.notify, adopted.handoff.notify_name.clone())?;
    let notify_fd = notify.raw_fd();
    let registry = Registry::default();
    tokio::spawn(notify.serve(registry.clone()));
    let listener = std::os::unix::net::UnixListener::from(adopted.control);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let inherited_env = std::env::vars()
        .filter(|(key, _)| !systemd::is_supervisor_only_env(key))
        .collect();
    let spec = Arc::new(crate::reexec::spec(&adopted.handoff, inherited_env)?);
    let generation = crate::reexec::adopt_generation(
        &adopted.handoff,
        adopted.sockets,
        &pin_dir,
        &spec,
        &registry,
    )?;
    let number = generation.number;
    let workers = generation.workers.len();
    let shared: Shared = Arc::new(Mutex::new(State {
        config,
        dataplanes,
        generations: vec![generation],
        next_generation: adopted.handoff.next_generation,
        upgrading_to: None,
        spec,
        registry,
        xdp,
    }));
    tracing::info!("re-executed: adopted generation {number} and its {workers} workers");
    systemd::ready(&format!("generation {number} serving"));
    serve(shared, config_path, listener, lock, notify_fd).await
}

/// The event loop, then the shutdown that follows it.
async fn serve(
    shared: Shared,
    config_path: &Path,
    listener: tokio::net::UnixListener,
    lock: Flock<File>,
    notify_fd: std::os::fd::RawFd,
) -> Result<()> {
    let (service, pin_dir, control_path) = {
        let state = shared.lock().unwrap();
        (
            state.config.service.name.clone(),
            state.config.pin_dir(),
            state.config.control_socket(),
        )
    };
    let result = event_loop(
        &shared,
        config_path.to_path_buf(),
        listener,
        &lock,
        notify_fd,
    )
    .await;

    let drain_timeout = shared.lock().unwrap().config.service.drain_timeout;
    systemd::stopping("draining all generations");
    upgrade::stop_all(&shared, drain_timeout, &Progress::new(None)).await;
    unpin_everything(&shared, &pin_dir);
    let _ = std::fs::remove_file(&control_path);
    tracing::info!("service {service}: stopped");
    drop(lock);
    result
}

fn unpin_everything(shared: &Shared, pin_dir: &Path) {
    unpin_dataplanes(&shared.lock().unwrap().dataplanes, pin_dir);
}

/// Removes the listeners' selector pins, and the service directory when nothing
/// else (an XDP link, which outlives the supervisor by design) is left in it.
fn unpin_dataplanes(dataplanes: &[ListenerDataplane], pin_dir: &Path) {
    for dataplane in dataplanes {
        dataplane.unpin_all();
    }
    let _ = std::fs::remove_dir(pin_dir);
}

/// One supervisor per service: an exclusive, non-blocking flock on
/// `<runtime_dir>/<service>.lock`, released by the kernel when we die.
fn lock(config: &Config) -> Result<Flock<File>> {
    let path = config.lock_file();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| InputError::new(format!("cannot open lock file {}: {e}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        InputError::new(format!(
            "another supervisor is already running service {:?} (lock {} is held: {e})",
            config.service.name,
            path.display()
        ))
        .into()
    })
}

/// Resolves the command (so a missing program is reported now, not at fork time)
/// and the user the workers run as.
pub fn worker_spec(config: &Config, notify_socket: String) -> Result<WorkerSpec, InputError> {
    let command = &config.service.command;
    let program = resolve_program(&command[0]).ok_or_else(|| {
        InputError::new(format!(
            "{}: service.command: {:?} is not an executable file{}",
            config.path.display(),
            command[0],
            if command[0].contains('/') {
                ""
            } else {
                " found in PATH"
            }
        ))
    })?;
    let credentials = match &config.service.user {
        None => None,
        Some(name) => {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    InputError::new(format!(
                        "{}: service.user: no user {name:?} on this host",
                        config.path.display()
                    ))
                })?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        }
    };
    let inherited_env = std::env::vars()
        .filter(|(key, _)| !systemd::is_supervisor_only_env(key))
        .collect();
    Ok(WorkerSpec {
        program: program.to_string_lossy().into_owned(),
        argv: command.clone(),
        inherited_env,
        notify_socket,
        credentials,
        ready: config.service.ready,
        drain_signal: config.service.drain_signal,
    })
}

fn resolve_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        let path = if path.is_relative() {
            std::env::current_dir().ok()?.join(path)
        } else {
            path
        };
        return executable(&path).then_some(path);
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| executable(p))
}

enum Command {
    Stop,
    /// Exec `binary` in place (see `reexec`); the sender hears why if it fails.
    Reexec {
        binary: PathBuf,
        reply: tokio::sync::oneshot::Sender<String>,
    },
}

async fn event_loop(
    shared: &Shared,
    config_path: PathBuf,
    listener: tokio::net::UnixListener,
    lock: &Flock<File>,
    notify_fd: std::os::fd::RawFd,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<Command>();
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    // The selector's flow clock (see `control_index::CLOCK_MS`) ticks only while a
    // listener uses `flow`; otherwise the word is 0 and the selector reads the
    // kernel's clock, and the daemon only wakes up to look again now and then.
    let clock = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(clock);
    let mut clock_ticking = true;
    let config_path = Arc::new(Mutex::new(config_path));
    let mut upgrades: Vec<JoinHandle<()>> = Vec::new();
    loop {
        upgrades.retain(|task| !task.is_finished());
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining and stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining and stopping"); break; }
            _ = sighup.recv() => {
                let path = config_path.lock().unwrap().clone();
                tracing::info!("SIGHUP: upgrading with {}", path.display());
                let shared = shared.clone();
                upgrades.push(tokio::spawn(async move {
                    if let Err(e) = upgrade_from_file(&shared, &path, Progress::new(None)).await {
                        tracing::error!("upgrade refused or failed: {e:#}");
                    }
                }));
            }
            Some(command) = commands.recv() => match command {
                Command::Stop => { tracing::info!("stop requested"); break; }
                Command::Reexec { binary, reply } => {
                    let path = config_path.lock().unwrap().clone();
                    let fds = crate::reexec::DaemonFds {
                        lock: std::os::fd::AsRawFd::as_raw_fd(&**lock),
                        notify: notify_fd,
                        control: std::os::fd::AsRawFd::as_raw_fd(&listener),
                    };
                    // Only returns if the exec did not happen.
                    let why = reexec_now(shared, &path, &binary, &fds);
                    tracing::error!("re-exec refused or failed: {why}");
                    let _ = reply.send(why);
                }
            },
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => { tracing::warn!("control socket: {e}"); continue; }
                };
                if !control::peer_allowed(&stream) {
                    tracing::warn!("control connection from a user that may not control this supervisor: refused");
                    continue;
                }
                let shared = shared.clone();
                let commands_tx = commands_tx.clone();
                let config_path = config_path.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(&shared, stream, commands_tx, config_path).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            _ = &mut clock => {
                let state = shared.lock().unwrap();
                let flow = state.config.listeners.iter().any(|l| l.balance.0 == supervisor_common::BalanceMode::Flow);
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
        }
    }
    for task in upgrades {
        task.abort();
    }
    Ok(())
}

/// Checks, writes the handoff and execs `binary`; returns why not if it did not.
fn reexec_now(
    shared: &Shared,
    config_path: &Path,
    binary: &Path,
    fds: &crate::reexec::DaemonFds,
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
    let (handoff, kept) = match crate::reexec::prepare(&state, config_path, fds) {
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
    let error = crate::reexec::exec(binary, config_path, &handoff);
    crate::reexec::abort(&handoff, &kept);
    format!("exec {}: {error}", binary.display())
}

/// Re-reads the config and upgrades. `InputError`s mean nothing changed.
async fn upgrade_from_file(shared: &Shared, path: &Path, progress: Progress) -> Result<u32> {
    let config = Config::load(path)?;
    let spec = {
        let state = shared.lock().unwrap();
        let notify_socket = state.spec.notify_socket.clone();
        drop(state);
        Arc::new(worker_spec(&config, notify_socket)?)
    };
    let number = upgrade::begin(shared, &config)?;
    systemd::reloading(&format!("upgrading to generation {number}"));
    let result = upgrade::run(shared, number, config, spec, &progress).await;
    let serving = serving_generation(shared);
    match &result {
        Ok(()) => systemd::ready(&format!("generation {number} serving")),
        Err(e) => systemd::ready(&format!(
            "upgrade to generation {number} failed ({e:#}); generation {serving} serving"
        )),
    }
    result.map(|()| number)
}

fn serving_generation(shared: &Shared) -> u32 {
    shared
        .lock()
        .unwrap()
        .generations
        .iter()
        .filter(|g| g.state == upgrade::GenerationState::Serving)
        .map(|g| g.number)
        .max()
        .unwrap_or(0)
}

async fn serve_connection(
    shared: &Shared,
    stream: UnixStream,
    commands: mpsc::UnboundedSender<Command>,
    config_path: Arc<Mutex<PathBuf>>,
) -> Result<()> {
    let mut stream = BufReader::new(stream);
    let request = match control::read_request(&mut stream).await {
        Ok(request) => request,
        Err(e) => {
            let message = format!("{e:#}");
            control::send(
                &mut stream,
                &Event::Error {
                    exit_code: 2,
                    message,
                },
            )
            .await?;
            return Ok(());
        }
    };
    match request {
        Request::Status => {
            let status = status::collect(&shared.lock().unwrap());
            control::send(
                &mut stream,
                &Event::Status {
                    status: serde_json::to_value(status)?,
                },
            )
            .await?;
        }
        Request::Reexec { binary } => {
            let (reply, failed) = tokio::sync::oneshot::channel();
            control::send(
                &mut stream,
                &Event::Phase {
                    at_ms: 0,
                    text: format!("re-executing {}", binary.display()),
                },
            )
            .await?;
            let _ = commands.send(Command::Reexec { binary, reply });
            // On success this process image is gone and the connection closes
            // with it; an answer here means the exec did not happen.
            if let Ok(why) = failed.await {
                // Nothing changed (the handoff was undone): a refusal.
                control::send(
                    &mut stream,
                    &Event::Error {
                        exit_code: 2,
                        message: why,
                    },
                )
                .await?;
            }
        }
        Request::Stop => {
            let _ = commands.send(Command::Stop);
            control::send(
                &mut stream,
                &Event::Done {
                    message: "stopping: draining all generations".into(),
                },
            )
            .await?;
        }
        Request::Upgrade { config } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let progress = Progress::new(Some(tx));
            let shared_for_task = shared.clone();
            let path = config.clone();
            // The upgrade runs in its own task: it completes even if the CLI goes away.
            let task =
                tokio::spawn(
                    async move { upgrade_from_file(&shared_for_task, &path, progress).await },
                );
            while let Some((at_ms, text)) = rx.recv().await {
                // A CLI that went away does not stop the upgrade.
                let _ = control::send(&mut stream, &Event::Phase { at_ms, text }).await;
            }
            let final_event = match task.await {
                Ok(Ok(number)) => {
                    *config_path.lock().unwrap() = config;
                    Event::Done {
                        message: format!("generation {number} serves"),
                    }
                }
                Ok(Err(e)) => Event::Error {
                    exit_code: exit_code(&e),
                    message: format!("{e:#}"),
                },
                Err(e) => Event::Error {
                    exit_code: 1,
                    message: format!("upgrade task ended: {e}"),
                },
            };
            control::send(&mut stream, &final_event).await?;
        }
    }
    Ok(())
}

/// Without a `flow` listener, how often the event loop checks whether one appeared.
const CLOCK_IDLE_CHECK: Duration = Duration::from_millis(500);

/// How long the CLI waits for the daemon's answer to a status request.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
