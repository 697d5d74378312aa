//! The XDP filter at the interface (issue 4), against the real kernel.
//!
//! Every test builds two network namespaces joined by a veth pair: `server` (the
//! supervisor's side, XDP on `veth-a`) and `client` (`veth-b`, with extra 10.x source
//! addresses). Until the daemon wires `[xdp]` in, the tests drive the supervisor's
//! library API (`supervisor::xdp::XdpFilter`) directly from a thread inside the
//! server namespace, with plain UDP sockets standing in for workers. Each test pins
//! under its own directory of /sys/fs/bpf and removes it.
//!
//! Crafted (malformed, fragmented, with IP options) frames go out through an
//! AF_PACKET socket on `veth-b`, so every byte of the Ethernet, IP and UDP headers is
//! ours to get wrong.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use supervisor::error::InputError;
use supervisor::xdp::{AttachMode, RateLimit, XdpConfig, XdpCounters, XdpFilter, XdpMode};
use supervisor_common::xdp::{VERDICT_ALLOW, VERDICT_DENY, VERDICT_NOT_ALLOWED, prefix_table};
use supervisor_tests::netns::ip;
use supervisor_tests::packet::FrameSender;
use supervisor_tests::{PinDir, TestNet, require_root};

const PORT: u16 = 5300;
const OTHER_PORT: u16 = 5301;

/// Two namespaces, a veth pair, a pin directory.
struct Lab {
    server: TestNet,
    client: TestNet,
    pins: PinDir,
    /// Third octet of the pair's 10.200.X.0/24.
    subnet: u8,
    server_mac: [u8; 6],
    client_mac: [u8; 6],
    sources: std::sync::Mutex<HashSet<u8>>,
}

impl Lab {
    fn new() -> Lab {
        require_root();
        let (server, client) = TestNet::pair();
        let pins = PinDir::new();
        let subnet = server.veth().unwrap().addr.octets()[2];
        let server_mac = mac(&server, "veth-a");
        let client_mac = mac(&client, "veth-b");
        // A permanent neighbour entry: the first datagrams must not wait in (and
        // overflow) the ARP queue, or "every datagram arrived" would test ARP.
        ip(&[
            "-n",
            client.name(),
            "neigh",
            "replace",
            &server.veth().unwrap().addr.to_string(),
            "lladdr",
            &format_mac(server_mac),
            "dev",
            "veth-b",
            "nud",
            "permanent",
        ]);
        Lab {
            server,
            client,
            pins,
            subnet,
            server_mac,
            client_mac,
            sources: Default::default(),
        }
    }

    fn server_addr(&self) -> Ipv4Addr {
        self.server.veth().unwrap().addr
    }

    fn listener(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_addr().into(), port)
    }

    /// 10.200.X.`host` on the client's veth (added on first use).
    fn source(&self, host: u8) -> Ipv4Addr {
        let addr = Ipv4Addr::new(10, 200, self.subnet, host);
        if host != 2 && self.sources.lock().unwrap().insert(host) {
            ip(&[
                "-n",
                self.client.name(),
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "veth-b",
            ]);
        }
        addr
    }

    /// "10.200.X.`host`/`len`".
    fn prefix(&self, host: u8, len: u8) -> String {
        format!("10.200.{}.{host}/{len}", self.subnet)
    }

    fn service_dir(&self) -> PathBuf {
        self.pins.path().join("svc")
    }

    fn config(&self) -> XdpConfig {
        XdpConfig {
            interface: "veth-a".into(),
            mode: XdpMode::Auto,
            deny: vec![],
            allow: vec![],
            rate_limit: None,
            drop_malformed: true,
        }
    }

    fn start(&self, config: &XdpConfig, listeners: &[SocketAddr]) -> anyhow::Result<XdpFilter> {
        let dir = self.service_dir();
        self.server
            .run_in(|| XdpFilter::start(config, &dir, listeners))
    }

    /// A UDP socket in the server namespace with a receive buffer large enough that
    /// nothing a test sends is dropped at the socket.
    fn receiver(&self, port: u16) -> UdpSocket {
        let addr = self.listener(port);
        self.server.run_in(|| {
            let socket = UdpSocket::bind(addr).expect("bind receiver");
            setsockopt(&socket, sockopt::RcvBufForce, &(32 << 20)).expect("SO_RCVBUFFORCE");
            socket
        })
    }

    /// Sends `count` datagrams `[tag, seq(4 bytes)]` from `source` to `to`, paced so
    /// the veth ring never overflows.
    fn send(&self, source: Ipv4Addr, to: SocketAddr, count: u32, tag: u8) {
        self.client.run_in(|| {
            let socket = UdpSocket::bind((source, 0)).expect("bind sender");
            for seq in 0..count {
                let mut payload = vec![tag];
                payload.extend_from_slice(&seq.to_be_bytes());
                socket.send_to(&payload, to).expect("send");
                if seq % 32 == 31 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    }

    /// Sends raw Ethernet frames out of the client's veth (AF_PACKET).
    fn send_frames(&self, frames: &[Vec<u8>]) {
        self.client.run_in(|| raw_send("veth-b", frames))
    }

    fn ipv4(&self, source: Ipv4Addr) -> Ipv4Packet {
        Ipv4Packet::new(source, self.server_addr(), self.client_mac, self.server_mac)
    }
}

fn mac(net: &TestNet, ifname: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-n", net.name(), "link", "show", "dev", ifname])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {ifname}: {text}"));
    let bytes: Vec<u8> = field
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads until the socket has been quiet for `quiet`: (source, payload) in order.
fn drain(socket: &UdpSocket, quiet: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
    socket.set_read_timeout(Some(quiet)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        out.push((from, buf[..n].to_vec()));
    }
    out
}

/// Datagrams per source address.
fn per_source(datagrams: &[(SocketAddr, Vec<u8>)]) -> BTreeMap<IpAddr, usize> {
    let mut counts = BTreeMap::new();
    for (from, _) in datagrams {
        *counts.entry(from.ip()).or_insert(0) += 1;
    }
    counts
}

/// Polls the filter's counters until `done` holds (5 s at most) and returns them.
fn counters_when(filter: &XdpFilter, done: impl Fn(&XdpCounters) -> bool) -> XdpCounters {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counters = filter.status().counters;
        if done(&counters) || Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the interface runs an XDP program, per `ip link` ("prog/xdp id N").
fn xdp_program_on(net: &TestNet, ifname: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", net.name(), "-d", "link", "show", "dev", ifname])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w.starts_with("prog/xdp") {
            // "prog/xdp id 42 ..."
            if words.next() == Some("id") {
                return words.next().and_then(|id| id.parse().ok());
            }
        }
    }
    None
}

/// A TCP connection from `source` (a SYN, a SYN-ACK, an ACK); panics if it fails.
fn tcp_connect(source: Ipv4Addr, to: SocketAddr) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )
    .unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .unwrap_or_else(|e| panic!("TCP from {source} to {to}: {e}"));
    let _stream = TcpStream::from(fd);
}

fn is_input_error(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<InputError>())
}

// ---------------------------------------------------------------------------------
// Raw frames.

