//! Inherited sockets: the receiving side of systemd's socket-activation
//! protocol, as `sd_listen_fds_with_names(unset_environment = 1)` implements it.
//!
//! The protocol is three environment variables and a range of fds:
//!
//! * `LISTEN_PID` — the pid the fds are meant for. Environment variables are
//!   inherited by every descendant, so without this a child of the worker
//!   would think the worker's sockets are its own. A process whose pid differs
//!   must ignore the rest.
//! * `LISTEN_FDS` — how many fds were passed. They are always consecutive,
//!   starting at 3 (right after stdin, stdout, stderr).
//! * `LISTEN_FDNAMES` — optional, `:`-separated, one name per fd. The
//!   supervisor uses the `[[listen]]` name; with `sockets_per_worker > 1`
//!   a name repeats, once per socket, in order. Without it every fd is named
//!   `"unknown"`, as in libsystemd.
//!
//! The fds arrive without `FD_CLOEXEC` (they had to survive the `exec` that
//! started us). We set it right away so they do not leak into processes the
//! worker starts in turn.

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, setsockopt, socket,
    sockopt,
};

use crate::error::Error;
use crate::sys;

/// The first passed fd; 0, 1 and 2 are stdin, stdout and stderr.
const FIRST_FD: RawFd = 3;

/// The name libsystemd gives every fd when `LISTEN_FDNAMES` is not set.
const UNNAMED: &str = "unknown";

const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Set once the inherited fds have owners (see `sys::adopt_inherited_fd`).
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// The sockets this process inherited, in fd order, each with its
/// `LISTEN_FDNAMES` entry.
///
/// Sockets are handed out by name: [`udp`](Listeners::udp) lends copies,
/// [`take_udp`](Listeners::take_udp) moves them out. Each one is checked to be
/// a UDP socket before it becomes a [`UdpSocket`].
#[derive(Debug)]
pub struct Listeners {
    /// Whether `LISTEN_PID` named this process (even with `LISTEN_FDS=0`).
    activated: bool,
    /// Fds not yet taken, in fd order.
    fds: Vec<Inherited>,
    /// Every name that was passed, in first-seen order, for error messages
    /// (kept when the fds themselves have been taken).
    names: Vec<String>,
}

#[derive(Debug)]
struct Inherited {
    name: String,
    fd: OwnedFd,
}

/// A socket from [`Listeners::take_all_udp`], with where it came from.
#[derive(Debug)]
pub struct NamedSocket {
    /// Its `LISTEN_FDNAMES` entry.
    pub name: String,
    /// Its 0-based position among the sockets of that name. This is the
    /// `socket` field of the echo protocol's trailer.
    pub index: usize,
    /// The socket itself.
    pub socket: UdpSocket,
}

/// What the `LISTEN_*` variables say, before any fd is touched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ListenEnv {
    /// `LISTEN_FDS`: fds 3..3+count are ours.
    pub(crate) count: usize,
    /// `LISTEN_FDNAMES`, split, with exactly `count` entries; `None` when the
    /// variable is unset (every fd is then `"unknown"`). Kept lazy so that a
    /// bogus huge `LISTEN_FDS` fails at the first missing fd instead of
    /// first allocating millions of names.
    pub(crate) names: Option<Vec<String>>,
}

/// Interprets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, given as
/// values so that tests need not touch the (process-wide) environment.
///
/// Returns `Ok(None)` when the sockets are not for this process: `LISTEN_PID`
/// unset or naming another pid, or `LISTEN_FDS` unset. This mirrors
/// `sd_listen_fds`, which returns 0 in those cases; a malformed value is an
/// error, as there (-EINVAL).
pub(crate) fn parse_listen_env(
    listen_pid: Option<&OsString>,
    listen_fds: Option<&OsString>,
    listen_fdnames: Option<&OsString>,
    my_pid: u32,
) -> Result<Option<ListenEnv>, Error> {
    let Some(pid) = listen_pid else {
        return Ok(None);
    };
    let pid_text = utf8("LISTEN_PID", pid)?;
    let pid: u32 = match pid_text.trim().parse() {
        Ok(pid) if pid > 0 => pid,
        _ => return Err(invalid("LISTEN_PID", pid_text, "not a process id")),
    };
    if pid != my_pid {
        // Meant for an ancestor that did not clean up (or whose environment
        // we inherited on purpose). Not ours: touching the fds would steal them.
        return Ok(None);
    }

    let Some(count) = listen_fds else {
        return Ok(None);
    };
    let count_text = utf8("LISTEN_FDS", count)?;
    let count: usize = count_text
        .trim()
        .parse()
        .map_err(|_| invalid("LISTEN_FDS", count_text, "not a non-negative integer"))?;
    // The last fd, 3 + count - 1, must be a valid fd number.
    if count > (RawFd::MAX - FIRST_FD) as usize {
        return Err(invalid(
            "LISTEN_FDS",
            count_text,
            "more fds than a process can have",
        ));
    }

    let names = match listen_fdnames {
        None => None,
        Some(value) => {
            let text = utf8("LISTEN_FDNAMES", value)?;
            // libsystemd splits with strv_split(":"), which yields no entry at
            // all for an empty string; Rust's split would yield one "".
            let names: Vec<String> = if text.is_empty() {
                Vec::new()
            } else {
                text.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(invalid(
                    "LISTEN_FDNAMES",
                    text,
                    &format!(
                        "has {} names but LISTEN_FDS={count}; there must be one name per fd",
                        names.len()
                    ),
                ));
            }
            Some(names)
        }
    };
    Ok(Some(ListenEnv { count, names }))
}

