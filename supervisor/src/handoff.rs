//! `service.handoff = "bind"`: a worker creates and binds its own UDP sockets, and
//! each `bind()` it makes to a listener's address is answered with one of the
//! generation's sockets instead (docs/worker-contract.md, "Bind interception").
//!
//! The worker runs under a seccomp filter that stops `bind()` only (installed
//! between fork and exec, `sys::seccomp`); this module serves its notifications,
//! one task per worker process (its descendants share the filter, and the
//! notification names the calling thread):
//!
//! - the address is read from the caller's memory, and the notification is
//!   checked to be still pending afterwards (the memory, and the pid, are the
//!   caller's own);
//! - it must match a listener's address: same family and port, and the same IP,
//!   or either of the two the wildcard;
//! - the caller's fd must be a UDP socket of that family (a copy is taken with
//!   `pidfd_getfd`; TCP, unix sockets, other ports and families pass through:
//!   the kernel runs the `bind()` as if there were no filter);
//! - the worker gets the first of its sockets for that listener that it does
//!   not hold already (so four threads binding the same address get four
//!   sockets, and a socket closed and bound again comes back), `EADDRINUSE`
//!   once it holds all of them;
//! - the options it set on its own socket are copied to ours first
//!   ([`carry_options`]), then ours replaces its own at the same fd number
//!   (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SETFD`) and `bind()` returns 0.
//!
//! A worker counts as ready only once it has bound every one of its sockets of
//! every listener: the selector steers traffic to all of them.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    sync::Arc,
};

use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

use crate::{
    procfs,
    sys::{
        self,
        seccomp::{self, ListenerState, Notification},
    },
    worker::SlotSockets,
};

/// The longest address `bind()` is read for (`sizeof(struct sockaddr_storage)`).
const MAX_ADDRESS_LEN: usize = 128;

/// How long reading a `bind()` address from the caller's memory may take. It is
/// read on a blocking thread: memory backed by something the worker itself
/// answers (a `userfaultfd` range, a FUSE file it serves) could stall the read
/// for as long as the worker likes, and the supervisor's one thread must not
/// wait on it. Past this the `bind()` fails with `EFAULT`.
const MEMORY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The `bind()` address as read from the caller's memory.
enum AddressRead {
    Read(Vec<u8>),
    /// Not readable (bad pointer, the caller gone): the kernel's own `bind()`
    /// gives the caller its error.
    Unreadable,
    /// The read did not finish within [`MEMORY_READ_TIMEOUT`].
    Stuck,
}

async fn read_address(n: &Notification) -> AddressRead {
    if n.nr != libc::SYS_bind {
        return AddressRead::Unreadable;
    }
    let (pid, address) = (n.pid, n.args[1]);
    let len = (n.args[2] as usize).min(MAX_ADDRESS_LEN);
    let read = tokio::task::spawn_blocking(move || seccomp::read_process_memory(pid, address, len));
    match tokio::time::timeout(MEMORY_READ_TIMEOUT, read).await {
        Ok(Ok(Ok(bytes))) => AddressRead::Read(bytes),
        Ok(_) => AddressRead::Unreadable,
        Err(_) => AddressRead::Stuck,
    }
}

/// One listener's sockets for one worker.
#[derive(Clone)]
struct ListenerSockets {
    name: String,
    address: SocketAddr,
    /// The worker's sockets, in `sockets_per_worker` order.
    sockets: Vec<Socket>,
    /// Which of them the worker has been given at least once.
    handed_out: Vec<bool>,
}

/// One of the generation's sockets.
#[derive(Clone)]
struct Socket {
    /// The generation's sockets of its listener, and which one this is.
    owner: Arc<Vec<OwnedFd>>,
    index: usize,
    inode: u64,
}

impl Socket {
    fn fd(&self) -> BorrowedFd<'_> {
        self.owner[self.index].as_fd()
    }
}

/// What one worker may be given, and what it was given so far.
#[derive(Clone)]
pub struct Book {
    listeners: Vec<ListenerSockets>,
}