/// An IPv4 packet in an Ethernet frame, every field overridable.
#[derive(Clone)]
struct Ipv4Packet {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// IHL in 32-bit words, as written (may lie).
    ihl: u8,
    /// Option bytes actually present after the fixed header.
    options: Vec<u8>,
    protocol: u8,
    id: u16,
    /// Flags and fragment offset (in 8-byte units), as written.
    fragment: u16,
    /// The IP payload (UDP header and data), as present.
    payload: Vec<u8>,
    /// Total length as written; default = the real length.
    total_len: Option<u16>,
}

impl Ipv4Packet {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Ipv4Packet {
        Ipv4Packet {
            src_mac,
            dst_mac,
            src,
            dst,
            ihl: 5,
            options: vec![],
            protocol: 17,
            id: 1,
            fragment: 0,
            payload: vec![],
            total_len: None,
        }
    }

    /// A UDP payload with the given length field (None = correct), checksum 0 (none).
    fn udp(mut self, dst_port: u16, data: &[u8], length: Option<u16>) -> Self {
        let len = length.unwrap_or((8 + data.len()) as u16);
        let mut udp = Vec::new();
        udp.extend_from_slice(&40000u16.to_be_bytes());
        udp.extend_from_slice(&dst_port.to_be_bytes());
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(data);
        self.payload = udp;
        self
    }

    fn frame(&self) -> Vec<u8> {
        let mut header = vec![
            (4 << 4) | (self.ihl & 0x0f),
            0,
            0,
            0, // total length, below
        ];
        header.extend_from_slice(&self.id.to_be_bytes());
        header.extend_from_slice(&self.fragment.to_be_bytes());
        header.extend_from_slice(&[64, self.protocol, 0, 0]);
        header.extend_from_slice(&self.src.octets());
        header.extend_from_slice(&self.dst.octets());
        header.extend_from_slice(&self.options);
        let total = self
            .total_len
            .unwrap_or((header.len() + self.payload.len()) as u16);
        header[2..4].copy_from_slice(&total.to_be_bytes());
        let checksum = internet_checksum(&header);
        header[10..12].copy_from_slice(&checksum.to_be_bytes());

        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&self.payload);
        frame
    }
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 frame: fixed header, extension headers as given, then the payload.
/// Built from raw parts, so the test needs no IPv6 address in either namespace: the
/// filter judges the packet before any address matters.
#[derive(Clone)]
struct Ipv6Packet {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    /// The first next-header value; the extension headers chain on from it.
    next_header: u8,
    /// Extension headers, each complete (their own next-header bytes included).
    extensions: Vec<u8>,
    payload: Vec<u8>,
    /// Payload length as written; default = the real length.
    payload_len: Option<u16>,
}

impl Ipv6Packet {
    fn frame(&self) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        let len = self
            .payload_len
            .unwrap_or((self.extensions.len() + self.payload.len()) as u16);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[self.next_header, 64]);
        frame.extend_from_slice(&self.src.octets());
        frame.extend_from_slice(&self.dst.octets());
        frame.extend_from_slice(&self.extensions);
        frame.extend_from_slice(&self.payload);
        frame
    }
}

/// A UDP header and data; `length` None = correct. Checksum left 0: the filter does
/// not check it (the kernel would, for IPv6, after the filter).
fn udp_bytes(dst_port: u16, data: &[u8], length: Option<u16>) -> Vec<u8> {
    let len = length.unwrap_or((8 + data.len()) as u16);
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    udp
}