fn utf8<'a>(var: &'static str, value: &'a OsString) -> Result<&'a str, Error> {
    value
        .to_str()
        .ok_or_else(|| invalid(var, &value.to_string_lossy(), "not valid UTF-8"))
}

fn invalid(var: &'static str, value: &str, reason: &str) -> Error {
    Error::InvalidEnv {
        var,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

impl Listeners {
    /// Takes the sockets passed by socket activation.
    ///
    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. If they name
    /// this process, takes ownership of fds 3..3+`LISTEN_FDS` and marks them
    /// close-on-exec. If they do not (or are unset), returns an empty set:
    /// the process was started some other way, e.g. by hand, and
    /// [`udp_or_bind`](Listeners::udp_or_bind) can bind its own socket.
    ///
    /// Like `sd_listen_fds(1)`, it then removes the three variables so that
    /// children of the worker do not see them — but only while the process is
    /// single-threaded, because removing environment variables races with
    /// other threads' `getenv`. Call it early in `main`, before spawning
    /// threads or starting an async runtime, to get that clean-up; if you
    /// cannot, nothing breaks: a child ignores sockets whose `LISTEN_PID` is
    /// not its own.
    ///
    /// The fds can be adopted only once per process; a second call that
    /// finds them again returns [`Error::AlreadyAdopted`].
    pub fn from_env() -> Result<Listeners, Error> {
        let [pid, fds, names] = VARS.map(std::env::var_os);
        let parsed = parse_listen_env(
            pid.as_ref(),
            fds.as_ref(),
            names.as_ref(),
            std::process::id(),
        );
        if pid.is_some() || fds.is_some() || names.is_some() {
            // Whatever the outcome, the variables have been consumed, as
            // sd_listen_fds(unset_environment=1) does even on error.
            sys::remove_env_if_single_threaded(&VARS);
        }
        match parsed? {
            None => Ok(Listeners::empty()),
            Some(env) => Listeners::adopt(env),
        }
    }

    /// A set with no sockets, as when not socket-activated.
    fn empty() -> Listeners {
        Listeners {
            activated: false,
            fds: Vec::new(),
            names: Vec::new(),
        }
    }

    fn adopt(env: ListenEnv) -> Result<Listeners, Error> {
        if ADOPTED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyAdopted);
        }
        let mut fds = Vec::with_capacity(env.count.min(1024));
        for i in 0..env.count {
            let fd = FIRST_FD + i as RawFd;
            let name = match &env.names {
                Some(names) => names[i].clone(),
                None => UNNAMED.to_owned(),
            };
            let owned = match sys::adopt_inherited_fd(fd) {
                Ok(owned) => owned,
                Err(source) => return Err(Error::BadFd { fd, name, source }),
            };
            // Ours now; keep it out of anything we exec.
            if let Err(errno) = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
                return Err(Error::BadFd {
                    fd,
                    name,
                    source: errno.into(),
                });
            }
            fds.push(Inherited { name, fd: owned });
        }
        let mut seen = HashSet::new();
        let names = fds
            .iter()
            .filter(|f| seen.insert(f.name.as_str()))
            .map(|f| f.name.clone())
            .collect();
        Ok(Listeners {
            activated: true,
            fds,
            names,
        })
    }

    /// Whether `LISTEN_PID` named this process, i.e. whether it was started
    /// by a supervisor (or systemd) rather than by hand.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// How many inherited fds are left (not yet taken).
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no inherited fd is left.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Every name that was passed, in fd order, each once. Includes names
    /// whose sockets have already been taken.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Copies of the UDP sockets named `name`, in fd order; empty if there
    /// is none. The set keeps its own copies (these are `dup`s of the same
    /// sockets, close-on-exec), so this can be called again.
    ///
    /// Fails if any fd of that name is not a UDP socket.
    pub fn udp(&self, name: &str) -> Result<Vec<UdpSocket>, Error> {
        let mut sockets = Vec::new();
        for inherited in self.fds.iter().filter(|f| f.name == name) {
            inherited.check_udp()?;
            let copy = inherited.fd.try_clone().map_err(|e| {
                Error::io(
                    format!("duplicating inherited fd {}", inherited.fd.as_raw_fd()),
                    e,
                )
            })?;
            sockets.push(UdpSocket::from(copy));
        }
        Ok(sockets)
    }

    /// Moves out the UDP sockets named `name`, in fd order; empty if there
    /// is none.
    ///
    /// Fails, leaving the set untouched, if any fd of that name is not a UDP
    /// socket.
    pub fn take_udp(&mut self, name: &str) -> Result<Vec<UdpSocket>, Error> {
        for inherited in self.fds.iter().filter(|f| f.name == name) {
            inherited.check_udp()?;
        }
        let (taken, kept) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|f| f.name == name);
        self.fds = kept;
        Ok(taken.into_iter().map(|f| UdpSocket::from(f.fd)).collect())
    }

    /// Moves out every socket, of every name, in fd order, each with its name
    /// and its position among the sockets of that name. For workers that
    /// serve whatever they are given, like the echo worker.
    ///
    /// Fails, leaving the set untouched, if any fd is not a UDP socket.
    pub fn take_all_udp(&mut self) -> Result<Vec<NamedSocket>, Error> {
        for inherited in &self.fds {
            inherited.check_udp()?;
        }
        let mut next_index: Vec<(String, usize)> = Vec::new();
        let mut sockets = Vec::with_capacity(self.fds.len());
        for inherited in std::mem::take(&mut self.fds) {
            let index = match next_index.iter_mut().find(|(n, _)| *n == inherited.name) {
                Some((_, next)) => {
                    *next += 1;
                    *next - 1
                }
                None => {
                    next_index.push((inherited.name.clone(), 1));
                    0
                }
            };
            sockets.push(NamedSocket {
                name: inherited.name,
                index,
                socket: UdpSocket::from(inherited.fd),
            });
        }
        Ok(sockets)
    }

    /// The sockets named `name` if socket-activated, otherwise one socket of
    /// our own bound to `fallback` with `SO_REUSEPORT` — so the same binary
    /// runs under the supervisor and by hand (several copies by hand, too:
    /// `SO_REUSEPORT` lets them share the port).
    ///
    /// When socket-activated but nothing is named `name`, this is an error
    /// ([`Error::NoSuchListener`]), not a fallback: binding our own socket
    /// then would join the supervisor's port outside its control.
    pub fn udp_or_bind(
        &mut self,
        name: &str,
        fallback: SocketAddr,
    ) -> Result<Vec<UdpSocket>, Error> {
        if !self.activated {
            return bind_reuseport(fallback).map(|socket| vec![socket]);
        }
        let sockets = self.take_udp(name)?;
        if sockets.is_empty() {
            return Err(Error::NoSuchListener {
                name: name.to_owned(),
                available: self.names.clone(),
            });
        }
        Ok(sockets)
    }
}

