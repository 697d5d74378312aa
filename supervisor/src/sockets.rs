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

use crate::error::InputError;

/// Creates one bound reuseport socket for `address`.
///
/// The socket is blocking and has `FD_CLOEXEC`: it reaches a worker only through
/// the explicit dup2 in `sys::spawn_worker`, which clears the flag for that copy.
pub fn bind_reuseport(address: SocketAddr, receive_buffer: u64, listener: &str) -> Result<OwnedFd> {
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
