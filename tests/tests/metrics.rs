//! `[metrics]`: `/metrics` scraped with real HTTP clients (curl, Python's urllib)
//! during upgrades under load and parsed with a real OpenMetrics parser (PyPI
//! `prometheus-client`, installed by scripts/bootstrap.sh); its counters checked
//! against the load generator's. A worker that says READY=1 and reads nothing is
//! reported as stalled (status, metric, log). A bad `metrics.listen` refuses the
//! start with exit 2 and leaves nothing behind.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use supervisor_tests::supervisor::{
    serving_generation, single_error_line, supervisor_command, worker_pids,
};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet,
    output_with_timeout, python3_path, require_root,
};

const ADDR: &str = "127.0.0.1:5300";
const METRICS: &str = "127.0.0.1:9464";
const SETTLE: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Fetches each URL (urllib) or reads each file, parses it with the OpenMetrics
/// parser, and prints every sample as JSON: one list of [name, labels, value] per
/// argument. The parser raises on anything that is not valid OpenMetrics text.
const PARSE: &str = r#"
import json, sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for arg in sys.argv[1:]:
    if arg.startswith("http://"):
        with urllib.request.urlopen(arg, timeout=10) as r:
            assert r.status == 200, r.status
            assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers["Content-Type"]
            text = r.read().decode()
    else:
        with open(arg) as f:
            text = f.read()
    out.append([[s.name, s.labels, s.value] for fam in text_string_to_metric_families(text) for s in fam.samples])
print(json.dumps(out))
"#;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

type Scrape = Vec<Sample>;
/// A sample as the parser script prints it: name, labels, value.
type RawSample = (String, BTreeMap<String, String>, f64);

/// Parses each of `sources` (URLs or files) with the Python parser, run in `net`.
fn parse(net: &TestNet, sources: &[String]) -> Vec<Scrape> {
    let out = output_with_timeout(
        net.exec(python3_path()).arg("-c").arg(PARSE).args(sources),
        CLI_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "parsing /metrics failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Vec<RawSample>> =
        serde_json::from_slice(&out.stdout).expect("the parser's JSON");
    parsed
        .into_iter()
        .map(|scrape| {
            scrape
                .into_iter()
                .map(|(name, labels, value)| Sample {
                    name,
                    labels,
                    value,
                })
                .collect()
        })
        .collect()
}

fn scrape(net: &TestNet) -> Scrape {
    parse(net, &[format!("http://{METRICS}/metrics")])
        .pop()
        .unwrap()
}

/// Samples named `name` whose labels include all of `labels`.
fn matching<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    scrape.iter().filter(move |s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(scrape, name, labels).map(|s| s.value).sum()
}

fn one(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = matching(scrape, name, labels).collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} {labels:?} expected, got {found:?}"
    );
    found[0].value
}