/// Sends whole Ethernet frames out of `ifname` (in the calling thread's namespace),
/// pausing briefly every 32 frames so the veth's backlog never drops one.
fn raw_send(ifname: &str, frames: &[Vec<u8>]) {
    let sender =
        FrameSender::open(ifname).unwrap_or_else(|e| panic!("AF_PACKET socket on {ifname}: {e}"));
    for (i, frame) in frames.iter().enumerate() {
        sender
            .send(frame)
            .unwrap_or_else(|e| panic!("send a frame out of {ifname}: {e}"));
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

// ---------------------------------------------------------------------------------
// Tests.

/// Denied and not-allowed sources never reach the socket, allowed ones do, the
/// counters say exactly that, and traffic that is not the service's (another port,
/// TCP to the same port) passes untouched.
#[test]
fn deny_and_allow_decide_at_the_interface() {
    let lab = Lab::new();
    let allowed = lab.source(2);
    let denied = lab.source(20); // in the allow prefix and in a deny prefix: deny wins
    let not_allowed = lab.source(40);
    let mut config = lab.config();
    config.deny = vec![lab.prefix(16, 28)];
    config.allow = vec![lab.prefix(0, 27)];
    let filter = lab
        .start(&config, &[lab.listener(PORT)])
        .expect("start the filter");
    let status = filter.status();
    assert_eq!(
        status.mode,
        AttachMode::Native,
        "veth runs XDP natively: {status:?}"
    );
    assert_eq!(status.ruleset_generation, 1);
    assert_eq!(
        xdp_program_on(&lab.server, "veth-a"),
        Some(status.program_id)
    );

    let service = lab.receiver(PORT);
    let other = lab.receiver(OTHER_PORT);
    const N: u32 = 300;
    for (i, source) in [allowed, denied, not_allowed].into_iter().enumerate() {
        lab.send(source, lab.listener(PORT), N, i as u8);
        lab.send(source, lab.listener(OTHER_PORT), N, i as u8);
    }
    // TCP to the service's port (a SYN, then a whole connection) is not ours.
    let tcp = lab
        .server
        .run_in(|| TcpListener::bind(lab.listener(PORT)).unwrap());
    lab.client
        .run_in(|| tcp_connect(not_allowed, lab.listener(PORT)));
    drop(tcp);

    let got = per_source(&drain(&service, Duration::from_millis(300)));
    assert_eq!(
        got,
        BTreeMap::from([(IpAddr::from(allowed), N as usize)]),
        "only the allowed source reaches the service"
    );
    let got_other = per_source(&drain(&other, Duration::from_millis(300)));
    for source in [allowed, denied, not_allowed] {
        assert_eq!(
            got_other.get(&IpAddr::from(source)),
            Some(&(N as usize)),
            "another port is not filtered: {got_other:?}"
        );
    }

    let counters = counters_when(&filter, |c| {
        c.passed >= u64::from(N) && c.denied >= u64::from(N) && c.not_allowed >= u64::from(N)
    });
    assert_eq!(counters.passed, u64::from(N), "{counters:?}");
    assert_eq!(counters.denied, u64::from(N), "{counters:?}");
    assert_eq!(counters.not_allowed, u64::from(N), "{counters:?}");
    assert_eq!(counters.malformed, 0, "{counters:?}");
    assert_eq!(counters.rate_limited, 0, "{counters:?}");
    assert!(
        counters.not_ours >= 3 * u64::from(N),
        "other port and TCP count as not ours: {counters:?}"
    );
    assert!(counters.dropped_bytes > 0);
    println!("{}", filter.status().render());
    filter.remove().expect("remove the filter");
    assert_eq!(
        xdp_program_on(&lab.server, "veth-a"),
        None,
        "remove detaches"
    );
}

/// Malformed datagrams to the service are dropped and counted; well-formed oddities
/// (IP options, a fragmented datagram) still get through, and malformed traffic to
/// other ports is not ours to judge.
#[test]
fn malformed_datagrams_are_dropped_and_counted() {
    let lab = Lab::new();
    let source = lab.source(2);
    let denied = lab.source(20);
    let mut config = lab.config();
    config.deny = vec![lab.prefix(20, 32)];
    let filter = lab
        .start(&config, &[lab.listener(PORT)])
        .expect("start the filter");
    let service = lab.receiver(PORT);
    let base = lab.ipv4(source);
    let data = [7u8; 20];

    let malformed: Vec<(&str, Vec<u8>)> = vec![
        (
            "UDP length beyond the IP payload",
            base.clone().udp(PORT, &data, Some(8 + 30)).frame(),
        ),
        (
            "UDP length short of the IP payload (trailing bytes the kernel would trim)",
            base.clone().udp(PORT, &data, Some(8 + 10)).frame(),
        ),
        (
            "UDP length below the header size",
            base.clone().udp(PORT, &data, Some(4)).frame(),
        ),
        (
            "IP total length beyond the frame",
            Ipv4Packet {
                total_len: Some(200),
                ..base.clone().udp(PORT, &data, None)
            }
            .frame(),
        ),
        (
            "IP total length cutting into the UDP header",
            Ipv4Packet {
                total_len: Some(24),
                ..base.clone().udp(PORT, &data, None)
            }
            .frame(),
        ),
        (
            "UDP header cut short (4 bytes)",
            Ipv4Packet {
                payload: vec![0x9c, 0x40, 0x14, 0xb4],
                ..base.clone()
            }
            .frame(),
        ),
        (
            "IHL claiming 60 bytes of options that are not there",
            Ipv4Packet {
                ihl: 15,
                ..base.clone().udp(PORT, &[], None)
            }
            .frame(),
        ),
        (
            "IHL below 5",
            Ipv4Packet {
                ihl: 4,
                ..base.clone().udp(PORT, &data, None)
            }
            .frame(),
        ),
        (
            "tiny first fragment without a whole UDP header",
            Ipv4Packet {
                fragment: 0x2000,
                payload: vec![0x9c, 0x40, 0x14, 0xb4],
                ..base.clone()
            }
            .frame(),
        ),
        (
            "first fragment whose UDP length does not exceed it",
            Ipv4Packet {
                fragment: 0x2000,
                ..base.clone().udp(PORT, &[1; 16], None)
            }
            .frame(),
        ),
    ];
    const ROUNDS: usize = 20;
    let frames: Vec<Vec<u8>> = (0..ROUNDS)
        .flat_map(|_| malformed.iter().map(|(_, f)| f.clone()))
        .collect();
    lab.send_frames(&frames);
    let expected = (ROUNDS * malformed.len()) as u64;
    let counters = counters_when(&filter, |c| c.malformed >= expected);
    assert_eq!(
        counters.malformed, expected,
        "every malformed frame is counted once: {counters:?}"
    );
    assert_eq!(counters.passed, 0, "{counters:?}");
    let got = drain(&service, Duration::from_millis(300));
    assert!(
        got.is_empty(),
        "no malformed datagram reaches the service: {got:?}"
    );

    // The same malformations to another port are not the service's business.
    let other: Vec<Vec<u8>> = [
        base.clone().udp(OTHER_PORT, &data, Some(8 + 30)),
        base.clone().udp(OTHER_PORT, &data, Some(8 + 10)),
    ]
    .iter()
    .map(Ipv4Packet::frame)
    .collect();
    let before = filter.status().counters;
    lab.send_frames(&other);
    let after = counters_when(&filter, |c| c.not_ours >= before.not_ours + 2);
    assert_eq!(after.malformed, before.malformed, "{after:?}");

    // Well-formed: IP options (IHL 6, four NOPs) are skipped by IHL, not mistaken
    // for the UDP header.
    let with_options = Ipv4Packet {
        ihl: 6,
        options: vec![1, 1, 1, 1],
        id: 7,
        ..base.clone().udp(PORT, b"options", None)
    };
    // A datagram in two fragments: the first carries the UDP header and the length
    // of the whole datagram; the second has no UDP header and passes as a fragment.
    let fragments = |packet: &Ipv4Packet, id: u16| -> Vec<Vec<u8>> {
        let whole = packet.clone().udp(PORT, &[9u8; 100], None).payload; // 108 bytes
        let first = Ipv4Packet {
            id,
            fragment: 0x2000,
            payload: whole[..48].to_vec(),
            ..packet.clone()
        };
        let second = Ipv4Packet {
            id,
            fragment: 48 / 8,
            payload: whole[48..].to_vec(),
            ..packet.clone()
        };
        vec![first.frame(), second.frame()]
    };
    let mut frames = vec![with_options.frame()];
    frames.extend(fragments(&base, 100));
    // The same fragmented datagram from a denied source: its first fragment is
    // dropped (denied), the second passes and never completes a datagram.
    frames.extend(fragments(&lab.ipv4(denied), 101));
    let before = filter.status().counters;
    lab.send_frames(&frames);
    let got = drain(&service, Duration::from_millis(300));
    let payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(
        payloads,
        vec![&b"options"[..], &[9u8; 100][..]],
        "options and reassembled fragments arrive: {got:?}"
    );
    let after = counters_when(&filter, |c| c.fragments >= before.fragments + 2);
    assert_eq!(
        after.passed - before.passed,
        2,
        "options datagram + first fragment: {after:?}"
    );
    assert_eq!(
        after.fragments - before.fragments,
        2,
        "two second fragments: {after:?}"
    );
    assert_eq!(
        after.denied - before.denied,
        1,
        "the denied first fragment: {after:?}"
    );
    assert_eq!(after.malformed, before.malformed, "{after:?}");

    // drop_malformed = false lets them through to the kernel (which delivers the
    // one with trailing bytes, trimmed).
    let mut lenient = config.clone();
    lenient.drop_malformed = false;
    let mut filter = filter;
    filter.apply(&lenient, &[lab.listener(PORT)]).unwrap();
    lab.send_frames(&[base.clone().udp(PORT, &data, Some(8 + 10)).frame()]);
    let got = drain(&service, Duration::from_millis(300));
    assert_eq!(
        got.len(),
        1,
        "with drop_malformed = false the kernel gets it: {got:?}"
    );
    assert_eq!(got[0].1, vec![7u8; 10]);
    filter.remove().unwrap();
}

/// Rules change (`apply`) under load: no allowed datagram is lost, the new rules
/// take effect, and the link (id) stays.
#[test]
fn rules_change_under_load_loses_nothing_and_keeps_the_link() {
    let lab = Lab::new();
    let allowed = lab.source(2);
    let first = lab.source(20);
    let second = lab.source(40);
    let listeners = [lab.listener(PORT)];
    let mut deny_first = lab.config();
    deny_first.deny = vec![lab.prefix(20, 32)];
    let mut deny_second = lab.config();
    deny_second.deny = vec![
        lab.prefix(40, 32),
        "192.0.2.0/24".into(),
        "2001:db8::/32".into(),
    ];
    deny_second.allow = vec![lab.prefix(0, 26)];
    deny_second.rate_limit = Some(RateLimit {
        packets_per_second: 1_000_000,
        burst: Some(1_000_000),
    });

    let mut filter = lab
        .start(&deny_first, &listeners)
        .expect("start the filter");
    let link = filter.link_id();
    let service = lab.receiver(PORT);

    // The reader: sequence numbers from the allowed source.
    let stop = Arc::new(AtomicBool::new(false));
    const N: u32 = 30_000;
    let (seen, switches) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut seen = vec![0u32; N as usize];
            let mut buf = [0u8; 64];
            service
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            loop {
                match service.recv_from(&mut buf) {
                    Ok((5, from)) if from.ip() == IpAddr::from(allowed) => {
                        let seq = u32::from_be_bytes(buf[1..5].try_into().unwrap());
                        seen[seq as usize] += 1;
                    }
                    Ok(_) => {}
                    Err(_) if stop.load(Ordering::Relaxed) => return seen,
                    Err(_) => {}
                }
            }
        });
        let sender = s.spawn(|| lab.send(allowed, lab.listener(PORT), N, 0));
        let mut switches = 0;
        while !sender.is_finished() {
            let rules = if switches % 2 == 0 {
                &deny_second
            } else {
                &deny_first
            };
            filter.apply(rules, &listeners).expect("apply");
            switches += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        sender.join().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), switches)
    });
    let lost: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, n)| **n == 0)
        .map(|(i, _)| i)
        .collect();
    let duplicated = seen.iter().filter(|n| **n > 1).count();
    println!("{switches} ruleset switches during {N} datagrams");
    assert!(
        switches >= 10,
        "the switches overlapped the load ({switches})"
    );
    assert!(
        lost.is_empty(),
        "{} allowed datagrams lost across ruleset switches, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(duplicated, 0);
    assert_eq!(filter.link_id(), link, "the link stays the same");
    assert_eq!(filter.status().ruleset_generation, 1 + switches);

    // The last rules are the ones in force.
    filter.apply(&deny_second, &listeners).unwrap();
    let before = filter.status().counters;
    lab.send(first, lab.listener(PORT), 50, 1);
    lab.send(second, lab.listener(PORT), 50, 2);
    let got = per_source(&drain(&service, Duration::from_millis(300)));
    assert_eq!(
        got,
        BTreeMap::from([(IpAddr::from(first), 50)]),
        "deny_second admits .20 and denies .40"
    );
    let after = counters_when(&filter, |c| c.denied >= before.denied + 50);
    assert_eq!(after.denied - before.denied, 50);
    filter.apply(&deny_first, &listeners).unwrap();
    lab.send(first, lab.listener(PORT), 50, 1);
    lab.send(second, lab.listener(PORT), 50, 2);
    let got = per_source(&drain(&service, Duration::from_millis(300)));
    assert_eq!(
        got,
        BTreeMap::from([(IpAddr::from(second), 50)]),
        "deny_first admits .40 and denies .20"
    );

    // A bad rule changes nothing.
    let generation = filter.status().ruleset_generation;
    let mut bad = deny_second.clone();
    bad.deny.push("10.0.0.1/8".into());
    let err = filter.apply(&bad, &listeners).unwrap_err();
    assert!(is_input_error(&err), "{err:#}");
    assert!(format!("{err:#}").contains("xdp.deny[3]"), "{err:#}");
    assert_eq!(filter.status().ruleset_generation, generation);
    lab.send(first, lab.listener(PORT), 10, 1);
    assert!(
        drain(&service, Duration::from_millis(200)).is_empty(),
        "deny_first still in force"
    );

    // prepare() builds and validates but changes nothing until commit().
    let prepared = filter.prepare(&deny_second, &listeners).unwrap();
    lab.send(second, lab.listener(PORT), 10, 2);
    assert_eq!(
        drain(&service, Duration::from_millis(200)).len(),
        10,
        "deny_first until the commit"
    );
    let readers = supervisor::xdp::ReadersGone::wait_blocking(filter.ruleset_generation());
    filter.commit(prepared, readers).unwrap();
    assert_eq!(filter.status().ruleset_generation, generation + 1);
    lab.send(second, lab.listener(PORT), 10, 2);
    assert!(
        drain(&service, Duration::from_millis(200)).is_empty(),
        "deny_second after it"
    );
    filter.remove().unwrap();
}

