//! The listener sockets: UDP, `SO_REUSEPORT`, bound, with the configured receive
//! buffer. The supervisor creates them (it keeps one reference to each for the
//! whole life of a generation) and hands them to workers.
use std::{net::SocketAddr, os::fd::OwnedFd};

use anyhow::Result;
use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    },
};

use crate::{error::InputError, procfs};

/// Creates one bound reuseport socket for `address`.
///
/// The socket is blocking and has `FD_CLOEXEC`: it reaches a worker only through
/// the explicit dup2 in `sys::spawn_worker`, which clears the flag for that copy.
pub fn bind_reuseport(address: SocketAddr, receive_buffer: u64, listener: &str) -> Result<OwnedFd> {
    // A socket of someone else's in the group would share its traffic, and the
    // selector attached to the group below would replace their program.
    check_address(address, listener)?;
    let family = if address.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| anyhow::anyhow!("creating a UDP socket for listener {listener:?}: {e}"))?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if address.is_ipv6() {
        // "[::]:53" means IPv6 only; an IPv4 listener is written as such.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    // SO_RCVBUFFORCE ignores net.core.rmem_max; the default buffer holds only a
    // few hundred datagrams, which is what an upgrade's drain would measure.
    let size = receive_buffer.min(i32::MAX as u64) as usize;
    if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &size) {
        if e == Errno::EPERM {
            return Err(InputError::new(format!(
                "listener {listener:?}: setting receive_buffer needs CAP_NET_ADMIN (SO_RCVBUFFORCE): {e}"
            ))
            .into());
        }
        return Err(anyhow::anyhow!(
            "listener {listener:?}: SO_RCVBUFFORCE: {e}"
        ));
    }
    let sockaddr = SockaddrStorage::from(address);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &sockaddr).map_err(|e| -> anyhow::Error {
        match e {
            Errno::EADDRINUSE => InputError::new(format!(
                "listener {listener:?}: address {address} is already in use by a socket without SO_REUSEPORT (or one owned by another user)"
            ))
            .into(),
            Errno::EADDRNOTAVAIL => InputError::new(format!(
                "listener {listener:?}: address {address} is not an address of this host"
            ))
            .into(),
            Errno::EACCES => InputError::new(format!(
                "listener {listener:?}: binding {address} needs privileges (port below 1024?)"
            ))
            .into(),
            other => anyhow::anyhow!("listener {listener:?}: binding {address}: {other}"),
        }
    })?;
    Ok(fd)
}

/// Refuses `address` if a UDP socket that is not the supervisor's own is bound on
/// it: with `SO_REUSEPORT` (and the same uid) ours would join its group, the two
/// services would take each other's traffic, and attaching our selector would
/// replace its program. Sockets on the wildcard address of the family and the
/// same port count too (one of the two would take the other's datagrams), as does
/// any socket on the port when `address` is the wildcard.
///
/// The supervisor's own sockets are those it holds itself (every generation's,
/// for the generation's whole life), and those held only by workers of a
/// supervisor of this service (they carry `SUPERVISOR_GENERATION` and this
/// listener in `LISTEN_FDNAMES`): after a crash the dead supervisor's workers may
/// still be draining, and the restart replaces their selector as its own.
pub fn check_address(address: SocketAddr, listener: &str) -> Result<()> {
    if address.port() == 0 {
        return Ok(());
    }
    let overlapping = overlapping(address)?;
    if overlapping.is_empty() {
        return Ok(());
    }
    let ours = procfs::socket_inodes("self");
    let mut foreign = Vec::new();
    for socket in overlapping.iter().filter(|s| !ours.contains(&s.inode)) {
        let holders = procfs::socket_holders(socket.inode);
        if !holders.is_empty() && holders.iter().all(|&pid| is_worker_of(pid, listener)) {
            continue;
        }
        let who = if holders.is_empty() {
            format!(
                "a process this supervisor cannot see (uid {}, socket inode {})",
                socket.uid, socket.inode
            )
        } else {
            holders
                .iter()
                .map(|&pid| procfs::describe(pid))
                .collect::<Vec<_>>()
                .join(", ")
        };
        foreign.push(format!("{} held by {who}", socket.local));
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.dedup();
    Err(InputError::new(format!(
        "listener {listener:?}: address {address} is already in use by another program: {}; \
         two services on one address would take each other's traffic",
        foreign.join("; ")
    ))
    .into())
}

/// The UDP sockets bound where `address` would be (same port; same address, or
/// either a wildcard).
fn overlapping(address: SocketAddr) -> Result<Vec<procfs::UdpSocket>> {
    let table = procfs::udp_sockets(address.is_ipv6())
        .map_err(|e| anyhow::anyhow!("reading the kernel's UDP socket table: {e}"))?;
    Ok(table
        .into_iter()
        .filter(|s| {
            s.local.port() == address.port()
                && (s.local.ip() == address.ip()
                    || s.local.ip().is_unspecified()
                    || address.ip().is_unspecified())
        })
        .collect())
}

/// The processes (not this one) that hold a socket on `address` and are workers
/// a supervisor started with `listener`'s sockets: what a supervisor of this
/// service that died left serving there, whether or not its state file says so.
pub fn leftover_workers(address: SocketAddr, listener: &str) -> Vec<i32> {
    if address.port() == 0 {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = overlapping(address)
        .unwrap_or_default()
        .iter()
        .flat_map(|socket| procfs::socket_holders(socket.inode))
        .filter(|&pid| pid != me && is_worker_of(pid, listener))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether `pid` is a worker a supervisor started with `listener`'s sockets
/// (named in `LISTEN_FDNAMES`, or in `SUPERVISOR_BIND_LISTENERS` with
/// `handoff = "bind"`).
fn is_worker_of(pid: i32, listener: &str) -> bool {
    let names = |key| {
        procfs::environment_value(pid, key)
            .is_some_and(|names| names.split(':').any(|name| name == listener))
    };
    procfs::environment_value(pid, "SUPERVISOR_GENERATION").is_some()
        && (names("LISTEN_FDNAMES") || names("SUPERVISOR_BIND_LISTENERS"))
}

/// Whether `socket` is bound to a port (a placeholder kept for an array index is not).
pub fn is_bound(socket: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(socket.as_raw_fd())
        .ok()
        .and_then(|address| {
            address
                .as_sockaddr_in()
                .map(|a| a.port())
                .or_else(|| address.as_sockaddr_in6().map(|a| a.port()))
        })
        .is_some_and(|port| port != 0)
}