impl Book {
    pub fn new(sockets: &SlotSockets) -> std::io::Result<Book> {
        let mut listeners: Vec<ListenerSockets> = Vec::new();
        for ((&fd, name), &address) in sockets
            .fds
            .iter()
            .zip(&sockets.names)
            .zip(&sockets.addresses)
        {
            let (owner, index) = sockets
                .owner
                .iter()
                .find_map(|owner| {
                    let index = owner.iter().position(|o| o.as_raw_fd() == fd)?;
                    Some((owner.clone(), index))
                })
                .ok_or_else(|| std::io::Error::other("a worker's socket has no owner"))?;
            let inode = nix::sys::stat::fstat(owner[index].as_fd())?.st_ino;
            let socket = Socket {
                owner,
                index,
                inode,
            };
            match listeners.iter_mut().find(|l| &l.name == name) {
                Some(listener) => {
                    listener.sockets.push(socket);
                    listener.handed_out.push(false);
                }
                None => listeners.push(ListenerSockets {
                    name: name.clone(),
                    address,
                    sockets: vec![socket],
                    handed_out: vec![false],
                }),
            }
        }
        Ok(Book { listeners })
    }

    /// What the worker still has to bind before it can be ready, or `None`.
    pub fn missing(&self) -> Option<String> {
        let missing: Vec<String> = self
            .listeners
            .iter()
            .filter_map(|l| {
                let bound = l.handed_out.iter().filter(|&&b| b).count();
                let total = l.handed_out.len();
                match bound {
                    _ if bound == total => None,
                    0 => Some(format!(
                        "never bound listener {:?}'s address {}",
                        l.name, l.address
                    )),
                    _ => Some(format!(
                        "bound {bound} of its {total} sockets of listener {:?} ({}; sockets_per_worker = {total})",
                        l.name, l.address
                    )),
                }
            })
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

/// A `sockaddr` as `bind()` was given it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindAddress {
    Inet(SocketAddr),
    /// Another family (unix, netlink, packet ...), or too short to be one.
    Other,
}

/// Parses the bytes of a `struct sockaddr` (native byte order for the family,
/// network order for port and address).
pub fn parse_sockaddr(bytes: &[u8]) -> BindAddress {
    if bytes.len() < 2 {
        return BindAddress::Other;
    }
    let family = i32::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
    match family {
        libc::AF_INET if bytes.len() >= 8 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            BindAddress::Inet(SocketAddr::new(IpAddr::V4(ip), port))
        }
        libc::AF_INET6 if bytes.len() >= 24 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[8..24]);
            BindAddress::Inet(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => BindAddress::Other,
    }
}

/// Whether a `bind()` to `wanted` is one to `listener`: same family and port,
/// and the same IP or either one the wildcard (a service binding `0.0.0.0:53`
/// gets the `127.0.0.1:53` listener's socket; one binding `127.0.0.1:53` gets
/// a wildcard listener's). An IPv4-mapped IPv6 address is IPv6 here: it
/// matches only an IPv6 listener.
pub fn matches(listener: SocketAddr, wanted: SocketAddr) -> bool {
    listener.is_ipv4() == wanted.is_ipv4()
        && listener.port() == wanted.port()
        && (listener.ip() == wanted.ip()
            || listener.ip().is_unspecified()
            || wanted.ip().is_unspecified())
}

/// The first socket (by index) whose inode the worker does not hold.
pub fn choose(
    inodes: impl IntoIterator<Item = u64>,
    held: &std::collections::HashSet<u64>,
) -> Option<usize> {
    inodes.into_iter().position(|inode| !held.contains(&inode))
}

/// How a notification is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Let the kernel run the `bind()` itself.
    Continue,
    /// Give socket `socket` of listener `listener`.
    Give {
        listener: usize,
        socket: usize,
    },
    Fail(i32),
}

/// The task serving one worker's notifications; it ends with the worker (and
/// is stopped when this is dropped).
pub struct BindHandoff {
    task: JoinHandle<()>,
    /// What is still missing (see [`Book::missing`]); `None` once all is bound.
    pub progress: watch::Receiver<Option<String>>,
}

impl Drop for BindHandoff {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BindHandoff {
    pub fn start(listener: OwnedFd, worker_pid: i32, book: Book) -> std::io::Result<BindHandoff> {
        let (progress_tx, progress) = watch::channel(book.missing());
        let listener = sys::register_async(listener)?;
        let task = tokio::spawn(serve(listener, worker_pid, book, progress_tx));
        Ok(BindHandoff { task, progress })
    }
}

async fn serve(
    listener: AsyncFd<OwnedFd>,
    worker_pid: i32,
    mut book: Book,
    progress: watch::Sender<Option<String>>,
) {
    loop {
        let mut guard = match listener.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!("worker {worker_pid}: bind handoff listener: {e}");
                return;
            }
        };
        let fd = listener.get_ref().as_fd();
        match seccomp::listener_state(fd) {
            Ok(ListenerState::Pending) => {}
            Ok(ListenerState::Closed) => return,
            Ok(ListenerState::Idle) => {
                guard.clear_ready();
                continue;
            }
            Err(e) => {
                tracing::error!("worker {worker_pid}: polling the bind handoff listener: {e}");
                return;
            }
        }
        let notification = match seccomp::receive_notification(fd) {
            Ok(notification) => notification,
            // The caller died (or its bind() was interrupted) before we got to it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                tracing::error!("worker {worker_pid}: receiving a bind notification: {e}");
                return;
            }
        };
        let address = read_address(&notification).await;
        handle(fd, worker_pid, &mut book, notification, address);
        progress.send_if_modified(|missing| {
            let now = book.missing();
            let changed = *missing != now;
            *missing = now;
            changed
        });
    }
}

