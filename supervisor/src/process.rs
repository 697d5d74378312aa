//! Starting and watching worker processes, behind a seam.
//!
//! A worker slot ([`crate::worker`]) needs four things from the operating system:
//! start a program with some fds and an environment, know its pid, signal it, and
//! learn when it exits. [`Launcher`] and [`Process`] are exactly that, so the upgrade
//! state machine and the slots can run against [`ForkExec`] (real processes,
//! pidfds) in the daemon, and against scripted stand-ins in unit tests that need
//! no root and no fork.
use std::{
    future::Future,
    io,
    os::fd::{AsFd, OwnedFd, RawFd},
    pin::Pin,
};

use tokio::io::unix::AsyncFd;

pub use crate::sys::ExitStatus;
use crate::sys::{self, PreparedExec};

/// What to exec for one worker.
pub struct ExecRequest<'a> {
    /// A resolved path (never looked up in `PATH` here).
    pub program: &'a str,
    pub argv: &'a [String],
    /// The whole environment, except `LISTEN_PID`, which the child writes itself.
    pub env: &'a [(String, String)],
    /// Placed at fds 3, 4, ... in the child, in this order.
    pub fds: &'a [RawFd],
    /// `(uid, gid)` to drop to before exec.
    pub credentials: Option<(u32, u32)>,
    /// `PR_SET_NO_NEW_PRIVS`, and with `credentials` an empty bounding set.
    pub no_new_privs: bool,
    /// `service.handoff = "bind"`: run the worker under the bind filter, and
    /// no `LISTEN_PID` (it is not given `LISTEN_FDS` either).
    pub bind_filter: bool,
}

/// The future [`Process::exited`] returns.
pub type ExitFuture<'a> = Pin<Box<dyn Future<Output = io::Result<ExitStatus>> + Send + 'a>>;

/// Starts workers, or takes over ones that are already running.
pub trait Launcher: Send + Sync {
    /// Starts `request`; returns once the exec has happened, or with why it could not.
    fn spawn(&self, request: &ExecRequest<'_>) -> io::Result<Box<dyn Process>>;
    /// A process this supervisor (an earlier image of it, or a supervisor of the
    /// same service that died) started, by pid; with `start_time` (see
    /// `procfs::start_time`) it is taken only if the pid still names that process.
    fn adopt(&self, pid: i32, start_time: Option<u64>) -> io::Result<Box<dyn Process>>;
}

/// One running worker.
pub trait Process: Send {
    fn pid(&self) -> i32;
    /// Sends `signal`; a process that already exited is not an error.
    fn signal(&self, signal: i32) -> io::Result<()>;
    /// Resolves when the process has exited (and was reaped). Cancel-safe: dropping
    /// the future loses nothing, the next call waits again.
    fn exited(&mut self) -> ExitFuture<'_>;
    /// The seccomp listener its `bind()` calls arrive on, once (for a worker
    /// spawned with [`ExecRequest::bind_filter`]).
    fn take_bind_listener(&mut self) -> Option<OwnedFd> {
        None
    }
}

/// SIGKILL to the process behind `pidfd` (pid `pid`) and to its process group.
/// A killed worker takes what it started with it: a shell wrapper's `sleep`, a
/// helper. Every worker leads its own process group (set between fork and exec),
/// and that group id cannot name anything else while the worker is unreaped or a
/// member of its group lives. A process already gone is not an error.
pub fn kill_with_group(pidfd: std::os::fd::BorrowedFd<'_>, pid: i32) -> io::Result<()> {
    sys::pidfd_signal(pidfd, libc::SIGKILL)?;
    match nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The real launcher: fork + exec (see [`sys::spawn_worker`]), watched through pidfds.
pub struct ForkExec;

impl Launcher for ForkExec {
    fn spawn(&self, request: &ExecRequest<'_>) -> io::Result<Box<dyn Process>> {
        let mut prepared = PreparedExec::new(
            request.program,
            request.argv,
            request.env,
            !request.bind_filter,
            request.fds.to_vec(),
            request.credentials,
            request.no_new_privs,
        )?;
        if request.bind_filter {
            prepared = prepared.with_bind_filter()?;
        }
        let spawned = sys::spawn_worker(&mut prepared)?;
        let mut process = PidfdProcess::new(spawned.pid, spawned.pidfd)?;
        process.bind_listener = spawned.bind_listener;
        Ok(Box::new(process))
    }

    fn adopt(&self, pid: i32, start_time: Option<u64>) -> io::Result<Box<dyn Process>> {
        // After a re-exec the pid is still our child, so a pidfd on it is as good
        // as one from fork and waitid still reaps it. After a restart it is not our
        // child: the pidfd is opened first and the start time read after, so a pid
        // reused before the open shows a different start time and is refused.
        let pidfd = sys::pidfd_open(pid)?;
        if let Some(expected) = start_time
            && crate::procfs::start_time(pid) != Some(expected)
        {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} is no longer the worker that was recorded"),
            ));
        }
        Ok(Box::new(PidfdProcess::new(pid, pidfd)?))
    }
}

struct PidfdProcess {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    bind_listener: Option<OwnedFd>,
}

impl PidfdProcess {
    fn new(pid: i32, pidfd: OwnedFd) -> io::Result<PidfdProcess> {
        Ok(PidfdProcess {
            pid,
            pidfd: sys::register_async(pidfd)?,
            bind_listener: None,
        })
    }
}

impl Process for PidfdProcess {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        if signal == libc::SIGKILL {
            return kill_with_group(self.pidfd.get_ref().as_fd(), self.pid);
        }
        // The drain signal goes to the worker alone: what it does with its
        // children is its own business.
        sys::pidfd_signal(self.pidfd.get_ref().as_fd(), signal)
    }

    fn take_bind_listener(&mut self) -> Option<OwnedFd> {
        self.bind_listener.take()
    }

    fn exited(&mut self) -> ExitFuture<'_> {
        Box::pin(async move {
            loop {
                // A pidfd becomes readable when its process exits.
                let mut guard = self.pidfd.readable().await?;
                match sys::pidfd_try_wait(self.pidfd.get_ref().as_fd()) {
                    Ok(Some(exit)) => return Ok(exit),
                    Ok(None) => guard.clear_ready(),
                    // Not our child (adopted after a restart): readable means it
                    // exited; its parent, not us, reaps it and sees the status.
                    Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                        return Ok(ExitStatus::Unknown);
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
}
