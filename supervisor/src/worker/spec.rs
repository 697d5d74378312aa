//! What a generation's workers are exec'd with: the resolved command, the user,
//! the environment (the worker contract in `docs/worker-contract.md`).
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use super::SlotSockets;
use crate::{
    config::{Config, Handoff, ReadyMode},
    error::InputError,
    systemd,
};

/// What every worker of a generation is exec'd with.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Resolved path of `command[0]`.
    pub program: String,
    pub argv: Vec<String>,
    /// The supervisor's environment minus what belongs to the supervisor itself.
    pub inherited_env: Vec<(String, String)>,
    pub notify_socket: String,
    pub credentials: Option<(u32, u32)>,
    /// `service.no_new_privs`: workers cannot gain privileges through exec.
    pub no_new_privs: bool,
    pub ready: ReadyMode,
    pub drain_signal: Signal,
    /// `service.handoff`.
    pub handoff: Handoff,
}

impl WorkerSpec {
    /// Resolves the command (so a missing program is reported now, not at fork time)
    /// and the user the workers run as.
    pub fn from_config(config: &Config, notify_socket: String) -> Result<WorkerSpec, InputError> {
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
        if let Some((uid, gid)) = credentials {
            crate::trust::check_searchable_by(
                &config.service.runtime_dir,
                uid,
                gid,
                &config.key("service.runtime_dir"),
            )?;
        }
        if config.service.handoff == Handoff::Bind {
            check_bind_handoff(
                config,
                crate::sys::seccomp::user_notification_available,
                crate::procfs::has_effective_capability(crate::bpffs::CAP_SYS_ADMIN),
            )?;
        }
        let inherited_env = systemd::worker_inherited_env();
        Ok(WorkerSpec {
            program: program.to_string_lossy().into_owned(),
            argv: command.clone(),
            inherited_env,
            notify_socket,
            credentials,
            no_new_privs: config.service.no_new_privs,
            ready: config.service.ready,
            drain_signal: config.service.drain_signal,
            handoff: config.service.handoff,
        })
    }
}

/// What `handoff = "bind"` needs of the host: seccomp user notification (Linux
/// 5.0, `SECCOMP_ADDFD_FLAG_SETFD` 5.14), not denied to the supervisor by a
/// seccomp filter of its own (a container runtime's, say; `probe` is
/// [`crate::sys::seccomp::user_notification_available`]), and either
/// `service.no_new_privs` or `CAP_SYS_ADMIN` (the kernel installs a filter for
/// a process without that capability only under no_new_privs).
pub(crate) fn check_bind_handoff(
    config: &Config,
    probe: impl FnOnce() -> std::io::Result<()>,
    cap_sys_admin: bool,
) -> Result<(), InputError> {
    if let Err(e) = probe() {
        return Err(InputError::new(format!(
            "{}: service.handoff = \"bind\": seccomp user notification is not available here ({e}); \
             it needs Linux 5.14 or later and no seccomp filter on the supervisor that denies seccomp(); \
             use handoff = \"listen-fds\" instead",
            config.path.display()
        )));
    }
    if !config.service.no_new_privs && !cap_sys_admin {
        return Err(InputError::new(format!(
            "{}: service.handoff = \"bind\" with no_new_privs = false needs CAP_SYS_ADMIN \
             (without it the kernel installs the bind filter only under no_new_privs)",
            config.path.display()
        )));
    }
    Ok(())
}

pub fn resolve_program(name: &str) -> Option<PathBuf> {
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

/// The environment of slot `index`'s worker: the inherited one plus the socket
/// activation and supervisor variables (the contract in `docs/`).
pub(super) fn worker_env(
    spec: &WorkerSpec,
    sockets: &SlotSockets,
    generation: u32,
    index: u32,
) -> Vec<(String, String)> {
    let mut env = spec.inherited_env.clone();
    match spec.handoff {
        Handoff::ListenFds => env.extend([
            ("LISTEN_FDS".into(), sockets.fds.len().to_string()),
            ("LISTEN_FDNAMES".into(), sockets.names.join(":")),
        ]),
        // No socket activation: the worker binds its own. Its listeners are
        // named for `sockets::check_address` (a restarted supervisor tells its
        // workers' sockets from a stranger's by them).
        Handoff::Bind => env.push(("SUPERVISOR_BIND_LISTENERS".into(), sockets.names.join(":"))),
    }
    env.extend([
        ("NOTIFY_SOCKET".into(), spec.notify_socket.clone()),
        ("SUPERVISOR_GENERATION".into(), generation.to_string()),
        ("SUPERVISOR_WORKER".into(), index.to_string()),
        // Beyond the contract, for workers that make the drain signal configurable
        // (the examples and the SDK read it).
        (
            "SUPERVISOR_DRAIN_SIGNAL".into(),
            spec.drain_signal.as_str().to_string(),
        ),
        (
            "SUPERVISOR_COOKIES".into(),
            sockets
                .cookies
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(":"),
        ),
    ]);
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_config(no_new_privs: bool) -> Config {
        let text = format!(
            "[service]\nname = \"x\"\ncommand = [\"/bin/true\"]\nhandoff = \"bind\"\nno_new_privs = {no_new_privs}\n\n[[listen]]\nname = \"dns\"\naddress = \"127.0.0.1:5353\"\n"
        );
        let mut config: Config = toml::from_str(&text).unwrap();
        config.path = "/etc/x.toml".into();
        config
    }

    /// Where the kernel (or a filter on the supervisor) refuses seccomp user
    /// notification, `handoff = "bind"` is bad input that says why.
    #[test]
    fn bind_handoff_refused_where_user_notification_is_unavailable() {
        let unavailable = || Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        let err = check_bind_handoff(&bind_config(true), unavailable, true).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/etc/x.toml: service.handoff = \"bind\""),
            "{text}"
        );
        assert!(
            text.contains("seccomp user notification is not available"),
            "{text}"
        );
        assert!(text.contains("handoff = \"listen-fds\""), "{text}");
        check_bind_handoff(&bind_config(true), || Ok(()), false).unwrap();
        let err = check_bind_handoff(&bind_config(false), || Ok(()), false).unwrap_err();
        assert!(err.to_string().contains("needs CAP_SYS_ADMIN"), "{err}");
        check_bind_handoff(&bind_config(false), || Ok(()), true).unwrap();
    }
}
