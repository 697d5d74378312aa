//! Which XDP programs an interface runs, from rtnetlink (`RTM_GETLINK`, the
//! `IFLA_XDP` attributes `ip link` shows as `prog/xdp id N`).
//!
//! Needed because the bpf() syscall cannot answer it: an XDP program attached through
//! netlink (by `ip link set dev X xdp obj ...`, or by a library without bpf_link
//! support) is not a link, and aya's `LinkInfo` does not expose an XDP link's
//! interface. Plain byte parsing over a nix socket: no unsafe, no dependency.
use std::io;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};
use std::os::fd::AsRawFd;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
/// The attribute type without the NLA_F_NESTED / NLA_F_NET_BYTEORDER bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Where an XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
    /// In the generic network stack (`XDP_FLAGS_SKB_MODE`).
    Generic,
    /// On the NIC (`XDP_FLAGS_HW_MODE`); never ours, reported for foreign programs.
    Offload,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Offload => "offload",
        })
    }
}

/// The XDP programs attached to one interface, by mode (program ids; 0 = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpState {
    pub native: u32,
    pub generic: u32,
    pub offload: u32,
}

impl XdpState {
    /// Every attached program as (id, mode).
    pub fn programs(&self) -> impl Iterator<Item = (u32, AttachMode)> {
        [
            (self.native, AttachMode::Native),
            (self.generic, AttachMode::Generic),
            (self.offload, AttachMode::Offload),
        ]
        .into_iter()
        .filter(|(id, _)| *id != 0)
    }

    /// The mode `program_id` runs in on this interface, if it does.
    pub fn mode_of(&self, program_id: u32) -> Option<AttachMode> {
        self.programs()
            .find(|(id, _)| *id == program_id)
            .map(|(_, mode)| mode)
    }
}

/// The XDP programs attached to `ifindex` in the calling thread's network namespace.
pub fn xdp_state(ifindex: u32) -> io::Result<XdpState> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;

    let mut request = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN);
    let len = (NLMSG_HDRLEN + IFINFOMSG_LEN) as u32;
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // struct ifinfomsg: family, pad, type, index, flags, change.
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    request.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;

    // One RTM_NEWLINK answers a non-dump request; with all its statistics it stays
    // well below 64 KiB.
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        if let Some(state) = parse_reply(&buffer[..n])? {
            return Ok(state);
        }
    }
}

/// Parses one datagram of replies: `Some` once the link message was found.
fn parse_reply(mut data: &[u8]) -> io::Result<Option<XdpState>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {what}"));
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(bad("truncated message"));
        }
        let body = &data[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .ok_or_else(|| bad("truncated error"))?;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            NLMSG_DONE => return Err(bad("no link in the reply")),
            RTM_NEWLINK => {
                let attrs = body
                    .get(IFINFOMSG_LEN..)
                    .ok_or_else(|| bad("truncated ifinfomsg"))?;
                let mut state = XdpState::default();
                if let Some(xdp) = attributes(attrs).find(|(kind, _)| *kind == IFLA_XDP) {
                    let mut attached = 0u8;
                    let mut single = 0u32;
                    for (kind, value) in attributes(xdp.1) {
                        let id = || {
                            value
                                .get(0..4)
                                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
                        };
                        match kind {
                            IFLA_XDP_ATTACHED => attached = value.first().copied().unwrap_or(0),
                            IFLA_XDP_PROG_ID => single = id().unwrap_or(0),
                            IFLA_XDP_DRV_PROG_ID => state.native = id().unwrap_or(0),
                            IFLA_XDP_SKB_PROG_ID => state.generic = id().unwrap_or(0),
                            IFLA_XDP_HW_PROG_ID => state.offload = id().unwrap_or(0),
                            _ => {}
                        }
                    }
                    // With one mode in use the kernel reports the id once, in
                    // IFLA_XDP_PROG_ID, and the mode in IFLA_XDP_ATTACHED.
                    match attached {
                        XDP_ATTACHED_DRV if state.native == 0 => state.native = single,
                        XDP_ATTACHED_SKB if state.generic == 0 => state.generic = single,
                        XDP_ATTACHED_HW if state.offload == 0 => state.offload = single,
                        _ => {}
                    }
                }
                return Ok(Some(state));
            }
            _ => {}
        }
        let aligned = (len + 3) & !3;
        data = data.get(aligned..).unwrap_or(&[]);
    }
    Ok(None)
}

/// Iterates `(type, payload)` over a buffer of netlink attributes.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn newlink(attrs: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN + attrs.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0; IFINFOMSG_LEN]);
        msg.extend_from_slice(attrs);
        msg
    }

    #[test]
    fn single_mode_program_is_found() {
        let mut xdp = attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]);
        xdp.extend(attr(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes()));
        let mut attrs = attr(3, b"veth0\0"); // IFLA_IFNAME, skipped
        attrs.extend(attr(IFLA_XDP | 0x8000, &xdp));
        let state = parse_reply(&newlink(&attrs)).unwrap().unwrap();
        assert_eq!(
            state,
            XdpState {
                native: 0,
                generic: 42,
                offload: 0
            }
        );
        assert_eq!(state.mode_of(42), Some(AttachMode::Generic));
        assert_eq!(state.mode_of(7), None);
    }

    #[test]
    fn no_program_and_errors() {
        let attrs = attr(IFLA_XDP, &attr(IFLA_XDP_ATTACHED, &[0]));
        assert_eq!(
            parse_reply(&newlink(&attrs)).unwrap().unwrap(),
            XdpState::default()
        );
        let mut error = Vec::new();
        error.extend_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let err = parse_reply(&error).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
