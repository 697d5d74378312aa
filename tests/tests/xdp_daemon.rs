//! The XDP filter as the supervisor runs it: configured with `[xdp]`, rules changed
//! on `upgrade`, kept across a supervisor restart, its program replaced in place by a
//! re-exec into another build, shown by `status`. (The
//! filter's own behaviour, packet by packet, is tested in `xdp.rs` through the
//! library.)

#![deny(unsafe_code)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use aya::programs::{ProgramInfo, loaded_links, loaded_programs};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path,
    netns::ip, require_root, selector_variant_path,
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

/// The program the kernel runs behind link `link_id` (its own record, not the
/// supervisor's).
fn linked_program(link_id: u64) -> u32 {
    loaded_links()
        .flatten()
        .find(|l| u64::from(l.id()) == link_id)
        .unwrap_or_else(|| panic!("link {link_id} is gone"))
        .program_id()
}

fn program(id: u32) -> ProgramInfo {
    loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("program {id} is not loaded"))
}

/// A counter of the filter's status (summed over CPUs).
fn xdp_counter(supervisor: &Supervisor, name: &str) -> u64 {
    xdp_status(supervisor)["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no xdp counter {name}"))
}

/// Waits until the filter has passed `more` datagrams beyond `from` (the load is
/// running: the filter now in place judges it).
fn wait_passed(supervisor: &Supervisor, from: u64, more: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while xdp_counter(supervisor, "passed") < from + more {
        assert!(
            std::time::Instant::now() < deadline,
            "the filter passed no traffic: {}",
            xdp_status(supervisor)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The load of the replacement tests: allowed, two flows from the client's own
/// address at 4 000/s; denied, one flow at 1 000/s from `denied` (on the deny list),
/// whose replies would be datagrams that got through. Returns once the filter has
/// passed some of the allowed traffic.
fn allowed_and_denied_loads(
    lab: &Lab,
    supervisor: &Supervisor,
    target: SocketAddr,
    denied: Ipv4Addr,
) -> (BackgroundLoad, BackgroundLoad) {
    let allowed = BackgroundLoad::start(&lab.client, LoadConfig::new(target).senders(2).rate(4000));
    let denied_load = BackgroundLoad::start(
        &lab.client,
        LoadConfig::new(target)
            .source(denied.into())
            .rate(1000)
            .grace(Duration::from_millis(300)),
    );
    wait_passed(supervisor, xdp_counter(supervisor, "passed"), 500);
    (allowed, denied_load)
}

#[test]
fn replacing_the_filter_program_under_load_loses_no_allowed_datagram() {
    let lab = Lab::new();
    let variant = selector_variant_path();
    let real = bin_path("supervisor");
    let pins = PinDir::new();
    let run = TempDir::new("xdp-replace");
    let denied = lab.source(20);
    let config = lab.config(&pins, &run, &[denied]);
    let target = config.address;
    let mut supervisor = Supervisor::start(&lab.server, config);
    let before = xdp_status(&supervisor);
    let pid = supervisor.status_json()["pid"].clone();
    let link_id = before["link_id"].as_u64().unwrap();
    let mut program_id = before["program_id"].as_u64().unwrap() as u32;
    assert_eq!(linked_program(link_id), program_id);
    let original_tag = program(program_id).tag();
    let pins_before = pins.entries();

    let denied_before = xdp_counter(&supervisor, "denied");
    let (allowed, denied_load) = allowed_and_denied_loads(&lab, &supervisor, target, denied);

    // Into the variant build and back, three times: each re-exec finds the link
    // pinned and moves it onto its own program with a link update.
    let swaps = [&variant, &real, &variant, &real, &variant, &real];
    for (done, binary) in swaps.iter().enumerate() {
        supervisor.reexec_into(binary);
        // The re-executed daemon answers `status` once it has adopted everything.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let now = loop {
            let status = supervisor.try_status_json().ok();
            let xdp = status.as_ref().map(|s| s["xdp"].clone());
            if let Some(xdp) = xdp.filter(|x| x["program_id"].as_u64() != Some(program_id.into())) {
                break xdp;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "re-exec {} into {}: the XDP program was not replaced",
                done + 1,
                binary.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let new_id = now["program_id"].as_u64().unwrap() as u32;
        assert_eq!(
            now["link_id"].as_u64().unwrap(),
            link_id,
            "re-exec {}: the link was replaced: {now}",
            done + 1
        );
        assert_eq!(
            linked_program(link_id),
            new_id,
            "the kernel's link runs another program than status says"
        );
        let tag = program(new_id).tag();
        if done % 2 == 0 {
            assert_ne!(
                tag, original_tag,
                "the variant's filter is the same program"
            );
        } else {
            assert_eq!(tag, original_tag, "back on the real build, another program");
        }
        program_id = new_id;
        // Traffic goes through the new program before the next swap.
        wait_passed(&supervisor, xdp_counter(&supervisor, "passed"), 500);
    }
    let (_, log) = supervisor.logs();
    assert_eq!(
        log.matches("(link update)").count(),
        swaps.len(),
        "one link update per re-exec:\n{log}"
    );

    let denied_report = denied_load.finish();
    let report = allowed.finish();
    eprintln!("allowed across {} replacements: {report}", swaps.len());
    eprintln!("denied sender: {denied_report}");
    assert_eq!(report.lost, 0, "allowed datagrams lost: {report}");
    assert_eq!(
        report.duplicated, 0,
        "allowed datagrams duplicated: {report}"
    );
    assert!(denied_report.sent > 0);
    assert_eq!(
        denied_report.received, 0,
        "denied datagrams got through the filter: {denied_report}"
    );
    assert_eq!(
        xdp_counter(&supervisor, "denied") - denied_before,
        denied_report.sent,
        "the filter did not deny every datagram of the denied sender"
    );
    assert_eq!(
        supervisor.status_json()["pid"],
        pid,
        "not a re-exec in place"
    );
    assert_eq!(pins.entries(), pins_before, "pins left behind or missing");
    supervisor.stop();
    // PinDir's drop removes the XDP pins, which detaches the filter.
}

/// A re-exec into a build whose XDP map layouts differ from those pinned (an
/// upgrade that adds a map, as the IPv6 prefix table's chunks, skips and trie
/// were added): the check before the exec does not ask for the new maps' pins,
/// and the new build puts fresh maps in place with its link update, under load.
/// The build with other layouts is stood in for by its traces: the control word
/// naming another layout, no pins for the maps it did not have, and one for a map
/// this build does not have (left behind, the pin would hold that map's memory).
#[test]
fn reexec_into_a_build_with_other_xdp_map_layouts_replaces_the_maps() {
    let lab = Lab::new();
    let pins = PinDir::new();
    let run = TempDir::new("xdp-layout");
    let denied = lab.source(20);
    let mut config = lab.config(&pins, &run, &[denied]);
    config
        .extra_toml
        .push_str("allow = [\"10.200.0.0/16\", \"fd00::/8\"]\n");
    config.extra_toml = config
        .extra_toml
        .replace("deny = [", "deny = [\"fd00:1::/32\", \"fd00:2:3:4::1\", ");
    let target = config.address;
    let supervisor = Supervisor::start(&lab.server, config);
    let before = xdp_status(&supervisor);
    let link_id = before["link_id"].as_u64().unwrap();
    let program_id = before["program_id"].as_u64().unwrap();
    let pins_before = pins.entries();
    let dir = pins.path().join("echo").join("xdp").join("veth-a");
    for pin in [
        "prefixes-v6-chunks",
        "prefixes-v6-skips",
        "prefixes-v6-trie",
    ] {
        std::fs::remove_file(dir.join(pin)).unwrap();
    }
    // A map of that build that this one does not know: removed with the rest.
    aya::maps::MapData::from_pin(dir.join("rules"))
        .unwrap()
        .pin(dir.join("prefixes-v7"))
        .unwrap();
    let control = aya::maps::MapData::from_pin(dir.join("control")).unwrap();
    let mut control = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(control)).unwrap();
    let word = control.get(&0, 0).unwrap();
    // Bits 16-31: the layout fingerprint of the build that wrote the word.
    control.set(0, word ^ (0x5a5a << 16), 0).unwrap();

    let (allowed, denied_load) = allowed_and_denied_loads(&lab, &supervisor, target, denied);
    supervisor.reexec_into(&bin_path("supervisor"));
    let after = xdp_status(&supervisor);
    assert_eq!(after["link_id"].as_u64().unwrap(), link_id, "{after}");
    let new_program = after["program_id"].as_u64().unwrap();
    assert_ne!(
        new_program, program_id,
        "the maps were not replaced: {after}"
    );
    assert_eq!(linked_program(link_id), new_program as u32);
    wait_passed(&supervisor, xdp_counter(&supervisor, "passed"), 500);
    let denied_report = denied_load.finish();
    let report = allowed.finish();
    assert_eq!(report.lost, 0, "allowed datagrams lost: {report}");
    assert_eq!(report.duplicated, 0, "{report}");
    assert!(denied_report.sent > 0);
    assert_eq!(
        denied_report.received, 0,
        "denied datagrams got through the filter: {denied_report}"
    );
    assert_eq!(pins.entries(), pins_before, "pins left behind or missing");
    let (_, log) = supervisor.logs();
    assert_eq!(log.matches("(link update)").count(), 1, "{log}");
    drop(control);
    let mut supervisor = supervisor;
    supervisor.stop();
}
