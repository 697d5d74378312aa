//! Starting a worker: fork + exec with its sockets at 3.., `LISTEN_PID` written in
//! the child, privileges dropped, and nothing else inherited.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use super::{
    pidfd::pidfd_open,
    seccomp::{BindFilter, install_bind_filter, send_fd},
};

/// Everything a worker's exec needs, allocated before fork: after fork in a
/// multi-threaded process the child may only call async-signal-safe functions, so it
/// must not allocate (another thread may have held the allocator's lock at fork time).
pub struct PreparedExec {
    program: CString,
    /// NUL-terminated argv strings; `argv_ptrs` points into them.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Environment entries as owned byte buffers, each NUL-terminated. The
    /// `LISTEN_PID=` entry has room for any pid; the child writes its own pid there.
    env: Vec<Vec<u8>>,
    listen_pid_entry: Option<usize>,
    /// fds to place at 3, 4, ... in the child, in order.
    fds: Vec<RawFd>,
    /// Scratch space for the child's first pass over `fds` (see `spawn_worker`):
    /// one entry per fd, allocated here because the child may not allocate.
    staging: Vec<RawFd>,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// `PR_SET_NO_NEW_PRIVS` in the child; with `credentials`, also an empty
    /// capability bounding set.
    no_new_privs: bool,
    /// `service.handoff = "bind"`: the worker runs under the bind filter.
    bind_handoff: Option<BindHandoffChannel>,
}

/// The bind filter and the socket pair its listener fd comes back through.
struct BindHandoffChannel {
    filter: BindFilter,
    child_end: OwnedFd,
    parent_end: OwnedFd,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Digits reserved for the pid (pid_max is at most 2^22, 7 digits).
const PID_DIGITS: usize = 20;

impl PreparedExec {
    /// `program` must be a path (the caller resolves `PATH` beforehand, so a missing
    /// command is reported before anything is forked).
    pub fn new(
        program: &str,
        argv: &[String],
        env: &[(String, String)],
        with_listen_pid: bool,
        fds: Vec<RawFd>,
        credentials: Option<(u32, u32)>,
        no_new_privs: bool,
    ) -> io::Result<Self> {
        let cstring = |s: &str| {
            CString::new(s).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{s:?} contains a NUL byte"),
                )
            })
        };
        let program = cstring(program)?;
        let argv: Vec<CString> = argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        let mut entries: Vec<Vec<u8>> = Vec::with_capacity(env.len() + 1);
        for (key, value) in env {
            let entry = cstring(&format!("{key}={value}"))?;
            entries.push(entry.into_bytes_with_nul());
        }
        let listen_pid_entry = with_listen_pid.then(|| {
            let mut entry = LISTEN_PID_PREFIX.to_vec();
            entry.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
            entries.push(entry);
            entries.len() - 1
        });
        Ok(PreparedExec {
            program,
            _argv: argv,
            argv_ptrs,
            env: entries,
            listen_pid_entry,
            staging: vec![-1; fds.len()],
            fds,
            credentials,
            no_new_privs,
            bind_handoff: None,
        })
    }

    /// The worker's `bind()` calls go to the supervisor (seccomp user
    /// notification, see `sys::seccomp`); [`Spawned::bind_listener`] is the fd
    /// they arrive on.
    pub fn with_bind_filter(mut self) -> io::Result<Self> {
        let (parent_end, child_end) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        self.bind_handoff = Some(BindHandoffChannel {
            filter: BindFilter::new(),
            child_end,
            parent_end,
        });
        Ok(self)
    }
}

/// A forked and exec'd worker.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The seccomp listener of a worker spawned [`PreparedExec::with_bind_filter`].
    pub bind_listener: Option<OwnedFd>,
}

