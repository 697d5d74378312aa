//! The XDP filter's cost per path with nothing but the program running: the kernel
//! runs it on one crafted frame many times (`BPF_PROG_TEST_RUN`) and reports the
//! mean, next to the empty program on the same frame in the same round.
//!
//! This is the other half of the veth rows ("where it runs"): there the program's
//! time includes fetching the frame's header lines, which another CPU just wrote,
//! and the run-to-run spread of a shared machine is about ±10 ns. Here the frame is
//! hot in the cache and nothing else runs, so what is left is the program's own work
//! per path: its instructions, map reads and calls.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

use crate::bench::rounds::{self, Spread};
use crate::sys;

/// One path through the filter: a frame that takes it.
pub struct FramePath {
    pub label: String,
    pub frame: Vec<u8>,
}

/// A path's figures over the rounds.
pub struct PathCost {
    pub label: String,
    /// The filter's mean run time per round, ns.
    pub filter_ns: Vec<f64>,
    /// The empty program's on the same frame, same round.
    pub empty_ns: Vec<f64>,
    /// The filter's XDP action on the last run (1 = drop, 2 = pass).
    pub action: u32,
}

impl PathCost {
    /// The filter above the empty program, per round.
    pub fn above(&self) -> Vec<f64> {
        self.filter_ns
            .iter()
            .zip(&self.empty_ns)
            .map(|(f, e)| f - e)
            .collect()
    }

    pub fn filter(&self) -> Option<Spread> {
        Spread::of(&self.filter_ns)
    }

    pub fn empty(&self) -> Option<Spread> {
        Spread::of(&self.empty_ns)
    }
}

/// Runs the filter and the empty program (`r0 = XDP_DROP`, loaded here) on every
/// path's frame `repeat` times per round, `round_count` rounds, the paths in
/// alternating order.
pub fn measure(
    filter: BorrowedFd<'_>,
    paths: &[FramePath],
    round_count: usize,
    repeat: u32,
) -> Result<Vec<PathCost>, String> {
    let empty = sys::load_xdp_drop_program().map_err(|e| format!("load the empty program: {e}"))?;
    let mut costs: Vec<PathCost> = paths
        .iter()
        .map(|p| PathCost {
            label: p.label.clone(),
            filter_ns: Vec::new(),
            empty_ns: Vec::new(),
            action: 0,
        })
        .collect();
    let order: Vec<usize> = (0..paths.len()).collect();
    for round in 0..round_count {
        for i in rounds::alternating(&order, round) {
            let frame = &paths[i].frame;
            let (action, filter_ns) = sys::test_run_xdp(filter, frame, repeat)
                .map_err(|e| format!("BPF_PROG_TEST_RUN of the filter: {e}"))?;
            let (_, empty_ns) = sys::test_run_xdp(empty.as_fd(), frame, repeat)
                .map_err(|e| format!("BPF_PROG_TEST_RUN of the empty program: {e}"))?;
            costs[i].filter_ns.push(f64::from(filter_ns));
            costs[i].empty_ns.push(f64::from(empty_ns));
            costs[i].action = action;
        }
    }
    Ok(costs)
}

/// An Ethernet frame carrying a UDP datagram of `payload` bytes from `src` (port
/// 40 000) to `dst`, with lengths that agree (the filter checks them) and zero
/// checksums (it does not).
pub fn udp_frame(src: IpAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let udp_len = (8 + payload) as u16;
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&40_000u16.to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.resize(udp_len as usize, 0x5a);
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&(20 + udp_len).to_be_bytes());
            frame.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&udp_len.to_be_bytes());
            frame.extend_from_slice(&[17, 64]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
    frame.extend_from_slice(&udp);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_consistent_lengths() {
        let v4 = udp_frame(
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1:5300".parse().unwrap(),
            22,
        );
        assert_eq!(v4.len(), 14 + 20 + 8 + 22);
        assert_eq!(u16::from_be_bytes([v4[16], v4[17]]), 20 + 8 + 22);
        let v6 = udp_frame(
            "fd00::2".parse().unwrap(),
            "[fd00::1]:5300".parse().unwrap(),
            22,
        );
        assert_eq!(v6.len(), 14 + 40 + 8 + 22);
        assert_eq!(u16::from_be_bytes([v6[18], v6[19]]), 8 + 22);
        assert_eq!(u16::from_be_bytes([v6[56], v6[57]]), 5300);
        assert_eq!(u16::from_be_bytes([v6[58], v6[59]]), 8 + 22);
    }
}