/// `curl URL`: the HTTP status code.
fn curl_code(net: &TestNet, args: &[&str]) -> String {
    let out = output_with_timeout(
        net.exec("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .args(args),
        CLI_TIMEOUT,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics_toml() -> String {
    format!("[metrics]\nlisten = \"{METRICS}\"\n")
}

#[test]
fn scrapes_during_upgrades_under_load_match_the_load() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let bodies = TempDir::new("sup-scrapes");
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut config = ServiceConfig::echo(2, addr, &pins, runtime.path());
    config.extra_toml = metrics_toml();
    let mut sup = Supervisor::start(&net, config);
    sup.wait_settled(1, SETTLE);

    // Before any traffic: the families exist, every result at zero.
    let first = scrape(&net);
    assert_eq!(
        one(&first, "supervisor_upgrades_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(
        one(&first, "supervisor_generations", &[("state", "serving")]),
        1.0
    );
    assert!(one(&first, "supervisor_process_resident_memory_bytes", &[]) > 0.0);
    assert!(one(&first, "supervisor_process_open_fds", &[]) > 0.0);
    assert!(matching(&first, "supervisor_process_cpu_seconds_total", &[]).count() == 1);
    assert_eq!(curl_code(&net, &[&format!("http://{METRICS}/")]), "404");
    assert_eq!(
        curl_code(&net, &[&format!("http://{METRICS}/metricsx")]),
        "404"
    );
    assert_eq!(
        curl_code(&net, &["-X", "POST", &format!("http://{METRICS}/metrics")]),
        "405"
    );

    let load = BackgroundLoad::start(
        &net,
        LoadConfig::new(addr)
            .senders(2)
            .rate(2_000)
            .grace(Duration::from_secs(3)),
    );
    sup.wait_selected(1, 200, SETTLE);
    // curl scrapes every 100 ms while the upgrades run; each body is parsed after.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = std::thread::spawn({
        let stop = stop.clone();
        let dir = bodies.path().to_path_buf();
        let mut cmds: Vec<Command> = Vec::new();
        for i in 0..600 {
            let mut c = net.exec("curl");
            c.args(["-sf", "--max-time", "5", "-o"])
                .arg(dir.join(format!("{i:04}.txt")))
                .arg(format!("http://{METRICS}/metrics"));
            cmds.push(c);
        }
        move || {
            let mut ok = 0;
            for mut c in cmds {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let status = c.status().expect("run curl");
                assert!(
                    status.success(),
                    "curl /metrics failed during upgrades: {status}"
                );
                ok += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        }
    });
    const UPGRADES: u32 = 3;
    for target in 2..2 + UPGRADES {
        sup.upgrade_ok();
        sup.wait_selected(target, 200, SETTLE);
    }
    stop.store(true, Ordering::Relaxed);
    let scrapes_ok = scraper.join().expect("scraper thread");
    assert!(
        scrapes_ok >= 5,
        "only {scrapes_ok} scrapes during the upgrades"
    );
    let report = load.finish();
    println!("{UPGRADES} upgrades under load:\n{report}");
    report.assert_all_answered_once();

    // Every body scraped during the upgrades is valid OpenMetrics text.
    let mut files: Vec<String> = fs::read_dir(bodies.path())
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let during = parse(&net, &files);
    assert_eq!(during.len(), scrapes_ok);
    for s in &during {
        assert!(sum(s, "supervisor_generations", &[]) >= 1.0);
    }

    let last = 1 + UPGRADES;
    let status = sup.status_json();
    assert_eq!(
        serving_generation(&status).unwrap()["generation"],
        last,
        "{status}"
    );
    let end = scrape(&net);
    let generation = last.to_string();
    let selected = sum(
        &end,
        "supervisor_socket_selected_total",
        &[("generation", &generation)],
    );
    let replies = report.per_generation.get(&last).copied().unwrap_or(0) as f64;
    println!("generation {last}: selected {selected}, replies {replies}");
    assert!(replies > 0.0);
    assert!(
        (selected - replies).abs() <= (replies * 0.01).max(5.0),
        "selected_total over the serving generation ({selected}) should match the datagrams it answered ({replies})"
    );
    // The status and the metrics read the same counters.
    let status_selected: u64 = supervisor_tests::supervisor::selected_total(&status, last);
    assert!(selected >= status_selected as f64);
    assert_eq!(
        one(&end, "supervisor_upgrades_total", &[("result", "ok")]),
        UPGRADES as f64
    );
    assert_eq!(
        one(&end, "supervisor_upgrades_total", &[("result", "failed")]),
        0.0
    );
    // Build, ready and flip for generation 1 and each upgrade; a drain per upgrade
    // (`--wait drained`).
    for (phase, count) in [
        ("build", last),
        ("ready", last),
        ("flip", last),
        ("drain", UPGRADES),
    ] {
        assert_eq!(
            one(
                &end,
                "supervisor_upgrade_phase_duration_seconds_count",
                &[("phase", phase)]
            ),
            count as f64,
            "phase {phase}"
        );
    }
    assert_eq!(
        one(&end, "supervisor_generations", &[("state", "serving")]),
        1.0
    );
    assert_eq!(
        one(&end, "supervisor_generations", &[("state", "draining")]),
        0.0
    );
    assert_eq!(sum(&end, "supervisor_socket_stalled", &[]), 0.0);
    assert_eq!(sum(&end, "supervisor_socket_drops_total", &[]), 0.0);
    assert_eq!(
        matching(
            &end,
            "supervisor_socket_queued_bytes",
            &[("generation", &generation)]
        )
        .count(),
        2,
        "one queue per socket of the serving generation"
    );
    assert!(one(&end, "supervisor_process_cpu_seconds_total", &[]) > 0.0);

    // An upgrade the daemon refuses (a listener renamed needs a restart) counts as
    // refused; the CLI says so with exit code 2.
    let good = sup.config().clone();
    let mut renamed = good.clone();
    renamed.listen_name = "renamed".into();
    sup.set_config(renamed);
    let out = sup.upgrade();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    sup.set_config(good);
    let after = scrape(&net);
    assert_eq!(
        one(
            &after,
            "supervisor_upgrades_total",
            &[("result", "refused")]
        ),
        1.0
    );
    assert_eq!(
        one(&after, "supervisor_upgrades_total", &[("result", "ok")]),
        UPGRADES as f64
    );
    sup.stop();
    pins.assert_empty_after_stop();
}

/// A socket-activated worker that says READY=1 and then only sleeps.
const DEAF_WORKER: &str = r#"
import os, socket, time
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1", address)
while True:
    time.sleep(3600)
"#;

#[test]
fn a_ready_worker_that_reads_nothing_is_reported_stalled() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let work = TempDir::new("sup-deaf");
    let script = work.path().join("deaf_worker.py");
    fs::write(&script, DEAF_WORKER).unwrap();
    let addr: SocketAddr = ADDR.parse().unwrap();
    let argv = vec![
        python3_path().to_string_lossy().into_owned(),
        script.to_string_lossy().into_owned(),
    ];
    let mut config = ServiceConfig::new("deaf", argv, 1, addr, &pins, runtime.path());
    config.extra_toml = metrics_toml();
    config.drain_timeout = Some(Duration::from_secs(2));
    let mut sup = Supervisor::start(&net, config);
    let before = scrape(&net);
    assert_eq!(sum(&before, "supervisor_socket_stalled", &[]), 0.0);

    // A few datagrams, once: they stay queued.
    net.run_in(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20u32 {
            s.send_to(&i.to_le_bytes(), ADDR).unwrap();
        }
    });
    let sent = Instant::now();
    let status = sup.wait_status("a stalled socket", Duration::from_secs(15), |v| {
        serving_generation(v).is_some_and(|g| g["stalled"] == true)
    });
    let took = sent.elapsed();
    println!("stall reported after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "reported only after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "reported too early: {took:?}"
    );
    let g = serving_generation(&status).unwrap();
    let socket = &g["listeners"][0]["sockets"][0];
    assert_eq!(socket["stalled"], true, "{status}");
    assert!(socket["queue_bytes"].as_u64().unwrap() > 0, "{status}");

    let text = output_with_timeout(&mut sup.cli(&["status"]), CLI_TIMEOUT);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("STALLED"), "{text}");
    assert!(text.contains("stalled"), "{text}");

    let metrics = scrape(&net);
    assert_eq!(
        one(
            &metrics,
            "supervisor_socket_stalled",
            &[("generation", "1"), ("socket", "0")]
        ),
        1.0
    );
    assert_eq!(
        one(
            &metrics,
            "supervisor_generation_stalled",
            &[("generation", "1")]
        ),
        1.0
    );
    let (_, stderr) = sup.logs();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("receive queue stalled"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one (rate-limited) warning expected:\n{stderr}"
    );
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains("worker 0"), "{}", warnings[0]);

    // Killed, the worker is restarted on the same sockets: counted by reason.
    let pid = worker_pids(&status, 1)[0];
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    sup.wait_status("the worker restarted", Duration::from_secs(15), |v| {
        serving_generation(v)
            .is_some_and(|g| g["workers"][0]["restarts"] == 1 && g["workers"][0]["pid"].is_i64())
    });
    let metrics = scrape(&net);
    assert_eq!(
        one(
            &metrics,
            "supervisor_worker_restarts_total",
            &[("reason", "signaled")]
        ),
        1.0
    );
    sup.stop();
    pins.assert_empty_after_stop();
}