/// The rate limit admits a burst, then the sustained rate, per source.
/// The listener match by port: several addresses of a family on one port (the hash),
/// a wildcard, one address, and a port without listeners. Every frame comes from a
/// denied source, so a listener match shows as `denied` and a miss as `not_ours`.
#[test]
fn listeners_match_by_port_with_one_several_or_any_address() {
    let lab = Lab::new();
    let source = lab.source(2);
    let mut config = lab.config();
    config.deny = vec![lab.prefix(2, 32)];
    let other = |host: u8| Ipv4Addr::new(10, 200, lab.subnet, host);
    let listeners = [
        lab.listener(PORT),
        SocketAddr::new(other(77).into(), PORT),
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT + 1),
        SocketAddr::new(other(78).into(), PORT + 2),
    ];
    let filter = lab.start(&config, &listeners).expect("start the filter");
    let cases = [
        (
            "the first of two addresses on a port",
            lab.server_addr(),
            PORT,
            true,
        ),
        (
            "the second of two addresses on a port",
            other(77),
            PORT,
            true,
        ),
        ("a third address on that port", other(99), PORT, false),
        (
            "any address on a wildcard's port",
            other(99),
            PORT + 1,
            true,
        ),
        (
            "another address on a one-address port",
            lab.server_addr(),
            PORT + 2,
            false,
        ),
        ("the one address on its port", other(78), PORT + 2, true),
        (
            "a port without listeners",
            lab.server_addr(),
            PORT + 3,
            false,
        ),
    ];
    let mut expected_denied = 0;
    for (what, dst, port, ours) in cases {
        let before = filter.status().counters;
        let frame = Ipv4Packet::new(source, dst, lab.client_mac, lab.server_mac)
            .udp(port, &[1, 2, 3], None)
            .frame();
        lab.send_frames(&[frame]);
        let after = if ours {
            expected_denied += 1;
            counters_when(&filter, |c| c.denied > before.denied)
        } else {
            counters_when(&filter, |c| c.not_ours > before.not_ours)
        };
        assert_eq!(after.denied, expected_denied, "{what}: {after:?}");
    }
    drop(filter);
}

#[test]
fn rate_limit_is_per_source() {
    let lab = Lab::new();
    let a = lab.source(2);
    let b = lab.source(20);
    let mut config = lab.config();
    // 10 per second with a burst of 50: a fast run of 200 gets about 50 through.
    config.rate_limit = Some(RateLimit {
        packets_per_second: 10,
        burst: Some(50),
    });
    let filter = lab.start(&config, &[lab.listener(PORT)]).unwrap();
    let service = lab.receiver(PORT);
    let started = Instant::now();
    lab.send(a, lab.listener(PORT), 200, 0);
    lab.send(b, lab.listener(PORT), 200, 1);
    let elapsed = started.elapsed().as_secs_f64();
    let got = per_source(&drain(&service, Duration::from_millis(300)));
    // The burst, plus what the rate refills while sending (bounded by elapsed time).
    let most = 50 + (elapsed * 10.0).ceil() as usize + 1;
    for source in [a, b] {
        let n = got.get(&IpAddr::from(source)).copied().unwrap_or(0);
        assert!(
            (50..=most).contains(&n),
            "{source}: {n} admitted, expected 50..={most}: {got:?}"
        );
    }
    let counters = filter.status().counters;
    assert_eq!(counters.passed + counters.rate_limited, 400, "{counters:?}");
    assert_eq!(counters.passed as usize, got.values().sum::<usize>());
    filter.remove().unwrap();
}