/// Forks and execs a worker. Returns once the exec has succeeded (or with the exec's
/// error: `ENOENT`, `EACCES`, ...), so a bad command fails the generation at once.
///
/// The child: joins its own process group (a Ctrl-C on the supervisor's terminal
/// must not reach workers before the supervisor drains them), resets
/// signal dispositions and mask, places the sockets at 3.. without `FD_CLOEXEC`,
/// marks every fd above them close-on-exec (whatever the supervisor's launcher
/// left open reaches no worker), drops privileges if asked, writes `LISTEN_PID`,
/// and execs.
///
/// Privileges: with credentials, the inheritable and ambient capability sets are
/// cleared and, if `no_new_privs`, the bounding set emptied, all while still root
/// (dropping bounding caps needs `CAP_SETPCAP`); then groups, gid, uid. With
/// `no_new_privs`, `PR_SET_NO_NEW_PRIVS` last: no setuid bit or file capability
/// gives the worker anything at exec.
///
/// No `PR_SET_PDEATHSIG`: a worker outlives a supervisor that dies, and keeps
/// serving until a new one adopts it (see `recover`).
pub fn spawn_worker(prepared: &mut PreparedExec) -> io::Result<Spawned> {
    // Pointers into `prepared`, taken before fork so the child only reads them.
    let mut env_ptrs: Vec<*const libc::c_char> =
        prepared.env.iter().map(|e| e.as_ptr().cast()).collect();
    env_ptrs.push(std::ptr::null());
    let listen_pid_buf: Option<*mut u8> = prepared
        .listen_pid_entry
        .map(|i| prepared.env[i].as_mut_ptr());
    let fd_count = prepared.fds.len() as RawFd;

    // A pipe whose write end is close-on-exec: a successful exec closes it (the
    // parent reads EOF); a failed one writes errno into it first.
    let mut pipe_fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read_end, write_end) = unsafe {
        (
            OwnedFd::from_raw_fd(pipe_fds[0]),
            OwnedFd::from_raw_fd(pipe_fds[1]),
        )
    };

    // SAFETY: after fork the child calls only async-signal-safe functions (setpgid,
    // prctl, sigprocmask, sigaction via signal, seccomp, sendmsg, fcntl, dup2, the raw
    // close_range, prlimit64, capget and capset syscalls, setgroups, setgid,
    // setuid, getpid, write, execve, _exit) and touches only memory that was
    // allocated before the fork or lives on its own stack; it never returns from
    // this block.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child. Any failure: report errno through the pipe and _exit.
        // SAFETY: the fork invariant above: only async-signal-safe calls, on memory
        // allocated before the fork (`prepared`, `env_ptrs`, the staging table).
        unsafe {
            let fail = |write_fd: RawFd| -> ! {
                let errno = *libc::__errno_location();
                let bytes = errno.to_ne_bytes();
                libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127);
            };
            // Move the pipe's write end above the socket range first: dup2 below
            // may overwrite any fd in 3..3+n.
            let report = libc::fcntl(write_end.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3 + fd_count);
            if report < 0 {
                libc::_exit(127);
            }
            libc::setpgid(0, 0);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // exec keeps ignored signals ignored; Rust ignores SIGPIPE at startup,
            // and a worker must get the defaults a shell would give it.
            for signal in 1..32 {
                if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            // Before the sockets are placed (they may land on the socket pair's
            // fd number) and while still root (CAP_SYS_ADMIN allows the filter
            // without no_new_privs); the filter only stops bind(), so nothing
            // below is affected by it.
            if let Some(handoff) = &prepared.bind_handoff
                && !install_bind_filter_in_child(handoff, prepared.no_new_privs)
            {
                fail(report);
            }
            // Two passes so that a source fd already inside 3..3+n is not
            // clobbered before it is copied: first above the range, then into it.
            // `staging` has exactly one entry per fd, however many listeners
            // and sockets the worker is owed.
            for (slot, &fd) in prepared.staging.iter_mut().zip(prepared.fds.iter()) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + fd_count);
                if *slot < 0 {
                    fail(report);
                }
            }
            for (i, &fd) in prepared.staging.iter().enumerate() {
                // dup2 gives the new fd no FD_CLOEXEC: it survives exec.
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    fail(report);
                }
            }
            // Everything above the sockets closes at exec: the supervisor's own
            // fds are close-on-exec already, but what its launcher left open
            // (a file, a lock) is not. The staging copies and `report` are
            // close-on-exec too.
            if !cloexec_from(3 + fd_count) {
                fail(report);
            }
            if let Some((uid, gid)) = prepared.credentials
                && (!clear_inheritable_and_ambient()
                    || (prepared.no_new_privs && !empty_bounding_set())
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                fail(report);
            }
            if prepared.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(report);
            }
            if let Some(buf) = listen_pid_buf {
                write_pid(buf.add(LISTEN_PID_PREFIX.len()), libc::getpid());
            }
            libc::execve(
                prepared.program.as_ptr(),
                prepared.argv_ptrs.as_ptr(),
                env_ptrs.as_ptr(),
            );
            fail(report);
        }
    }

    // Parent.
    drop(write_end);
    let mut errno_bytes = [0u8; 4];
    let mut read = 0;
    while read < errno_bytes.len() {
        // SAFETY: reading into our own buffer from an fd we own.
        let n = unsafe {
            libc::read(
                read_end.as_raw_fd(),
                errno_bytes[read..].as_mut_ptr().cast(),
                errno_bytes.len() - read,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        read += n as usize;
    }
    if read == errno_bytes.len() {
        // The exec failed: reap the child so it leaves no zombie, report why.
        let mut status = 0;
        // SAFETY: pid is our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(
            errno_bytes,
        )));
    }
    let pidfd = pidfd_open(pid)?;
    let bind_listener = match &prepared.bind_handoff {
        Some(handoff) => Some(super::seccomp::receive_fd(std::os::fd::AsFd::as_fd(
            &handoff.parent_end,
        ))?),
        None => None,
    };
    Ok(Spawned {
        pid,
        pidfd,
        bind_listener,
    })
}