/// Runs `supervisor run` with `config`; requires exit 2, one `error:` line, and
/// nothing left behind. Returns the line.
fn refused(net: &TestNet, pins: &PinDir, runtime: &Path, config: &ServiceConfig) -> String {
    let work = TempDir::new("sup-work");
    let path: PathBuf = work.path().join("bad.toml");
    fs::write(&path, config.to_toml()).unwrap();
    let out = output_with_timeout(
        &mut supervisor_command(net, &[], &["run"], &path),
        CLI_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "exit 2 expected:\n{stderr}");
    let line = single_error_line(&stderr);
    println!("{line}");
    assert!(line.contains("metrics.listen"), "{line}");
    assert!(pins.entries().is_empty(), "pins left: {:?}", pins.entries());
    let leftovers: Vec<_> = fs::read_dir(runtime)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "left in the runtime dir: {leftovers:?}"
    );
    assert!(
        net.cmdlines().is_empty(),
        "processes left: {:?}",
        net.cmdlines()
    );
    line
}

#[test]
fn a_bad_metrics_listen_refuses_the_start() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut config = ServiceConfig::echo(2, addr, &pins, runtime.path());

    // Taken by another program.
    let squatter = net.run_in(|| TcpListener::bind(METRICS).expect("bind the squatter"));
    config.extra_toml = metrics_toml();
    let line = refused(&net, &pins, runtime.path(), &config);
    assert!(line.contains(METRICS) && line.contains("in use"), "{line}");
    drop(squatter);

    // Not an address.
    for bad in [
        "localhost:9464",
        "127.0.0.1",
        "127.0.0.1:0",
        "300.1.1.1:9464",
    ] {
        config.extra_toml = format!("[metrics]\nlisten = \"{bad}\"\n");
        let line = refused(&net, &pins, runtime.path(), &config);
        assert!(line.contains(bad), "{line}");
    }
    // An address this machine does not have.
    config.extra_toml = "[metrics]\nlisten = \"192.0.2.1:9464\"\n".into();
    let line = refused(&net, &pins, runtime.path(), &config);
    assert!(line.contains("192.0.2.1:9464"), "{line}");
}