/// Restarting the supervisor (dropping the filter without unpinning, starting again)
/// keeps the link attached all along and the counters; a changed program is
/// swapped in by a link update under the same link.
#[test]
fn restart_keeps_the_link_and_the_counters() {
    let lab = Lab::new();
    let allowed = lab.source(2);
    let denied = lab.source(20);
    let mut config = lab.config();
    config.deny = vec![lab.prefix(20, 32)];
    let listeners = [lab.listener(PORT)];
    let service = lab.receiver(PORT);

    let filter = lab.start(&config, &listeners).unwrap();
    let (link, program) = (filter.link_id(), filter.status().program_id);
    lab.send(denied, lab.listener(PORT), 100, 1);
    lab.send(allowed, lab.listener(PORT), 100, 0);
    let before = counters_when(&filter, |c| c.denied >= 100 && c.passed >= 100);
    assert_eq!((before.denied, before.passed), (100, 100));
    drop(filter); // a supervisor that exits (or dies) without unpinning

    // No supervisor: the pinned link keeps filtering.
    assert_eq!(xdp_program_on(&lab.server, "veth-a"), Some(program));
    lab.send(denied, lab.listener(PORT), 100, 1);
    lab.send(allowed, lab.listener(PORT), 100, 0);
    let got = per_source(&drain(&service, Duration::from_millis(300)));
    assert_eq!(
        got,
        BTreeMap::from([(IpAddr::from(allowed), 200)]),
        "still filtered without a supervisor"
    );

    // Same build: adopted as is (same link, same program) with the counters.
    let filter = lab.start(&config, &listeners).unwrap();
    let status = filter.status();
    assert_eq!(
        (status.link_id, status.program_id),
        (link, program),
        "{status:?}"
    );
    assert_eq!(
        (status.counters.denied, status.counters.passed),
        (200, 200),
        "counters survive: {status:?}"
    );
    assert_eq!(status.ruleset_generation, 2);
    drop(filter);

    // A build whose maps differ (simulated: one pin missing) gets fresh maps and its
    // program swapped in by a link update: same link, new program, and traffic from
    // the denied source never leaks, not even during the swap.
    std::fs::remove_file(lab.service_dir().join("xdp/veth-a/counters")).unwrap();
    let stop = AtomicBool::new(false);
    let filter = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                lab.send(denied, lab.listener(PORT), 200, 2);
                sent += 200;
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(100));
        let filter = lab.start(&config, &listeners);
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(sent >= 400);
        filter.unwrap()
    });
    let status = filter.status();
    assert_eq!(status.link_id, link, "the same link: {status:?}");
    assert_ne!(
        status.program_id, program,
        "a new program through BPF_LINK_UPDATE: {status:?}"
    );
    assert_eq!(
        xdp_program_on(&lab.server, "veth-a"),
        Some(status.program_id)
    );
    let leaked = drain(&service, Duration::from_millis(300));
    assert!(
        leaked.is_empty(),
        "{} datagrams from the denied source leaked during the link update",
        leaked.len()
    );
    filter.remove().unwrap();
    assert_eq!(xdp_program_on(&lab.server, "veth-a"), None);
}

/// The IPv6 path: prefixes, extension headers walked (a hop-by-hop header does not
/// smuggle a denied source past the filter), fragments, malformed packets.
/// Judged by the counters: the frames are addressed to documentation addresses
/// that neither namespace has, which the filter does not need.
#[test]
fn ipv6_is_filtered_through_extension_headers() {
    let lab = Lab::new();
    let service: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let good: std::net::Ipv6Addr = "2001:db8:1::2".parse().unwrap();
    let bad: std::net::Ipv6Addr = "2001:db8:bad::2".parse().unwrap();
    let mut config = lab.config();
    config.deny = vec!["2001:db8:bad::/48".into()];
    let filter = lab
        .start(&config, &[SocketAddr::new(service.into(), PORT)])
        .unwrap();

    let packet = |src, next_header, extensions: Vec<u8>, payload: Vec<u8>| Ipv6Packet {
        src_mac: lab.client_mac,
        dst_mac: lab.server_mac,
        src,
        dst: service,
        next_header,
        extensions,
        payload,
        payload_len: None,
    };
    let data = [5u8; 12];
    let udp = udp_bytes(PORT, &data, None);
    // Hop-by-hop options, 8 bytes: next header UDP, length 0, a PadN of 6 bytes.
    let hop_by_hop = |next: u8| vec![next, 0, 1, 4, 0, 0, 0, 0];
    // Fragment header: next header, reserved, offset (in 8-byte units) << 3 | M, id.
    let fragment = |offset: u16, more: bool| {
        let field = (offset << 3) | u16::from(more);
        let mut header = vec![17, 0];
        header.extend_from_slice(&field.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 9]);
        header
    };
    let passed = vec![
        packet(good, 17, vec![], udp.clone()),
        packet(good, 0, hop_by_hop(17), udp.clone()),
        // First fragment: the UDP length covers the whole datagram.
        packet(
            good,
            44,
            fragment(0, true),
            udp_bytes(PORT, &[1; 16], Some(8 + 100)),
        ),
    ];
    let denied = vec![
        packet(bad, 17, vec![], udp.clone()),
        packet(bad, 0, hop_by_hop(17), udp.clone()),
        packet(
            bad,
            44,
            fragment(0, true),
            udp_bytes(PORT, &[1; 16], Some(8 + 100)),
        ),
    ];
    let mut seven_headers = Vec::new();
    for _ in 0..6 {
        seven_headers.extend(hop_by_hop(0));
    }
    seven_headers.extend(hop_by_hop(17));
    let malformed = vec![
        packet(good, 17, vec![], udp_bytes(PORT, &data, Some(8 + 30))),
        packet(good, 17, vec![], udp_bytes(PORT, &data, Some(8 + 4))),
        Ipv6Packet {
            payload_len: Some(400),
            ..packet(good, 17, vec![], udp.clone())
        },
        packet(good, 17, vec![], udp[..4].to_vec()),
        packet(good, 0, hop_by_hop(17)[..4].to_vec(), vec![]),
        packet(good, 0, seven_headers, udp.clone()),
        packet(
            good,
            44,
            fragment(0, false),
            udp_bytes(PORT, &data, Some(8 + 30)),
        ),
    ];
    let fragments = vec![packet(bad, 44, fragment(13, false), vec![0; 24])];
    let not_ours = vec![
        packet(bad, 17, vec![], udp_bytes(OTHER_PORT, &data, None)),
        packet(bad, 58, vec![], vec![128, 0, 0, 0, 0, 1, 0, 1]), // ICMPv6 echo request
        packet(bad, 6, vec![], vec![0; 20]),                     // TCP
        Ipv6Packet {
            dst: "2001:db8::99".parse().unwrap(),
            ..packet(bad, 17, vec![], udp.clone())
        },
    ];
    let before = filter.status().counters;
    let all: Vec<Vec<u8>> = [&passed, &denied, &malformed, &fragments, &not_ours]
        .into_iter()
        .flatten()
        .map(Ipv6Packet::frame)
        .collect();
    lab.send_frames(&all);
    let c = counters_when(&filter, |c| {
        c.not_ours >= before.not_ours + not_ours.len() as u64
            && c.malformed >= malformed.len() as u64
    });
    assert_eq!(c.passed, passed.len() as u64, "{c:?}");
    assert_eq!(c.denied, denied.len() as u64, "{c:?}");
    assert_eq!(c.malformed, malformed.len() as u64, "{c:?}");
    assert_eq!(c.fragments, fragments.len() as u64, "{c:?}");
    assert_eq!(c.not_allowed + c.rate_limited, 0, "{c:?}");
    filter.remove().unwrap();
}

