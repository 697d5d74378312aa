//! The crash figure: datagrams lost, and the time from a SIGKILL of the supervisor to
//! the restarted one having adopted what it found ("adopted": `status` answers), bare
//! and under a real systemd, next to stopping and starting the service.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::figure::{Figure, measure};
use super::handrun::{HandWorker, NotifyListener, terminate_all};
use super::phases::median_max;
use super::table::{Table, ms, percent, thousands};
use crate::{
    BackgroundLoad, LoadConfig, PinDir, Report, Rootfs, ServiceConfig, Supervisor,
    SystemdContainer, TempDir, TestNet, bin_path, python_worker_path, python3_path, workspace_root,
};

#[derive(Clone, Debug)]
pub struct CrashPlan {
    /// Send rate, datagrams/s (the issue measured at 5 000/s).
    pub rate: u64,
    /// Crashes (or restarts) per row.
    pub repeats: u32,
    pub workers: u32,
    /// Also measure under the real systemd (boots a container).
    pub systemd: bool,
}

/// How long the service runs without a supervisor in the measurement.
const DEAD_FOR: Duration = Duration::from_millis(500);
/// Between two crashes: the restarted supervisor settles.
const GAP: Duration = Duration::from_millis(300);
/// How often "adopted" is polled (one `supervisor status` call per poll).
const POLL: Duration = Duration::from_millis(2);

/// One row: what the load saw and how long each crash (or restart) took.
struct Row {
    label: String,
    report: Report,
    /// From the SIGKILL (or the stop) to `status` answering with a serving generation.
    to_adopted: Vec<Duration>,
}

fn load(addr: SocketAddr, rate: u64) -> LoadConfig {
    LoadConfig::new(addr)
        .senders(4)
        .rate(rate)
        .grace(Duration::from_secs(3))
}