#[test]
fn a_reexeced_image_serves_metrics_again() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut config = ServiceConfig::echo(2, addr, &pins, runtime.path());
    config.extra_toml = metrics_toml();
    let mut sup = Supervisor::start(&net, config);
    sup.wait_settled(1, SETTLE);
    assert_eq!(
        one(
            &scrape(&net),
            "supervisor_generations",
            &[("state", "serving")]
        ),
        1.0
    );
    let binary = supervisor_tests::bin_path("supervisor");
    let out = output_with_timeout(
        &mut sup.cli(&["reexec", "--binary", &binary.to_string_lossy()]),
        CLI_TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    // The new image bound the address again (the old one's socket closed at exec).
    let after = scrape(&net);
    assert_eq!(
        one(&after, "supervisor_generations", &[("state", "serving")]),
        1.0
    );
    assert_eq!(
        matching(
            &after,
            "supervisor_socket_selected_total",
            &[("generation", "1")]
        )
        .count(),
        2
    );
    let (_, stderr) = sup.logs();
    assert!(!stderr.contains("serving without metrics"), "{stderr}");
    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn the_endpoint_bounds_what_a_client_can_cost() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut config = ServiceConfig::echo(1, addr, &pins, runtime.path());
    config.extra_toml = metrics_toml();
    let mut sup = Supervisor::start(&net, config);
    net.run_in(|| {
        // A request head larger than 8 KiB: refused, closed.
        let mut c = TcpStream::connect(METRICS).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        );
        let _ = c.write_all(head.as_bytes());
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

        // A client that sends nothing is closed after the request timeout (5 s).
        let mut idle = TcpStream::connect(METRICS).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let n = idle.read(&mut buf).unwrap_or(0);
        let took = start.elapsed();
        assert_eq!(n, 0, "nothing to answer, closed");
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(12),
            "closed after {took:?}"
        );

        // One request, one answer, closed: HTTP/1.1 with Content-Length.
        let mut c = TcpStream::connect(METRICS).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains("Connection: close"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    });
    sup.stop();
    pins.assert_empty_after_stop();
}