/// The child's half of the bind handoff: installs the filter (with
/// `PR_SET_NO_NEW_PRIVS` first if the worker gets it anyway) and sends its
/// listener fd to the supervisor. False on failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls: for the child between fork and exec.
unsafe fn install_bind_filter_in_child(handoff: &BindHandoffChannel, no_new_privs: bool) -> bool {
    // SAFETY: the caller's invariant; the filter was built before fork.
    let listener = unsafe { install_bind_filter(&handoff.filter, no_new_privs) };
    if listener < 0 {
        return false;
    }
    // SAFETY: as above; both fds are open in this process.
    let sent = unsafe { send_fd(handoff.child_end.as_raw_fd(), listener) };
    // SAFETY: the listener fd is ours; the supervisor has its own copy now.
    unsafe { libc::close(listener) };
    sent
}

/// Marks every fd from `first` on close-on-exec, without allocating (for the child
/// after fork): `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)` (Linux 5.11), else
/// `fcntl` on each fd number up to the soft `RLIMIT_NOFILE`. False on failure,
/// with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls; the caller must be able to live with every fd
/// from `first` on closing at exec.
unsafe fn cloexec_from(first: RawFd) -> bool {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return true;
    }
    // SAFETY: errno is thread-local and this thread's.
    let errno = unsafe { *libc::__errno_location() };
    if errno != libc::ENOSYS && errno != libc::EINVAL {
        return false;
    }
    let mut limit = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 on ourselves (pid 0) writes the current limits into `limit`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            libc::RLIMIT_NOFILE,
            std::ptr::null::<libc::rlimit64>(),
            &mut limit as *mut libc::rlimit64,
        )
    };
    if ret != 0 {
        return false;
    }
    let end = limit.rlim_cur.min(libc::c_int::MAX as u64) as RawFd;
    for fd in first..end {
        // SAFETY: fcntl with integer arguments; EBADF for fds that are not open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    true
}