impl Inherited {
    /// Checks that the fd is a UDP socket over IPv4 or IPv6, so that treating
    /// it as a `UdpSocket` is meaningful. (It would be memory-safe either way;
    /// the point is a clear error instead of odd failures later.)
    fn check_udp(&self) -> Result<(), Error> {
        let fd = self.fd.as_fd();
        let not_udp = |found: String| Error::NotUdp {
            fd: fd.as_raw_fd(),
            name: self.name.clone(),
            found,
        };
        let ask = |name| sys::sockopt_int(fd, libc::SOL_SOCKET, name);
        let kind = match ask(libc::SO_TYPE) {
            Ok(kind) => kind,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                return Err(not_udp("not a socket".to_owned()));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("getsockopt(SO_TYPE) on fd {}", fd.as_raw_fd()),
                    e,
                ));
            }
        };
        if kind != libc::SOCK_DGRAM {
            return Err(not_udp(format!("a {} socket", socket_type_name(kind))));
        }
        let domain = ask(libc::SO_DOMAIN).map_err(|e| Error::io("getsockopt(SO_DOMAIN)", e))?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            let family = if domain == libc::AF_UNIX {
                "AF_UNIX".to_owned()
            } else {
                format!("address family {domain}")
            };
            return Err(not_udp(format!("a datagram socket of {family}")));
        }
        // SOCK_DGRAM over IP is not always UDP: ICMP "ping" sockets are too.
        let protocol =
            ask(libc::SO_PROTOCOL).map_err(|e| Error::io("getsockopt(SO_PROTOCOL)", e))?;
        if protocol != libc::IPPROTO_UDP {
            return Err(not_udp(format!(
                "a datagram socket of IP protocol {protocol}"
            )));
        }
        Ok(())
    }
}