/// IPv6 sources are matched at every depth of the table: through chunks, through
/// skips (a run of bytes compared at once, taken or missed by one byte), and past
/// what the table holds, where its entries send the lookup to the trie. The ruleset
/// is built to overflow the table: 2 100 first-16-bit groups, each with two /128s
/// that differ in the third byte, need 2 100 chunks, more than the 2 048 there are.
#[test]
fn ipv6_prefixes_match_through_chunks_skips_and_the_trie() {
    let lab = Lab::new();
    let service: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let host = |top: u16, third: u8, last: u8| {
        std::net::Ipv6Addr::from([
            (top >> 8) as u8,
            top as u8,
            third,
            0x44,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            last,
        ])
    };
    let groups = 2100u16;
    let mut config = lab.config();
    for i in 0..groups {
        for third in [1, 2] {
            config
                .deny
                .push(format!("{}/128", host(0x2400 + i, third, 7)));
        }
    }
    // A /128 alone under its first 16 bits (one skip from the first level), and a
    // /40 with a /128 inside it; only 2000::/3 allowed.
    config.deny.push("3000:1:2:3:4:5:6:7/128".into());
    config.deny.push("2a00:aa00:bb00::/40".into());
    config.deny.push("2a00:aa00:bb00:1::7/128".into());
    // Past the table's chunks, two /128s parting at byte 12, alone under their first
    // 16 bits: a skip from the first level (bytes 2 to 11) whose match asks the trie.
    config.deny.push("3100:1:2:3:4:5:6:7/128".into());
    config.deny.push("3100:1:2:3:4:5:ff06:7/128".into());
    config.allow = vec!["2000::/3".into()];
    let ruleset =
        supervisor::xdp::rules::compile(&config, &[SocketAddr::new(service.into(), PORT)]).unwrap();
    assert!(
        ruleset.v6_table.asks_trie,
        "the ruleset must overflow the table to test the trie"
    );
    let first = |top: u32| {
        let (_, entry) = ruleset
            .v6_table
            .first
            .iter()
            .find(|(i, _)| *i == top)
            .unwrap();
        *entry
    };
    let deep = first(0x3100);
    assert_ne!(deep & prefix_table::SKIP, 0, "{deep:#x}");
    let skip = ruleset.v6_table.skips[(deep & !prefix_table::SKIP) as usize];
    assert_eq!(
        (skip.next, skip.resume),
        (prefix_table::ASK_TRIE, 12),
        "{skip:?}"
    );
    let filter = lab
        .start(&config, &[SocketAddr::new(service.into(), PORT)])
        .unwrap();

    let last_group = 0x2400 + groups - 1;
    let denied = vec![
        host(0x2400, 1, 7),                       // chunk, then a skip to the end
        host(0x2400, 2, 7),                       // the other branch
        host(last_group, 1, 7),                   // past the table: the trie
        host(last_group, 2, 7),                   // the trie again
        "3000:1:2:3:4:5:6:7".parse().unwrap(),    // one skip from the first level
        "2a00:aa00:bb00:2::9".parse().unwrap(),   // the /40
        "2a00:aa00:bb00:1::7".parse().unwrap(),   // a /128 inside the /40
        "3100:1:2:3:4:5:6:7".parse().unwrap(),    // a skip, then the trie
        "3100:1:2:3:4:5:ff06:7".parse().unwrap(), // ... its other /128
    ];
    let passed = vec![
        host(0x2400, 1, 8),                    // the skip misses in its last byte
        host(0x2400, 3, 7),                    // the chunk's other entries
        host(last_group, 1, 8),                // the trie misses
        "3000:1:2:3:4:5:6:8".parse().unwrap(), // the first-level skip misses
        "3000:1:2:4:4:5:6:7".parse().unwrap(), // ... in its middle
        "2a00:aa00:bc00::1".parse().unwrap(),  // next to the /40
        "3100:1:2:3:4:5:6:8".parse().unwrap(), // the skip matches, the trie misses
        "3100:1:2:3:9:5:6:7".parse().unwrap(), // the skip misses (byte 9)
    ];
    let not_allowed: Vec<std::net::Ipv6Addr> = vec![
        "fc00::5".parse().unwrap(), // outside 2000::/3
    ];
    let packet = |src| Ipv6Packet {
        src_mac: lab.client_mac,
        dst_mac: lab.server_mac,
        src,
        dst: service,
        next_header: 17,
        extensions: vec![],
        payload: udp_bytes(PORT, &[6u8; 12], None),
        payload_len: None,
    };
    let all: Vec<Vec<u8>> = [&denied, &passed, &not_allowed]
        .into_iter()
        .flatten()
        .map(|src| packet(*src).frame())
        .collect();
    lab.send_frames(&all);
    let expected = all.len() as u64;
    let c = counters_when(&filter, |c| c.passed + c.denied + c.not_allowed >= expected);
    assert_eq!(c.denied, denied.len() as u64, "{c:?}");
    assert_eq!(c.passed, passed.len() as u64, "{c:?}");
    assert_eq!(c.not_allowed, not_allowed.len() as u64, "{c:?}");
    filter.remove().unwrap();
}

