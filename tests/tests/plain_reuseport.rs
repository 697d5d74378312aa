//! Baseline without the supervisor, plus checks of the harness itself. These pass with
//! nothing but the kernel: they show what the supervisor has to improve on, and that the
//! isolation the other tests rely on works.

#![deny(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use supervisor_tests::plain::{assert_one_socket_got_all, format_counts, run_plain_baseline};
use supervisor_tests::{
    LoadConfig, PinDir, PlainReuseportGroup, TestNet, loadgen, require_root, wait_timeout,
};

#[test]
fn plain_reuseport_puts_one_sender_on_one_socket() {
    require_root();
    let net = TestNet::new();
    let addr: SocketAddr = "127.0.0.1:5301".parse().unwrap();
    let (counts, report) = run_plain_baseline(&net, addr, 4, 20_000, 20_000);
    println!(
        "plain SO_REUSEPORT, one sender:\n{}{report}",
        format_counts(&counts)
    );
    assert_eq!(report.sent, 20_000, "{report}");
    assert_one_socket_got_all(&counts, report.sent);
    report.assert_all_answered_once();
}

#[test]
fn loadgen_counts_every_reply_of_several_senders() {
    require_root();
    let net = TestNet::new();
    let report = net.run_in(|| {
        let group = PlainReuseportGroup::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let cfg = LoadConfig::new(group.local_addr())
            .senders(4)
            .count(8_002)
            .rate(8_000)
            .payload_size(100);
        let report = loadgen::run(&cfg).expect("load generator");
        let counts = group.stop();
        assert_eq!(counts.iter().sum::<u64>(), 8_002, "{counts:?}");
        report
    });
    println!("{report}");
    report.assert_all_answered_once();
    assert_eq!(report.sent, 8_002);
    // Interleaved sequence numbers: the remainder goes to the first senders.
    let per: Vec<u64> = report.per_sender.iter().map(|s| s.sent).collect();
    assert_eq!(per, vec![2_001, 2_001, 2_000, 2_000]);
    assert!(report.per_sender.iter().all(|s| s.received == s.sent));
    assert_eq!(report.total_replies(), 8_002);
    assert!(report.per_generation.keys().all(|&g| g == 0));
}

#[test]
fn testnet_isolates_and_cleans_up() {
    require_root();
    let net = TestNet::new();
    let name = net.name().to_string();

    // Programs started with exec() see only the namespace's own loopback...
    let out = net
        .exec("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let links = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(links.lines().count(), 1, "only lo expected: {links}");
    assert!(
        links.contains("lo:") && links.contains("UP"),
        "lo must be up: {links}"
    );
    // ...and still the host's bpffs (unlike `ip netns exec`, which remounts /sys).
    let out = net
        .exec("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()
        .unwrap();
    let _pins = PinDir::new(); // mounts bpffs if the machine booted without it
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bpf_fs");

    // run_in: a socket bound there is not reachable from the test's own namespace.
    let port = net.run_in(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        std::mem::forget(s); // keep it bound until the namespace goes away
        port
    });
    assert!(
        UdpSocket::bind(("127.0.0.1", port)).is_ok(),
        "port {port} must be free outside"
    );

    // Drop kills what the namespace started and deletes it.
    let mut child = net.spawn(net.exec("sleep").arg("60"));
    drop(net);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(5)).is_some(),
        "process started in the namespace must be killed on drop"
    );
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn testnet_pair_is_joined_by_a_veth() {
    require_root();
    let (a, b) = TestNet::pair();
    let (va, vb) = (a.veth().unwrap().clone(), b.veth().unwrap().clone());
    assert_eq!(va.peer_addr, vb.addr);
    assert_eq!(vb.peer_addr, va.addr);
    assert_eq!(va.addr.octets()[..2], [10, 200]);
    let server = b.run_in(|| UdpSocket::bind((vb.addr, 9000)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    a.run_in(|| {
        let c = UdpSocket::bind((va.addr, 0)).unwrap();
        c.send_to(b"over the veth", (vb.addr, 9000)).unwrap();
    });
    let mut buf = [0u8; 64];
    let (n, from) = server
        .recv_from(&mut buf)
        .expect("datagram across the veth");
    assert_eq!(&buf[..n], b"over the veth");
    assert_eq!(from.ip(), va.addr);
}

#[test]
fn pin_dir_is_private_and_removed() {
    require_root();
    let pins = PinDir::new();
    let path = pins.path().to_path_buf();
    assert!(path.starts_with("/sys/fs/bpf"));
    pins.assert_empty_after_stop();
    // bpffs holds only pins and directories; a directory stands in for a leftover pin.
    std::fs::create_dir(path.join("leftover")).unwrap();
    assert_eq!(pins.entries(), vec![path.join("leftover")]);
    drop(pins);
    assert!(!path.exists(), "drop removes the pin directory");
}