/// Answers one notification; a caller that vanished meanwhile is not an error.
fn handle(
    listener: BorrowedFd<'_>,
    worker_pid: i32,
    book: &mut Book,
    n: Notification,
    address: AddressRead,
) {
    let (answer, theirs) = decide(listener, book, &n, address, worker_pid);
    let result = match answer {
        Answer::Continue => seccomp::respond(listener, n.id, Ok(()), true),
        Answer::Fail(errno) => seccomp::respond(listener, n.id, Err(errno), false),
        Answer::Give {
            listener: l,
            socket: s,
        } => {
            let target = n.args[0] as RawFd;
            let ours = book.listeners[l].sockets[s].fd();
            let flags = procfs::fd_flags(n.pid, target).unwrap_or(0);
            if let Some(theirs) = &theirs {
                carry_options(theirs.as_fd(), ours, &book.listeners[l], worker_pid);
            }
            // The file status flag is the open file's, shared with our copy:
            // the worker's own socket's O_NONBLOCK is what its code expects.
            if let Err(e) = set_nonblocking(ours, flags & libc::O_NONBLOCK != 0) {
                tracing::warn!("worker {worker_pid}: O_NONBLOCK on its socket: {e}");
            }
            let cloexec = flags & libc::O_CLOEXEC != 0;
            if !seccomp::notification_valid(listener, n.id) {
                return;
            }
            match seccomp::install_fd(listener, n.id, ours, target, cloexec) {
                Ok(()) => {
                    let entry = &mut book.listeners[l];
                    entry.handed_out[s] = true;
                    tracing::info!(
                        "worker {worker_pid}: pid {} bind({target}, {}): given socket {} of listener {:?}",
                        n.pid,
                        entry.address,
                        s,
                        entry.name
                    );
                    seccomp::respond(listener, n.id, Ok(()), false)
                }
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = result
        && e.raw_os_error() != Some(libc::ENOENT)
    {
        tracing::warn!("worker {worker_pid}: answering pid {}'s bind(): {e}", n.pid);
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let mut flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, nonblocking);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

/// What to do with a `bind()`, and the caller's socket when it is ours to replace.
fn decide(
    listener: BorrowedFd<'_>,
    book: &Book,
    n: &Notification,
    address: AddressRead,
    worker_pid: i32,
) -> (Answer, Option<OwnedFd>) {
    let pass = (Answer::Continue, None);
    if n.nr != libc::SYS_bind {
        return pass;
    }
    let target = n.args[0] as RawFd;
    let bytes = match address {
        AddressRead::Read(bytes) => bytes,
        AddressRead::Unreadable => return pass,
        AddressRead::Stuck => {
            tracing::warn!(
                "worker {worker_pid}: pid {}'s bind() address could not be read within {:?}: bind() fails with EFAULT",
                n.pid,
                MEMORY_READ_TIMEOUT
            );
            return (Answer::Fail(libc::EFAULT), None);
        }
    };
    if !seccomp::notification_valid(listener, n.id) {
        return pass;
    }
    let BindAddress::Inet(wanted) = parse_sockaddr(&bytes) else {
        return pass;
    };
    let Some(l) = book
        .listeners
        .iter()
        .position(|l| matches(l.address, wanted))
    else {
        return pass;
    };
    // A copy of the caller's fd, through its process (the notification names
    // the thread); the notification is checked again after the pidfd is
    // opened, so the pid was not reused in between.
    let Some(process) = procfs::thread_group(n.pid) else {
        return pass;
    };
    let Ok(pidfd) = sys::pidfd_open(process) else {
        return pass;
    };
    if !seccomp::notification_valid(listener, n.id) {
        return pass;
    }
    let Ok(theirs) = seccomp::pidfd_getfd(pidfd.as_fd(), target) else {
        return pass;
    };
    let family = if wanted.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let option = |name| seccomp::get_int_option(theirs.as_fd(), libc::SOL_SOCKET, name).ok();
    if option(libc::SO_TYPE) != Some(libc::SOCK_DGRAM)
        || option(libc::SO_PROTOCOL) != Some(libc::IPPROTO_UDP)
        || option(libc::SO_DOMAIN) != Some(family)
    {
        return pass;
    }
    let held = procfs::socket_inodes(&process.to_string());
    match choose(book.listeners[l].sockets.iter().map(|s| s.inode), &held) {
        Some(socket) => (
            Answer::Give {
                listener: l,
                socket,
            },
            Some(theirs),
        ),
        None => (Answer::Fail(libc::EADDRINUSE), None),
    }
}

/// Options copied from the worker's socket to ours when they differ (`int`
/// options only). Not carried, and documented: socket filters, multicast
/// memberships, `SO_BINDTODEVICE`, `IPV6_V6ONLY` (ours is bound already: an IPv6
/// listener is IPv6-only), and a buffer smaller than the listener's
/// `receive_buffer` (the larger of the two is kept).
const CARRIED: &[(i32, i32, &str)] = &[
    (libc::SOL_SOCKET, libc::SO_BROADCAST, "SO_BROADCAST"),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMP, "SO_TIMESTAMP"),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPING, "SO_TIMESTAMPING"),
    (libc::SOL_SOCKET, libc::SO_PRIORITY, "SO_PRIORITY"),
    (libc::SOL_SOCKET, libc::SO_MARK, "SO_MARK"),
    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL, "SO_RXQ_OVFL"),
];
const CARRIED_V4: &[(i32, i32, &str)] = &[
    (libc::IPPROTO_IP, libc::IP_PKTINFO, "IP_PKTINFO"),
    (libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS"),
    (libc::IPPROTO_IP, libc::IP_RECVTOS, "IP_RECVTOS"),
    (libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL"),
    (libc::IPPROTO_IP, libc::IP_RECVTTL, "IP_RECVTTL"),
    (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, "IP_MTU_DISCOVER"),
    (libc::IPPROTO_IP, libc::IP_RECVERR, "IP_RECVERR"),
    (libc::IPPROTO_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT"),
    (
        libc::IPPROTO_IP,
        libc::IP_RECVORIGDSTADDR,
        "IP_RECVORIGDSTADDR",
    ),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, "IP_MULTICAST_TTL"),
    (
        libc::IPPROTO_IP,
        libc::IP_MULTICAST_LOOP,
        "IP_MULTICAST_LOOP",
    ),
];
const CARRIED_V6: &[(i32, i32, &str)] = &[
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVPKTINFO,
        "IPV6_RECVPKTINFO",
    ),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, "IPV6_RECVTCLASS"),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_UNICAST_HOPS,
        "IPV6_UNICAST_HOPS",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVHOPLIMIT,
        "IPV6_RECVHOPLIMIT",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        "IPV6_MTU_DISCOVER",
    ),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVERR, "IPV6_RECVERR"),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_TRANSPARENT,
        "IPV6_TRANSPARENT",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVORIGDSTADDR,
        "IPV6_RECVORIGDSTADDR",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        "IPV6_MULTICAST_HOPS",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_LOOP,
        "IPV6_MULTICAST_LOOP",
    ),
];