/// The program's walk of the IPv6 table answers like a longest-prefix match for
/// prefixes of every length (not multiples of 8 included) that part from each
/// other around the address's word boundaries (bytes 3/4, 7/8, 11/12), nested
/// under allow and deny prefixes of /1 and /15 and a /0 "not allowed": skips merged
/// across words, skips straight from the first level followed by chunks, skips
/// whose mismatch answer is a shorter prefix's verdict. Every prefix's first and
/// last address, the addresses just outside it and one near it are sent; the
/// expected verdict comes from a brute-force longest match of the resolved rules.
#[test]
fn ipv6_table_walk_answers_like_a_longest_match_at_every_length() {
    let lab = Lab::new();
    let service: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let mut state = 0x5eed_1234_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let as_prefix = |addr: u128, len: u32| {
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        (addr & mask, len)
    };
    let mut config = lab.config();
    let mut seen = HashSet::new();
    let roots: Vec<u128> = (0..6)
        .map(|i| (0x2400 + i as u128) << 112 | u128::from(next()) << 40)
        .collect();
    let mut lists = (Vec::new(), Vec::new());
    while seen.len() < 400 {
        let mut addr = roots[(next() % roots.len() as u64) as usize];
        // Depart from the root at one byte around a word boundary, then vary.
        let at = [2u32, 3, 4, 7, 8, 11, 12, 15][(next() % 8) as usize];
        addr ^= 1u128 << (8 * (15 - at) + (next() % 8) as u32);
        if next() % 2 == 0 {
            addr ^= u128::from(next() as u16) << (8 * (13 - at.min(13)));
        }
        let len = [
            16u32, 17, 23, 31, 32, 33, 47, 63, 64, 65, 95, 96, 97, 120, 127, 128,
        ][(next() % 16) as usize];
        let len = if next() % 3 == 0 {
            17 + (next() % 112) as u32
        } else {
            len
        };
        let (addr, len) = as_prefix(addr, len);
        if seen.insert((addr, len)) {
            let text = format!("{}/{len}", std::net::Ipv6Addr::from(addr));
            if next() % 2 == 0 {
                lists.0.push(text)
            } else {
                lists.1.push(text)
            }
        }
    }
    // Alone under their first 16 bits (a skip from the first level, merged across
    // words) and pairs parting at byte 6, 9 or 13 (a skip, then a chunk), some under
    // a shorter prefix of their own (the skip's mismatch answer).
    for k in 0..24u128 {
        let base = (0x2600 + k) << 112 | u128::from(next()) << 64 | u128::from(next());
        let len = [128u32, 127, 100, 65, 64, 33][(k % 6) as usize];
        let mut add = |addr: u128, len: u32, deny: bool| {
            let (addr, len) = as_prefix(addr, len);
            if seen.insert((addr, len)) {
                let text = format!("{}/{len}", std::net::Ipv6Addr::from(addr));
                if deny {
                    lists.0.push(text)
                } else {
                    lists.1.push(text)
                }
            }
        };
        add(base, len, k % 2 == 0);
        let part = [6u32, 9, 13][(k % 3) as usize];
        let twin = (0x2700 + k) << 112 | (base & (u128::MAX >> 16));
        add(twin, 128, true);
        add(twin ^ (1 << (8 * (15 - part))), 128, false);
        if k % 4 == 0 {
            add(twin, 8 * (part - 1) - 3, k % 8 == 0);
        }
    }
    config.deny = lists.0;
    config.allow = lists.1;
    config.allow.push("::/1".into());
    config.allow.push("2404::/15".into());
    config.deny.push("2402::/15".into());
    let listeners = [SocketAddr::new(service.into(), PORT)];
    let ruleset = supervisor::xdp::rules::compile(&config, &listeners).unwrap();
    assert!(!ruleset.v6_table.asks_trie, "the table alone must answer");
    let (chunks, skips) = (ruleset.v6_table.chunks.len(), ruleset.v6_table.skips.len());
    assert!(chunks > 10 && skips > 10, "{chunks} chunks, {skips} skips");
    let verdict = |src: u128| {
        ruleset
            .v6
            .iter()
            .filter(|(len, p, _)| as_prefix(src, *len).0 == u128::from_be_bytes(*p))
            .max_by_key(|(len, _, _)| *len)
            .map_or(0, |(_, _, v)| *v)
    };
    let mut probes = Vec::new();
    for (len, p, _) in &ruleset.v6 {
        let lo = u128::from_be_bytes(*p);
        let hi = lo
            | if *len == 0 {
                u128::MAX
            } else {
                !(u128::MAX << (128 - len))
            };
        let near = lo ^ (u128::from(next() as u8) << (8 * (next() % 14)));
        probes.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1), near]);
    }
    probes.sort_unstable();
    probes.dedup();
    let filter = lab.start(&config, &listeners).unwrap();
    let frame = |src: u128| {
        Ipv6Packet {
            src_mac: lab.client_mac,
            dst_mac: lab.server_mac,
            src: std::net::Ipv6Addr::from(src),
            dst: service,
            next_header: 17,
            extensions: vec![],
            payload: udp_bytes(PORT, &[6u8; 12], None),
            payload_len: None,
        }
        .frame()
    };
    let count = |v: u32| probes.iter().filter(|p| verdict(**p) == v).count() as u64;
    let (denied, not_allowed) = (count(VERDICT_DENY), count(VERDICT_NOT_ALLOWED));
    let passed = probes.len() as u64 - denied - not_allowed;
    assert!(
        denied > 100 && not_allowed > 10 && passed > 100,
        "{denied} {not_allowed} {passed}"
    );
    for batch in probes.chunks(256) {
        let frames: Vec<Vec<u8>> = batch.iter().map(|p| frame(*p)).collect();
        lab.send_frames(&frames);
    }
    let total = probes.len() as u64;
    let c = counters_when(&filter, |c| c.passed + c.denied + c.not_allowed >= total);
    if (c.denied, c.not_allowed, c.passed) != (denied, not_allowed, passed) {
        // Which sources the program judges otherwise, one frame at a time.
        let mut wrong = Vec::new();
        for src in &probes {
            let before = filter.status().counters;
            lab.send_frames(&[frame(*src)]);
            let after = counters_when(&filter, |c| {
                c.passed + c.denied + c.not_allowed
                    > before.passed + before.denied + before.not_allowed
            });
            let got = if after.denied > before.denied {
                VERDICT_DENY
            } else if after.not_allowed > before.not_allowed {
                VERDICT_NOT_ALLOWED
            } else {
                0
            };
            let want = match verdict(*src) {
                VERDICT_ALLOW => 0,
                v => v,
            };
            if got != want && wrong.len() < 20 {
                wrong.push(format!(
                    "{} got {got} want {want}",
                    std::net::Ipv6Addr::from(*src)
                ));
            }
        }
        panic!(
            "counters {c:?}, expected denied {denied} not allowed {not_allowed} passed {passed}; wrong: {wrong:#?}"
        );
    }
    filter.remove().unwrap();
}

/// An XDP program this supervisor does not own is left alone: start fails clearly,
/// pins nothing, and the program stays attached.
#[test]
fn foreign_xdp_program_is_left_alone() {
    let lab = Lab::new();
    // The foreign program: our own object, loaded and attached outside any
    // supervisor (a link held by this test, nothing pinned).
    let mut foreign = aya::Ebpf::load(supervisor::ebpf::XDP_OBJECT).expect("load the object");
    let foreign_id = lab.server.run_in(|| {
        let program: &mut aya::programs::Xdp = foreign
            .program_mut("xdp_filter")
            .unwrap()
            .try_into()
            .unwrap();
        program.load().unwrap();
        program
            .attach("veth-a", aya::programs::XdpMode::Skb)
            .expect("attach the foreign program");
        program.info().unwrap().id()
    });
    assert_eq!(xdp_program_on(&lab.server, "veth-a"), Some(foreign_id));

    let err = lab
        .start(&lab.config(), &[lab.listener(PORT)])
        .err()
        .expect("start must refuse");
    let message = format!("{err:#}");
    assert!(is_input_error(&err), "{message}");
    assert!(
        message.contains("does not own") && message.contains(&foreign_id.to_string()),
        "{message}"
    );
    assert_eq!(
        xdp_program_on(&lab.server, "veth-a"),
        Some(foreign_id),
        "the foreign program stays"
    );
    assert!(
        !lab.service_dir().join("xdp/veth-a").exists(),
        "nothing pinned: {:?}",
        lab.pins.entries()
    );
    drop(foreign);
    assert_eq!(xdp_program_on(&lab.server, "veth-a"), None);
}