/// Polls `status` until a generation serves; returns when that was first seen.
fn wait_adopted(sup: &Supervisor<'_>, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(v) = sup.try_status_json()
            && crate::supervisor::serving_generation(&v).is_some()
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the restarted supervisor did not answer within {timeout:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Bare: the supervisor SIGKILLed `repeats` times under load and started again after
/// `dead_for` (`None`: stopped with SIGTERM and started again instead, the baseline).
fn bare(plan: &CrashPlan, addr: SocketAddr, dead_for: Option<Duration>) -> Row {
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let argv = vec![
        python3_path().display().to_string(),
        python_worker_path().display().to_string(),
    ];
    let config = ServiceConfig::new("pyecho", argv, plan.workers, addr, &pins, runtime.path());
    let mut sup = Supervisor::start(&net, config);
    sup.wait_settled(1, Duration::from_secs(30));
    let bg = BackgroundLoad::start(&net, load(addr, plan.rate));
    std::thread::sleep(GAP);
    let mut to_adopted = Vec::new();
    for _ in 0..plan.repeats {
        let t = Instant::now();
        match dead_for {
            Some(d) => {
                sup.kill9();
                std::thread::sleep(d);
            }
            None => {
                sup.stop();
            }
        }
        sup.respawn(&[]);
        let adopted = wait_adopted(&sup, Duration::from_secs(30));
        to_adopted.push(adopted - t);
        std::thread::sleep(GAP);
    }
    let report = bg.finish();
    sup.stop();
    let label = match dead_for {
        Some(d) if d.is_zero() => "supervisor SIGKILL, `run` again at once".to_string(),
        Some(d) => format!("supervisor SIGKILL, `run` again {} ms later", d.as_millis()),
        None => "baseline: supervisor stop (SIGTERM, drain), then `run` again".to_string(),
    };
    Row {
        label,
        report,
        to_adopted,
    }
}

/// The upgrade figure's stop-then-start baseline, once per repeat: `echo-worker
/// --bind` processes in a plain SO_REUSEPORT group, all SIGTERMed, then started again.
fn by_hand(plan: &CrashPlan, addr: SocketAddr) -> Row {
    let net = TestNet::new();
    let notify = NotifyListener::new(&net);
    let start = |net: &TestNet| {
        let ws: Vec<HandWorker> = (0..plan.workers)
            .map(|_| HandWorker::spawn(net, addr, &notify))
            .collect();
        let pids: Vec<u32> = ws.iter().map(HandWorker::pid).collect();
        notify
            .wait_ready(&pids, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("echo-worker --bind {addr}: {e}"));
        ws
    };
    let mut workers = start(&net);
    let bg = BackgroundLoad::start(&net, load(addr, plan.rate));
    std::thread::sleep(GAP);
    let mut to_adopted = Vec::new();
    for _ in 0..plan.repeats {
        let t = Instant::now();
        terminate_all(std::mem::take(&mut workers), Duration::from_secs(5));
        workers = start(&net);
        to_adopted.push(t.elapsed());
        std::thread::sleep(GAP);
    }
    let report = bg.finish();
    drop(workers);
    Row {
        label: format!(
            "baseline: by hand, stop-then-start of {} `echo-worker --bind` (plain SO_REUSEPORT)",
            plan.workers
        ),
        report,
        to_adopted,
    }
}

/// The unit of examples/systemd/ in a container, started with the echo service.
struct Unit {
    ct: SystemdContainer,
    unit: String,
}

const CT_CONFIG: &str = "/etc/supervisor/echo.toml";

impl Unit {
    fn start(plan: &CrashPlan, addr: SocketAddr) -> Unit {
        let ct = SystemdContainer::boot(&Rootfs::Host);
        let link = ct.host_path("/usr/local/bin/supervisor");
        std::fs::create_dir_all(link.parent().expect("a parent")).expect("mkdir");
        std::os::unix::fs::symlink(bin_path("supervisor"), &link).expect("symlink");
        let file = "udp-supervisor@.service";
        let text = std::fs::read_to_string(workspace_root().join("examples/systemd").join(file))
            .expect("read the unit file");
        ct.write_file(format!("/etc/systemd/system/{file}"), text);
        // The image's own interpreter (the host's rootfs has /usr/bin/python3).
        let config = ServiceConfig::at(
            "echo",
            vec![
                "/usr/bin/python3".into(),
                python_worker_path().display().to_string(),
            ],
            plan.workers,
            addr,
            std::path::Path::new("/sys/fs/bpf/supervisor"),
            std::path::Path::new("/run/supervisor"),
        );
        ct.write_file(CT_CONFIG, config.to_toml());
        let u = Unit {
            ct,
            unit: "udp-supervisor@echo.service".into(),
        };
        u.ok(&["daemon-reload"]);
        u.ok(&["start", &u.unit]);
        u
    }

    fn ok(&self, args: &[&str]) {
        let out = self.ct.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    fn main_pid(&self) -> String {
        self.ct.show(&self.unit, "MainPID")
    }

    /// Polls until the unit has a new main process whose `status` shows a serving
    /// generation.
    fn wait_adopted(&self, old_main: &str) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let main = self.main_pid();
            if main != old_main && main != "0" {
                let out = self.ct.output(
                    self.ct
                        .command(bin_path("supervisor"))
                        .args(["status", "--json", "--config", CT_CONFIG]),
                );
                if out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout)
                        .ok()
                        .is_some_and(|v| crate::supervisor::serving_generation(&v).is_some())
                {
                    return Instant::now();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the unit's supervisor did not come back"
            );
            std::thread::sleep(POLL);
        }
    }
}

/// Under the real systemd: `systemctl kill -s KILL --kill-who=main` (systemd restarts
/// it after the unit's RestartSec=), or `systemctl restart` as the baseline.
fn under_systemd(plan: &CrashPlan, addr: SocketAddr, sigkill: bool) -> Row {
    let u = Unit::start(plan, addr);
    let bg = BackgroundLoad::start_in(u.ct.netns_path(), load(addr, plan.rate));
    std::thread::sleep(GAP);
    let mut to_adopted = Vec::new();
    for _ in 0..plan.repeats {
        // systemd refuses a sixth start within 10 s (StartLimitBurst=,
        // StartLimitIntervalSec= defaults): forget the earlier ones, or the
        // repeats measure the start limit.
        u.ok(&["reset-failed", &u.unit]);
        let old = u.main_pid();
        let t = Instant::now();
        if sigkill {
            u.ok(&["kill", "-s", "KILL", "--kill-who=main", &u.unit]);
        } else {
            u.ok(&["restart", &u.unit]);
        }
        let adopted = u.wait_adopted(&old);
        to_adopted.push(adopted - t);
        std::thread::sleep(GAP);
    }
    let report = bg.finish();
    u.ok(&["stop", &u.unit]);
    u.ct.shutdown();
    Row {
        label: if sigkill {
            "systemd: `systemctl kill -s KILL --kill-who=main`, Restart= starts it again".into()
        } else {
            "baseline, systemd: `systemctl restart`".into()
        },
        report,
        to_adopted,
    }
}

pub fn crash(plan: &CrashPlan, addr: SocketAddr) -> Figure {
    let mut fig = Figure {
        title: format!(
            "Supervisor crash: {} SIGKILLs at {}/s",
            plan.repeats,
            thousands(plan.rate)
        ),
        ..Figure::default()
    };
    fig.intro.push(format!(
        "Steady traffic ({} flows) to {} Python echo workers (they exit at once on SIGTERM, \
         as in the issue's measurement) while the supervisor is SIGKILLed {} times \
         ({} ms apart) and started again with the same config; \"to adopted\" runs from the \
         SIGKILL (or the stop) to the new supervisor's `status` showing a serving generation \
         (polled every {} ms, plus one `status` call). Baselines: stopping and starting the \
         supervisor, and the upgrade figure's stop-then-start by hand.",
        4,
        plan.workers,
        plan.repeats,
        GAP.as_millis(),
        POLL.as_millis()
    ));
    let mut t = Table::new(&[
        "what",
        ">sent",
        ">lost",
        ">loss",
        ">duplicated",
        ">ICMP refused",
        ">to adopted (median / max)",
    ]);
    let mut rows: Vec<(String, Result<Row, String>)> = Vec::new();
    let mut run = |label: &str, f: &dyn Fn() -> Row| {
        rows.push((label.to_string(), measure(&format!("crash: {label}"), f)));
    };
    run("SIGKILL, run at once", &|| {
        bare(plan, addr, Some(Duration::ZERO))
    });
    run("SIGKILL, run 0.5 s later", &|| {
        bare(plan, addr, Some(DEAD_FOR))
    });
    run("supervisor stop then run", &|| bare(plan, addr, None));
    run("by hand stop-then-start", &|| by_hand(plan, addr));
    if plan.systemd {
        run("systemd SIGKILL of main", &|| {
            under_systemd(plan, addr, true)
        });
        run("systemd restart", &|| under_systemd(plan, addr, false));
    }
    let mut j = Vec::new();
    for (label, r) in rows {
        match r {
            Ok(row) => {
                let r = &row.report;
                t.row([
                    row.label.clone(),
                    thousands(r.sent),
                    thousands(r.lost),
                    percent(r.lost, r.sent),
                    thousands(r.duplicated),
                    thousands(r.refused),
                    median_max(&row.to_adopted)
                        .map_or("-".into(), |(m, x)| format!("{} / {}", ms(m), ms(x))),
                ]);
                j.push(json!({
                    "what": row.label,
                    "sent": r.sent, "lost": r.lost, "duplicated": r.duplicated,
                    "refused": r.refused,
                    "to_adopted_ms": row.to_adopted.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
                }));
            }
            Err(e) => {
                t.row([format!("{label}: failed: {e}")]);
                j.push(json!({"what": label, "error": e}));
            }
        }
    }
    fig.tables.push(t);
    if !plan.systemd {
        fig.notes
            .push("under systemd: not measured (--crash-systemd to boot a container)".into());
    }
    fig.notes.push(format!(
        "times: median / max over the {} crashes (or restarts) of each row",
        plan.repeats
    ));
    fig.json = json!({ "rate": plan.rate, "repeats": plan.repeats, "rows": j });
    fig
}