/// `capget`/`capset`'s header and data (`_LINUX_CAPABILITY_VERSION_3`: two
/// data structs, for capabilities 0-31 and 32-63).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties this thread's inheritable capability set (keeping effective and
/// permitted, which the uid change below clears) and its ambient set. Without
/// allocating (for the child after fork). False on failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls.
unsafe fn clear_inheritable_and_ambient() -> bool {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid for the kernel to read and write (two
    // data structs, as version 3 requires).
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return false;
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    // SAFETY: as above; capset only reads them.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return false;
    }
    // SAFETY: prctl with integer arguments. EINVAL: a kernel without ambient
    // capabilities (before 4.3), which has none to clear.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: errno is thread-local and this thread's.
    ret == 0 || unsafe { *libc::__errno_location() } == libc::EINVAL
}

/// Drops every capability from this thread's bounding set (`PR_CAPBSET_DROP`
/// from 0 up to the first number the kernel does not know), so that nothing
/// exec'd later can gain one. Needs `CAP_SETPCAP`. Without allocating. False on
/// failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls.
unsafe fn empty_bounding_set() -> bool {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // SAFETY: errno is thread-local and this thread's.
            return unsafe { *libc::__errno_location() } == libc::EINVAL && cap > 0;
        }
    }
    true
}

