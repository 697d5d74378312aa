//! The XDP filter as the supervisor runs it: configured with `[xdp]`, rules changed
//! on `upgrade`, kept across a supervisor restart, shown by `status`. (The
//! filter's own behaviour, packet by packet, is tested in `xdp.rs` through the
//! library.)

#![deny(unsafe_code)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, netns::ip,
    require_root,
};

struct Lab {
    server: TestNet,
    client: TestNet,
    subnet: u8,
}

impl Lab {
    fn new() -> Lab {
        require_root();
        let (server, client) = TestNet::pair();
        let subnet = server.veth().unwrap().addr.octets()[2];
        Lab {
            server,
            client,
            subnet,
        }
    }

    fn server_addr(&self) -> Ipv4Addr {
        self.server.veth().unwrap().addr
    }

    /// Adds 10.200.X.`host` to the client's veth.
    fn source(&self, host: u8) -> Ipv4Addr {
        let addr = Ipv4Addr::new(10, 200, self.subnet, host);
        ip(&[
            "-n",
            self.client.name(),
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "veth-b",
        ]);
        addr
    }

    fn config(&self, pins: &PinDir, run: &TempDir, deny: &[Ipv4Addr]) -> ServiceConfig {
        let listen = SocketAddr::new(self.server_addr().into(), 5600);
        let mut config = ServiceConfig::echo(2, listen, pins, run.path());
        let deny: Vec<String> = deny.iter().map(|a| format!("\"{a}/32\"")).collect();
        config.extra_toml = format!(
            "[xdp]\ninterface = \"veth-a\"\ndeny = [{}]\n",
            deny.join(", ")
        );
        config
    }

    /// Sends `count` echo requests from `source` and returns how many were answered.
    fn answered(&self, source: Ipv4Addr, to: SocketAddr, count: u32) -> u32 {
        self.client.run_in(|| {
            let socket = UdpSocket::bind((source, 0)).unwrap();
            // Echo replies on a veth take well under a millisecond; a denied
            // request never gets one, so keep the wait short.
            socket
                .set_read_timeout(Some(Duration::from_millis(150)))
                .unwrap();
            let mut answered = 0;
            let mut buf = [0u8; 64];
            for seq in 0..count as u64 {
                socket.send_to(&seq.to_le_bytes(), to).unwrap();
                if socket.recv(&mut buf).is_ok() {
                    answered += 1;
                }
            }
            answered
        })
    }
}

fn xdp_status(supervisor: &Supervisor) -> serde_json::Value {
    let status = supervisor.status_json();
    assert!(
        status["xdp"].is_object(),
        "status has no xdp section: {status}"
    );
    status["xdp"].clone()
}

#[test]
fn xdp_rules_follow_the_config_across_upgrades_and_restarts() {
    let lab = Lab::new();
    let pins = PinDir::new();
    let run = TempDir::new("xdp-daemon");
    let (good, bad) = (lab.source(10), lab.source(20));
    let config = lab.config(&pins, &run, &[bad]);
    let target = config.address;
    let mut supervisor = Supervisor::start(&lab.server, config.clone());

    // Denied sources never reach a worker; others do; the counters say so.
    assert_eq!(lab.answered(good, target, 50), 50);
    assert_eq!(
        lab.answered(bad, target, 20),
        0,
        "a denied source reached a worker"
    );
    let before = xdp_status(&supervisor);
    let link_id = before["link_id"].as_u64().unwrap();
    assert!(
        before["counters"]["denied"].as_u64().unwrap() >= 20,
        "{before}"
    );
    assert!(
        before["counters"]["passed"].as_u64().unwrap() >= 50,
        "{before}"
    );

    // Swap the rules on upgrade, under a load from a third source that both
    // rulesets allow: nothing of it is lost, the link stays the same.
    let mut load = LoadConfig::new(target);
    load.rate = Some(2000);
    load.duration = Some(Duration::from_secs(3));
    let background = BackgroundLoad::start(&lab.client, load);
    std::thread::sleep(Duration::from_millis(500));
    supervisor.set_config(lab.config(&pins, &run, &[good]));
    let upgrade = supervisor.upgrade();
    let stdout = String::from_utf8_lossy(&upgrade.stdout).into_owned();
    assert!(
        upgrade.status.success(),
        "upgrade failed: {stdout}{}",
        String::from_utf8_lossy(&upgrade.stderr)
    );
    assert!(stdout.contains("xdp: new ruleset"), "{stdout}");
    let report = background.finish();
    assert_eq!(
        report.lost, 0,
        "allowed datagrams were lost across the rules change: {report}"
    );
    assert!(report.received > 0);
    assert_eq!(
        lab.answered(good, target, 20),
        0,
        "the new rules did not take effect"
    );
    assert_eq!(
        lab.answered(bad, target, 50),
        50,
        "the old rules are still in force"
    );
    let after = xdp_status(&supervisor);
    assert_eq!(
        after["link_id"].as_u64().unwrap(),
        link_id,
        "the link was replaced: {after}"
    );
    assert!(after["ruleset_generation"].as_u64() > before["ruleset_generation"].as_u64());

    // A bad rule on upgrade is refused and changes nothing.
    let mut broken = lab.config(&pins, &run, &[good]);
    broken.extra_toml = "[xdp]\ninterface = \"veth-a\"\ndeny = [\"10.300.0.0/16\"]\n".into();
    supervisor.set_config(broken);
    let refused = supervisor.upgrade();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("10.300.0.0/16"));
    supervisor.set_config(lab.config(&pins, &run, &[good]));
    assert_eq!(lab.answered(good, target, 10), 0);

    // A supervisor restart: the link stays attached (filtering while no supervisor
    // runs) and the counters carry on.
    let denied_before = xdp_status(&supervisor)["counters"]["denied"]
        .as_u64()
        .unwrap();
    supervisor.stop();
    assert!(
        pins.path().join(config.name.as_str()).join("xdp").exists(),
        "the XDP pins must survive a stop"
    );
    let mut supervisor = Supervisor::start(&lab.server, lab.config(&pins, &run, &[good]));
    let restarted = xdp_status(&supervisor);
    assert_eq!(
        restarted["link_id"].as_u64().unwrap(),
        link_id,
        "restart replaced the link: {restarted}"
    );
    assert!(
        restarted["counters"]["denied"].as_u64().unwrap() >= denied_before,
        "counters were reset: {restarted}"
    );
    assert_eq!(lab.answered(good, target, 10), 0);
    assert_eq!(lab.answered(bad, target, 10), 10);
    supervisor.stop();
    // PinDir's drop removes the XDP pins, which detaches the filter.
}

#[test]
fn removing_xdp_from_the_config_detaches_the_filter() {
    let lab = Lab::new();
    let pins = PinDir::new();
    let run = TempDir::new("xdp-remove");
    let bad = lab.source(20);
    let config = lab.config(&pins, &run, &[bad]);
    let target = config.address;
    let mut supervisor = Supervisor::start(&lab.server, config.clone());
    assert_eq!(lab.answered(bad, target, 10), 0);

    let mut without = config.clone();
    without.extra_toml.clear();
    supervisor.set_config(without);
    let upgrade = supervisor.upgrade();
    assert!(
        upgrade.status.success(),
        "{}",
        String::from_utf8_lossy(&upgrade.stderr)
    );
    assert!(String::from_utf8_lossy(&upgrade.stdout).contains("xdp: filter removed"));
    assert_eq!(
        lab.answered(bad, target, 10),
        10,
        "the filter is still attached"
    );
    assert!(supervisor.status_json()["xdp"].is_null());
    supervisor.stop();
    pins.assert_empty_after_stop();
}