fn socket_type_name(kind: libc::c_int) -> String {
    match kind {
        libc::SOCK_STREAM => "SOCK_STREAM".to_owned(),
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET".to_owned(),
        libc::SOCK_RAW => "SOCK_RAW".to_owned(),
        other => format!("type-{other}"),
    }
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT` set, close-on-exec.
///
/// `std::net::UdpSocket::bind` cannot set an option between `socket()` and
/// `bind()`, and `SO_REUSEPORT` only works if set before `bind()`; hence nix.
pub(crate) fn bind_reuseport(addr: SocketAddr) -> Result<UdpSocket, Error> {
    let context = |what: &str| format!("{what} for a UDP socket on {addr}");
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(|e| Error::io(context("socket()"), e.into()))?;
    setsockopt(&fd, sockopt::ReusePort, &true)
        .map_err(|e| Error::io(context("setsockopt(SO_REUSEPORT)"), e.into()))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| Error::io(context("bind()"), e.into()))?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<Option<ListenEnv>, Error> {
        let [pid, fds, names] = [pid, fds, names].map(|v| v.map(os));
        parse_listen_env(pid.as_ref(), fds.as_ref(), names.as_ref(), 1234)
    }

    #[test]
    fn not_activated_without_listen_pid() {
        assert_eq!(parse(None, Some("2"), Some("a:b")).unwrap(), None);
    }

    #[test]
    fn sockets_for_another_pid_are_ignored() {
        assert_eq!(parse(Some("999"), Some("2"), Some("a:b")).unwrap(), None);
    }

    #[test]
    fn missing_listen_fds_means_none() {
        assert_eq!(parse(Some("1234"), None, None).unwrap(), None);
    }

    #[test]
    fn names_are_split_one_per_fd() {
        let env = parse(Some("1234"), Some("3"), Some("echo:echo:dns"))
            .unwrap()
            .unwrap();
        assert_eq!(env.count, 3);
        assert_eq!(env.names.unwrap(), ["echo", "echo", "dns"]);
    }

    #[test]
    fn names_are_optional() {
        let env = parse(Some("1234"), Some("2"), None).unwrap().unwrap();
        assert_eq!(
            env,
            ListenEnv {
                count: 2,
                names: None
            }
        );
    }

    #[test]
    fn zero_fds_with_empty_names() {
        let env = parse(Some("1234"), Some("0"), Some("")).unwrap().unwrap();
        assert_eq!(
            env,
            ListenEnv {
                count: 0,
                names: Some(vec![])
            }
        );
    }

    #[test]
    fn malformed_values_name_the_variable_and_value() {
        let err = parse(Some("12x"), Some("1"), None).unwrap_err().to_string();
        assert_eq!(err, r#"LISTEN_PID="12x": not a process id"#);
        let err = parse(Some("0"), Some("1"), None).unwrap_err().to_string();
        assert!(err.starts_with("LISTEN_PID=\"0\""), "{err}");
        let err = parse(Some("1234"), Some("-1"), None)
            .unwrap_err()
            .to_string();
        assert_eq!(err, r#"LISTEN_FDS="-1": not a non-negative integer"#);
        let err = parse(Some("1234"), Some("99999999999"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("LISTEN_FDS=\"99999999999\""), "{err}");
    }

    #[test]
    fn name_count_must_match() {
        let err = parse(Some("1234"), Some("2"), Some("echo"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"LISTEN_FDNAMES="echo": has 1 names but LISTEN_FDS=2; there must be one name per fd"#
        );
        assert!(parse(Some("1234"), Some("1"), Some("")).is_err());
    }

    #[test]
    fn a_malformed_pid_for_us_is_checked_before_fds() {
        // LISTEN_FDS is only looked at when LISTEN_PID is ours.
        assert_eq!(parse(Some("77"), Some("nonsense"), None).unwrap(), None);
    }

    fn listeners_with(entries: Vec<(&str, OwnedFd)>) -> Listeners {
        let fds: Vec<Inherited> = entries
            .into_iter()
            .map(|(name, fd)| Inherited {
                name: name.to_owned(),
                fd,
            })
            .collect();
        let mut names: Vec<String> = Vec::new();
        for f in &fds {
            if !names.contains(&f.name) {
                names.push(f.name.clone());
            }
        }
        Listeners {
            activated: true,
            fds,
            names,
        }
    }

    fn udp_fd() -> OwnedFd {
        OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    #[test]
    fn sockets_are_handed_out_by_name_in_fd_order() {
        let a0 = udp_fd();
        let b0 = udp_fd();
        let a1 = udp_fd();
        let addr = |fd: &OwnedFd| {
            UdpSocket::from(fd.try_clone().unwrap())
                .local_addr()
                .unwrap()
        };
        let (a0_addr, a1_addr, b0_addr) = (addr(&a0), addr(&a1), addr(&b0));
        let mut listeners = listeners_with(vec![("a", a0), ("b", b0), ("a", a1)]);
        assert_eq!(listeners.names(), ["a", "b"]);

        let lent = listeners.udp("a").unwrap();
        assert_eq!(lent.len(), 2);
        assert_eq!(listeners.len(), 3, "udp() lends copies");

        let a: Vec<_> = listeners
            .take_udp("a")
            .unwrap()
            .iter()
            .map(|s| s.local_addr().unwrap())
            .collect();
        assert_eq!(a, [a0_addr, a1_addr]);
        assert_eq!(listeners.len(), 1);
        assert!(listeners.take_udp("a").unwrap().is_empty());

        let all = listeners.take_all_udp().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].name.as_str(), all[0].index), ("b", 0));
        assert_eq!(all[0].socket.local_addr().unwrap(), b0_addr);
        assert!(listeners.is_empty());
    }

    #[test]
    fn take_all_numbers_sockets_within_each_name() {
        let mut listeners = listeners_with(vec![
            ("a", udp_fd()),
            ("b", udp_fd()),
            ("a", udp_fd()),
            ("b", udp_fd()),
        ]);
        let order: Vec<_> = listeners
            .take_all_udp()
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.index))
            .collect();
        let expected = [("a", 0), ("b", 0), ("a", 1), ("b", 1)].map(|(n, i)| (n.to_owned(), i));
        assert_eq!(order, expected);
    }

    #[test]
    fn non_udp_fds_are_refused_with_what_they_are() {
        let tcp = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let (unix, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut listeners = listeners_with(vec![
            ("t", tcp),
            ("u", OwnedFd::from(unix)),
            ("f", file),
            ("ok", udp_fd()),
        ]);

        let err = listeners.take_udp("t").unwrap_err().to_string();
        assert!(
            err.contains(
                "(LISTEN_FDNAMES entry \"t\") is not a UDP socket: it is a SOCK_STREAM socket"
            ),
            "{err}"
        );
        let err = listeners.udp("u").unwrap_err().to_string();
        assert!(err.ends_with("a datagram socket of AF_UNIX"), "{err}");
        let err = listeners.take_udp("f").unwrap_err().to_string();
        assert!(err.ends_with("not a socket"), "{err}");
        assert!(listeners.take_all_udp().is_err());
        assert_eq!(listeners.len(), 4, "a failed take leaves the set untouched");
        assert_eq!(listeners.take_udp("ok").unwrap().len(), 1);
    }

    #[test]
    fn udp_or_bind_binds_only_when_not_activated() {
        let mut by_hand = Listeners::empty();
        let sockets = by_hand
            .udp_or_bind("echo", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert_eq!(sockets.len(), 1);
        let reuseport = nix::sys::socket::getsockopt(&sockets[0], sockopt::ReusePort).unwrap();
        assert!(
            reuseport,
            "fallback sockets share the port with SO_REUSEPORT"
        );
        // A second socket can join the same port.
        let port = sockets[0].local_addr().unwrap();
        bind_reuseport(port).unwrap();

        let mut activated = listeners_with(vec![("dns", udp_fd())]);
        let err = activated
            .udp_or_bind("echo", "127.0.0.1:0".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"no inherited socket is named "echo"; LISTEN_FDNAMES has dns"#
        );
        assert_eq!(
            activated
                .udp_or_bind("dns", "127.0.0.1:0".parse().unwrap())
                .unwrap()
                .len(),
            1
        );
    }
}