/// Writes `pid` as decimal digits followed by NUL at `dst`, without allocating.
///
/// # Safety
/// `dst` must have room for `PID_DIGITS + 1` bytes.
unsafe fn write_pid(dst: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = pid as u64;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == PID_DIGITS {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= PID_DIGITS, within the caller's buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= PID_DIGITS, and the buffer has PID_DIGITS + 1 bytes.
    unsafe { *dst.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::sys::pidfd::{ExitStatus, pidfd_try_wait};

    #[test]
    fn pid_is_written_as_decimal() {
        let mut buf = [0xffu8; PID_DIGITS + 1];
        // SAFETY: the buffer has PID_DIGITS + 1 bytes.
        unsafe { write_pid(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
        // SAFETY: as above.
        unsafe { write_pid(buf.as_mut_ptr(), 7) };
        assert_eq!(&buf[..2], b"7\0");
    }

    #[test]
    fn spawn_reports_exec_errors_and_sets_listen_pid() {
        let mut missing = PreparedExec::new(
            "/nonexistent/worker",
            &["w".into()],
            &[],
            true,
            vec![],
            None,
            false,
        )
        .unwrap();
        let err = spawn_worker(&mut missing)
            .err()
            .expect("exec of a missing file fails");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

        // The child checks that LISTEN_PID is its own pid and exits 0 if so.
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "test \"$LISTEN_PID\" = \"$$\"".into(),
            ],
            &[],
            true,
            vec![],
            None,
            false,
        )
        .unwrap();
        let spawned = spawn_worker(&mut check).unwrap();
        assert_eq!(wait(&spawned), ExitStatus::Exited(0));
    }

    /// Waits for the child behind `spawned` and returns how it ended.
    fn wait(spawned: &Spawned) -> ExitStatus {
        loop {
            if let Some(status) = pidfd_try_wait(spawned.pidfd.as_fd()).unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// An fd the supervisor inherited without close-on-exec (as from a careless
    /// launcher) does not reach the worker; its sockets do; `no_new_privs` is set.
    #[test]
    fn spawn_passes_only_the_sockets_and_sets_no_new_privs() {
        // Above the fds the child's sockets go to (3..), as a launcher's fd 7 is.
        let file = std::fs::File::open("/etc/hostname").unwrap();
        // SAFETY: fcntl with integer arguments; F_DUPFD gives no FD_CLOEXEC.
        let leaked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 100) };
        assert!(leaked >= 100, "{}", io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        let _leaked = unsafe { OwnedFd::from_raw_fd(leaked) };
        let socket = std::fs::File::open("/dev/null").unwrap();
        // Exit codes say which check failed.
        let script = "ls -l /proc/$$/fd/ | grep -q /etc/hostname && exit 3; \
             test \"$(readlink /proc/$$/fd/3)\" = /dev/null || exit 4; \
             grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/$$/status || exit 5"
            .to_string();
        let mut check = PreparedExec::new(
            "/bin/sh",
            &["sh".into(), "-c".into(), script],
            &[],
            false,
            vec![socket.as_raw_fd()],
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            wait(&spawn_worker(&mut check).unwrap()),
            ExitStatus::Exited(0)
        );
        // And without no_new_privs, the flag stays off.
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "grep -q '^NoNewPrivs:[[:space:]]*0$' /proc/$$/status".into(),
            ],
            &[],
            false,
            vec![],
            None,
            false,
        )
        .unwrap();
        assert_eq!(
            wait(&spawn_worker(&mut check).unwrap()),
            ExitStatus::Exited(0)
        );
    }

    /// The real interpreter behind `python3` (a pyenv shim is a shell script).
    fn python3() -> String {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is installed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A child's `bind()` under the bind filter waits for us: answered with our
    /// socket at its own fd number, its `bind()` returns 0 and the socket it holds
    /// is ours; answered with CONTINUE, the kernel binds its own.
    #[test]
    fn a_bind_under_the_filter_is_answered_by_the_parent() {
        use crate::sys::seccomp::{
            ListenerState, install_fd, listener_state, receive_notification, respond,
        };
        let ours = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = ours.local_addr().unwrap().port();
        for give in [true, false] {
            // Exit 0: the socket it holds after bind() is ours (give) or its own.
            let check = if give {
                format!("s.getsockname()[1] == {port}")
            } else {
                format!("s.getsockname()[1] not in (0, {port})")
            };
            let script = format!(
                "import socket, sys\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('127.0.0.1', 0))\n\
                 sys.exit(0 if {check} else 3)"
            );
            let mut prepared = PreparedExec::new(
                &python3(),
                &["python3".into(), "-c".into(), script],
                &[],
                false,
                vec![],
                None,
                true,
            )
            .unwrap()
            .with_bind_filter()
            .unwrap();
            let spawned = spawn_worker(&mut prepared).unwrap();
            let listener = spawned.bind_listener.as_ref().expect("a listener fd");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while listener_state(listener.as_fd()).unwrap() != ListenerState::Pending {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no bind() notification"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let notification = receive_notification(listener.as_fd()).unwrap();
            assert_eq!(notification.nr, libc::SYS_bind);
            assert_eq!(notification.pid, spawned.pid);
            if give {
                let fd = notification.args[0] as RawFd;
                install_fd(listener.as_fd(), notification.id, ours.as_fd(), fd, false).unwrap();
                respond(listener.as_fd(), notification.id, Ok(()), false).unwrap();
            } else {
                respond(listener.as_fd(), notification.id, Ok(()), true).unwrap();
            }
            assert_eq!(wait(&spawned), ExitStatus::Exited(0), "give = {give}");
        }
    }

    /// A worker owed more sockets than any fixed-size table would hold still gets
    /// every one of them, in order, at 3.. (it used to get 128).
    #[test]
    fn spawn_places_every_fd_however_many() {
        const COUNT: usize = 200;
        let files: Vec<std::fs::File> = (0..COUNT)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds = files.iter().map(|f| f.as_raw_fd()).collect();
        let last = 3 + COUNT - 1;
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                format!("test -e /proc/$$/fd/{last}"),
            ],
            &[],
            false,
            fds,
            None,
            false,
        )
        .unwrap();
        let spawned = spawn_worker(&mut check).unwrap();
        assert_eq!(wait(&spawned), ExitStatus::Exited(0));
    }
}