/// Bad input is refused before anything is attached; a mode the driver cannot do
/// is a clear error, and auto falls back to generic there.
#[test]
fn bad_input_attaches_nothing() {
    let lab = Lab::new();
    let listeners = [lab.listener(PORT)];
    let refused = |config: &XdpConfig, expect: &str| {
        let err = lab
            .start(config, &listeners)
            .err()
            .expect("start must refuse");
        let message = format!("{err:#}");
        assert!(is_input_error(&err), "{message}");
        assert!(
            message.contains(expect),
            "expected {expect:?} in: {message}"
        );
        assert_eq!(xdp_program_on(&lab.server, "veth-a"), None);
        assert!(
            !lab.service_dir()
                .join("xdp")
                .join(&config.interface)
                .exists(),
            "{:?}",
            lab.pins.entries()
        );
    };
    let mut config = lab.config();
    config.interface = "nosuch0".into();
    refused(&config, "no interface \"nosuch0\"");
    let mut config = lab.config();
    config.allow = vec!["10.0.0.0/8".into(), "10.0.0.0/40".into()];
    refused(&config, "xdp.allow[1]");
    let mut config = lab.config();
    config.rate_limit = Some(RateLimit {
        packets_per_second: 0,
        burst: None,
    });
    refused(&config, "xdp.rate_limit.packets_per_second");
    // Within the prefix count, but beyond the IPv4 table: every /32 in its own /16
    // takes two of its 4 096 chunks.
    let mut config = lab.config();
    config.deny = (0..2049u32)
        .map(|i| format!("{}.{}.0.1/32", 1 + i / 256, i % 256))
        .collect();
    refused(
        &config,
        "xdp.deny/xdp.allow: the IPv4 prefixes need 4098 tables",
    );
    let mut config = lab.config();
    config.rate_limit = Some(RateLimit {
        packets_per_second: 0,
        burst: None,
    });

    // validate() names the file too.
    let err = config
        .validate(Path::new("/etc/svc.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/etc/svc.toml: xdp.rate_limit.packets_per_second"),
        "{err}"
    );

    // A bridge has no native XDP (its driver has no ndo_bpf).
    ip(&[
        "-n",
        lab.server.name(),
        "link",
        "add",
        "xdpbr0",
        "type",
        "bridge",
    ]);
    ip(&["-n", lab.server.name(), "link", "set", "xdpbr0", "up"]);
    let mut config = lab.config();
    config.interface = "xdpbr0".into();
    config.mode = XdpMode::Native;
    refused(&config, "cannot run XDP in native mode");
    config.mode = XdpMode::Auto;
    let filter = lab
        .start(&config, &listeners)
        .expect("auto falls back to generic");
    assert_eq!(filter.status().mode, AttachMode::Generic);
    // The mode of a running link cannot change in place.
    let mut native = config.clone();
    native.mode = XdpMode::Native;
    let mut filter = filter;
    let err = filter.apply(&native, &listeners).unwrap_err();
    assert!(
        is_input_error(&err) && format!("{err:#}").contains("mode"),
        "{err:#}"
    );
    filter.remove().unwrap();
}

/// Config parsing: `[xdp]` as TOML, defaults, and unknown keys refused.
#[test]
fn config_parses_with_defaults() {
    let config: XdpConfig = toml::from_str(
        r#"
interface = "eth0"
deny = ["192.0.2.0/24"]
rate_limit = { packets_per_second = 1000, burst = 2000 }
"#,
    )
    .unwrap();
    assert_eq!(config.mode, XdpMode::Auto);
    assert!(config.drop_malformed);
    assert!(config.allow.is_empty());
    assert_eq!(
        config.rate_limit,
        Some(RateLimit {
            packets_per_second: 1000,
            burst: Some(2000)
        })
    );
    assert!(toml::from_str::<XdpConfig>("interface = \"eth0\"\nmode = \"fast\"").is_err());
    assert!(toml::from_str::<XdpConfig>("interface = \"eth0\"\ndeny_list = []").is_err());
}

/// The figures of issue 4's benchmark, in one run over the same veth pair: how many
/// datagrams per second the filter discards versus a user-space receiver that reads
/// and discards them, and the program's cost per packet (kernel BPF statistics).
/// Run with `cargo test --release -p supervisor-tests --test xdp -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run explicitly with --ignored --nocapture"]
fn benchmark_xdp_drop_versus_user_space() {
    use supervisor_tests::{LoadConfig, loadgen};
    let lab = Lab::new();
    let secs = Duration::from_secs(3);
    let flood = || {
        let cfg = LoadConfig::new(lab.listener(PORT))
            .senders(2)
            .duration(secs)
            .flat_out()
            .grace(Duration::from_millis(100));
        lab.client
            .run_in(|| loadgen::run(&cfg))
            .expect("load generator")
    };

    // (b) User space: one thread reads and discards everything, no filter.
    let socket = lab.receiver(PORT);
    let stop = AtomicBool::new(false);
    let (received, offered) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let mut n = 0u64;
            loop {
                match socket.recv_from(&mut buf) {
                    Ok(_) => n += 1,
                    Err(_) if stop.load(Ordering::Relaxed) => return n,
                    Err(_) => {}
                }
            }
        });
        let report = flood();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), report)
    });
    let user_rate = received as f64 / offered.duration.as_secs_f64();

    // (a) XDP: the same flood from a denied source, statistics on meanwhile.
    let mut config = lab.config();
    config.deny = vec![lab.prefix(2, 32)];
    let filter = lab.start(&config, &[lab.listener(PORT)]).unwrap();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let before = filter.status();
    let xdp_offered = flood();
    let after = filter.status();
    let dropped = after.counters.denied - before.counters.denied;
    let xdp_rate = dropped as f64 / xdp_offered.duration.as_secs_f64();
    let runs = after.run_count - before.run_count;
    let ns = (after.run_time_ns - before.run_time_ns) as f64 / runs.max(1) as f64;
    let leaked = drain(&socket, Duration::from_millis(200)).len();

    // (c) The cost of the pass path: the same flood allowed through to the reader.
    let mut filter = filter;
    filter.apply(&lab.config(), &[lab.listener(PORT)]).unwrap();
    let before_pass = filter.status();
    let stop = AtomicBool::new(false);
    let passed_received = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = [0u8; 2048];
            let mut n = 0u64;
            loop {
                match socket.recv_from(&mut buf) {
                    Ok(_) => n += 1,
                    Err(_) if stop.load(Ordering::Relaxed) => return n,
                    Err(_) => {}
                }
            }
        });
        flood();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    let after_pass = filter.status();
    let pass_runs = after_pass.run_count - before_pass.run_count;
    let pass_ns =
        (after_pass.run_time_ns - before_pass.run_time_ns) as f64 / pass_runs.max(1) as f64;
    assert!(passed_received > 0);

    println!("| path | offered /s | discarded /s |");
    println!("|---|---|---|");
    println!(
        "| user space (recv + discard, 1 thread) | {:.0} | {user_rate:.0} |",
        offered.rate
    );
    println!(
        "| XDP filter (deny, {} mode) | {:.0} | {xdp_rate:.0} |",
        after.mode, xdp_offered.rate
    );
    println!(
        "XDP program cost: {ns:.1} ns per denied packet over {runs} runs, {pass_ns:.1} ns per passed packet over {pass_runs} runs (kernel BPF statistics)"
    );
    assert_eq!(leaked, 0, "denied datagrams reached the socket");
    assert!(dropped > 0 && runs >= dropped);
    filter.remove().unwrap();
}
