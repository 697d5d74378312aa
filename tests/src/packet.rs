//! Whole Ethernet frames sent out of an interface through an `AF_PACKET` socket, for
//! tests that craft every header byte themselves (the XDP filter's tests feed it
//! malformed, fragmented and optioned packets this way).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, sendto, socket};

/// A send-only `AF_PACKET` socket for one interface.
#[derive(Debug)]
pub struct FrameSender {
    fd: OwnedFd,
    /// The interface's link-layer address, as `getifaddrs` reports it: what `sendto`
    /// needs to pick the interface (its `sll_ifindex`). On a `SOCK_RAW` packet socket
    /// the kernel takes the destination from the frame's own Ethernet header and
    /// ignores the address's MAC.
    link: LinkAddr,
}

impl FrameSender {
    /// Opens a sender for `ifname` in the calling thread's network namespace.
    pub fn open(ifname: &str) -> io::Result<FrameSender> {
        let link = getifaddrs()?
            .filter(|a| a.interface_name == ifname)
            .find_map(|a| a.address.and_then(|s| s.as_link_addr().copied()))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifname}"))
            })?;
        // Protocol 0: this socket only sends, it receives nothing.
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(FrameSender { fd, link })
    }

    /// Sends one whole frame (Ethernet header first) as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let sent = sendto(self.fd.as_raw_fd(), frame, &self.link, MsgFlags::empty())?;
        if sent != frame.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }
}