/// Copies what the worker set on `theirs` before `bind()` to `ours`. An option
/// that cannot be copied is logged, not fatal: the bind still succeeds.
fn carry_options(
    theirs: BorrowedFd<'_>,
    ours: BorrowedFd<'_>,
    listener: &ListenerSockets,
    pid: i32,
) {
    let family_options = if listener.address.is_ipv4() {
        CARRIED_V4
    } else {
        CARRIED_V6
    };
    for &(level, name, label) in CARRIED.iter().chain(family_options) {
        let Ok(wanted) = seccomp::get_int_option(theirs, level, name) else {
            continue;
        };
        if seccomp::get_int_option(ours, level, name).ok() == Some(wanted) {
            continue;
        }
        if let Err(e) = seccomp::set_int_option(ours, level, name, wanted) {
            tracing::warn!("worker {pid}: cannot carry {label} = {wanted} over to its socket: {e}");
        }
    }
    // Buffers: the kernel reports twice what was asked; the FORCE variants
    // (we are root) keep a size above net.core.{r,w}mem_max as the worker had it.
    for (get, force, label) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, "SO_RCVBUF"),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, "SO_SNDBUF"),
    ] {
        let theirs = seccomp::get_int_option(theirs, libc::SOL_SOCKET, get);
        let ours_now = seccomp::get_int_option(ours, libc::SOL_SOCKET, get);
        if let (Ok(theirs), Ok(ours_now)) = (theirs, ours_now)
            && theirs > ours_now
            && let Err(e) = seccomp::set_int_option(ours, libc::SOL_SOCKET, force, theirs / 2)
        {
            tracing::warn!(
                "worker {pid}: cannot carry {label} = {} over to its socket: {e}",
                theirs / 2
            );
        }
    }
    if !listener.address.is_ipv4()
        && seccomp::get_int_option(theirs, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).ok() == Some(0)
    {
        tracing::info!(
            "worker {pid}: its IPv6 socket was dual-stack (IPV6_V6ONLY = 0); listener {:?}'s socket is IPv6-only (IPv4 traffic needs an IPv4 listener, and a bind of its own)",
            listener.name
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn sockaddr_in(port: u16, ip: [u8; 4]) -> Vec<u8> {
        let mut bytes = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        bytes.extend(port.to_be_bytes());
        bytes.extend(ip);
        bytes.extend([0u8; 8]);
        bytes
    }

    #[test]
    fn sockaddrs_parse_by_family() {
        assert_eq!(
            parse_sockaddr(&sockaddr_in(5353, [127, 0, 0, 1])),
            BindAddress::Inet(addr("127.0.0.1:5353"))
        );
        let mut v6 = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v6.extend(53u16.to_be_bytes());
        v6.extend([0u8; 4]); // flowinfo
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend([0u8; 4]); // scope id
        assert_eq!(parse_sockaddr(&v6), BindAddress::Inet(addr("[::1]:53")));
        let mut unix = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        unix.extend(b"/run/x.sock\0");
        assert_eq!(parse_sockaddr(&unix), BindAddress::Other);
        assert_eq!(parse_sockaddr(&[2]), BindAddress::Other);
        assert_eq!(
            parse_sockaddr(&sockaddr_in(1, [1, 2, 3, 4])[..6]),
            BindAddress::Other
        );
    }

    #[test]
    fn addresses_match_by_family_port_and_wildcards() {
        assert!(matches(addr("127.0.0.1:53"), addr("127.0.0.1:53")));
        assert!(matches(addr("127.0.0.1:53"), addr("0.0.0.0:53")));
        assert!(matches(addr("0.0.0.0:53"), addr("127.0.0.1:53")));
        assert!(matches(addr("[::]:53"), addr("[::1]:53")));
        assert!(matches(addr("[::1]:53"), addr("[::]:53")));
        assert!(!matches(addr("127.0.0.1:53"), addr("127.0.0.1:54")));
        assert!(!matches(addr("127.0.0.1:53"), addr("127.0.0.2:53")));
        assert!(!matches(addr("127.0.0.1:53"), addr("[::]:53")));
        assert!(!matches(addr("0.0.0.0:53"), addr("[::ffff:127.0.0.1]:53")));
        assert!(!matches(addr("[::]:53"), addr("0.0.0.0:53")));
    }

    #[test]
    fn the_first_socket_not_held_is_given() {
        let sockets = [100, 101, 102];
        assert_eq!(choose(sockets, &HashSet::new()), Some(0));
        assert_eq!(choose(sockets, &HashSet::from([100])), Some(1));
        // Closed and bound again: the first one comes back.
        assert_eq!(choose(sockets, &HashSet::from([101, 102])), Some(0));
        assert_eq!(choose(sockets, &HashSet::from([100, 101, 102])), None);
    }

    #[test]
    fn missing_names_the_listener() {
        let book = Book {
            listeners: vec![
                ListenerSockets {
                    name: "dns".into(),
                    address: addr("127.0.0.1:53"),
                    sockets: vec![],
                    handed_out: vec![false],
                },
                ListenerSockets {
                    name: "dns6".into(),
                    address: addr("[::1]:53"),
                    sockets: vec![],
                    handed_out: vec![true, false],
                },
            ],
        };
        let missing = book.missing().unwrap();
        assert!(
            missing.contains("never bound listener \"dns\"'s address 127.0.0.1:53"),
            "{missing}"
        );
        assert!(
            missing.contains("bound 1 of its 2 sockets of listener \"dns6\""),
            "{missing}"
        );
        let done = Book { listeners: vec![] };
        assert_eq!(done.missing(), None);
    }
}
