//! `ready = "probe"`: a worker that never speaks sd_notify is ready when it
//! answers a probe datagram, which the selector steers to that worker's own
//! (not yet serving) socket.

#![deny(unsafe_code)]

use std::{net::SocketAddr, path::Path, time::Duration};

use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ReadyMode, ServiceConfig, Supervisor, TempDir, TestNet,
    python3_path, require_root,
};

/// An echo worker in Python that uses socket activation but never sends READY=1.
const QUIET_WORKER: &str = r#"
import os, socket, struct, selectors
assert os.environ["LISTEN_PID"] == str(os.getpid())
gen = int(os.environ.get("SUPERVISOR_GENERATION", "0"))
worker = int(os.environ.get("SUPERVISOR_WORKER", "0"))
sockets = [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
sel = selectors.DefaultSelector()
for i, s in enumerate(sockets):
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
while True:
    for key, _ in sel.select():
        while True:
            try:
                data, peer = key.fileobj.recvfrom(65536)
            except BlockingIOError:
                break
            key.fileobj.sendto(data + struct.pack("<IHH", gen, worker, key.data), peer)
"#;

/// Reads forever and never answers.
const MUTE_WORKER: &str = r#"
import os, socket
s = socket.socket(fileno=3)
while True:
    s.recv(65536)
"#;

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

fn config(
    name: &str,
    script: String,
    pins: &PinDir,
    run: &TempDir,
    ready: ReadyMode,
) -> ServiceConfig {
    let address: SocketAddr = "127.0.0.1:5800".parse().unwrap();
    let mut config = ServiceConfig::new(
        name,
        vec![python3_path().to_string_lossy().into_owned(), script],
        3,
        address,
        pins,
        run.path(),
    );
    config.ready = Some(ready);
    config.ready_timeout = Some(Duration::from_secs(3));
    config
}

#[test]
fn probe_makes_a_quiet_worker_ready_and_upgrades_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("probe");
    let quiet = script(run.path(), "quiet.py", QUIET_WORKER);
    let config = config("probe-quiet", quiet, &pins, &run, ReadyMode::Probe);
    let target = config.address;
    let mut supervisor = Supervisor::start(&net, config);

    let mut load = LoadConfig::new(target);
    load.rate = Some(3000);
    load.duration = Some(Duration::from_secs(3));
    let background = BackgroundLoad::start(&net, load);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let output = supervisor.upgrade_ok();
        assert!(output.contains("probing 3 workers"), "{output}");
        for worker in 0..3 {
            assert!(
                output.contains(&format!("worker {worker} ready")),
                "{output}"
            );
        }
    }
    let report = background.finish();
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");
    assert_eq!(supervisor.serving_generation(), 4);
    supervisor.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn without_probe_or_answer_a_quiet_worker_is_never_ready() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("probe-fail");
    let quiet = script(run.path(), "quiet.py", QUIET_WORKER);
    let mute = script(run.path(), "mute.py", MUTE_WORKER);
    let mut supervisor = Supervisor::start(
        &net,
        config("probe-mute", quiet.clone(), &pins, &run, ReadyMode::Probe),
    );

    // The same quiet worker under ready = "notify": it never says READY=1.
    supervisor.set_config(config("probe-mute", quiet, &pins, &run, ReadyMode::Notify));
    let output = supervisor.upgrade();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not ready within ready_timeout"));

    // A worker that reads but never answers a probe.
    supervisor.set_config(config("probe-mute", mute, &pins, &run, ReadyMode::Probe));
    let output = supervisor.upgrade();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not ready within ready_timeout"));

    // Generation 1 still serves, and the probe map is empty again.
    assert_eq!(supervisor.serving_generation(), 1);
    supervisor.stop();
    pins.assert_empty_after_stop();
}
