//! The XDP replacement figure: allowed datagrams lost, and denied datagrams let
//! through, while the filter's program is replaced under load. In place: the
//! supervisor re-executed into another build (the `selector-variant` build, whose
//! filter program differs harmlessly) and back, each re-exec moving the pinned link
//! onto its own program with a link update. Baseline: the naive replacement, the
//! filter detached (its link closed) and attached again, which leaves the interface
//! unfiltered in between.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use supervisor::xdp::{XdpConfig, XdpFilter, XdpMode};

use super::figure::{Figure, measure};
use super::phases::median_max;
use super::table::{Table, ms, percent, thousands};
use super::xdp as bench_xdp;
use crate::netns::ip;
use crate::{
    BackgroundLoad, LoadConfig, PinDir, Report, ServiceConfig, Supervisor, TempDir, TestNet,
    bin_path, selector_variant_path,
};

#[derive(Clone, Debug)]
pub struct XdpReplacePlan {
    /// Program replacements per row (re-execs, or detach-and-attach cycles).
    pub replacements: u32,
    /// Allowed datagrams per second, over `senders` flows.
    pub rate: u64,
    pub senders: usize,
    /// Datagrams per second from the denied sender (one flow).
    pub denied_rate: u64,
    pub workers: u32,
}

/// The service's port on the server's veth address.
const PORT: u16 = 5310;
/// Between two replacements: traffic runs through each program for a while.
const GAP: Duration = Duration::from_millis(300);
/// How often `status` is asked whether the new program is in place.
const POLL: Duration = Duration::from_millis(2);
/// The denied sender's host part on the client's /24.
const DENIED_HOST: u8 = 20;

/// A veth pair: the service on the server's end, the filter on its `veth-a` in native
/// mode, two senders on the client's end (its own address, allowed, and a second one
/// on the deny list).
struct Lab {
    server: TestNet,
    client: TestNet,
    ifname: String,
    target: SocketAddr,
    denied: Ipv4Addr,
}

impl Lab {
    fn new() -> Lab {
        let (server, client) = TestNet::pair();
        let veth = server.veth().expect("a veth pair").clone();
        let client_if = client.veth().expect("a veth pair").ifname.clone();
        // The senders must not start in (and overflow) the ARP queue.
        let mac = bench_xdp::mac(&server, &veth.ifname).unwrap_or_else(|e| panic!("{e}"));
        bench_xdp::permanent_neighbour(&client, &client_if, veth.addr.into(), &mac);
        let [a, b, c, _] = veth.peer_addr.octets();
        let denied = Ipv4Addr::new(a, b, c, DENIED_HOST);
        ip(&[
            "-n",
            client.name(),
            "addr",
            "add",
            &format!("{denied}/24"),
            "dev",
            &client_if,
        ]);
        Lab {
            target: SocketAddr::new(veth.addr.into(), PORT),
            ifname: veth.ifname,
            server,
            client,
            denied,
        }
    }

    /// The echo service, with the filter under `[xdp]` or without it.
    fn service(
        &self,
        plan: &XdpReplacePlan,
        pins: &PinDir,
        runtime: &Path,
        xdp: bool,
    ) -> ServiceConfig {
        let mut cfg = ServiceConfig::echo(plan.workers, self.target, pins, runtime);
        if xdp {
            cfg.extra_toml = format!(
                "[xdp]\ninterface = \"{}\"\nmode = \"native\"\ndeny = [\"{}/32\"]\n",
                self.ifname, self.denied
            );
        }
        cfg
    }

    /// The same filter as the `[xdp]` above, for the library.
    fn filter_config(&self) -> XdpConfig {
        XdpConfig {
            interface: self.ifname.clone(),
            mode: XdpMode::Native,
            deny: vec![format!("{}/32", self.denied)],
            allow: Vec::new(),
            rate_limit: None,
            drop_malformed: true,
        }
    }

    /// The allowed load and the denied one, both running until finished.
    fn loads(&self, plan: &XdpReplacePlan) -> (BackgroundLoad, BackgroundLoad) {
        let allowed = BackgroundLoad::start(
            &self.client,
            LoadConfig::new(self.target)
                .senders(plan.senders)
                .rate(plan.rate)
                .grace(Duration::from_secs(2)),
        );
        // Nothing answers a denied datagram: a short grace is enough for the replies
        // to those that got through.
        let denied = BackgroundLoad::start(
            &self.client,
            LoadConfig::new(self.target)
                .source(self.denied.into())
                .rate(plan.denied_rate)
                .grace(Duration::from_millis(500)),
        );
        (allowed, denied)
    }
}

/// One row: what the two senders saw and how long each replacement took.
struct Row {
    allowed: Report,
    denied: Report,
    mode: String,
    times: Vec<Duration>,
}

/// In place: `supervisor reexec` into the variant build and back, alternately.
fn link_update(plan: &XdpReplacePlan, lab: &Lab) -> Row {
    let variant = selector_variant_path();
    let real = bin_path("supervisor");
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut sup = Supervisor::start(&lab.server, lab.service(plan, &pins, runtime.path(), true));
    let xdp = |v: &Value| -> Value { v["xdp"].clone() };
    let first = xdp(&sup.status_json());
    let link_id = first["link_id"].as_u64();
    let mut program_id = first["program_id"].as_u64();
    assert!(
        link_id.is_some() && program_id.is_some(),
        "`status --json` has no xdp link and program: {first}"
    );
    let (allowed, denied) = lab.loads(plan);
    std::thread::sleep(GAP);
    let mut times = Vec::new();
    for i in 0..plan.replacements {
        let binary = if i % 2 == 0 { &variant } else { &real };
        let t = Instant::now();
        sup.reexec_into(binary);
        let deadline = t + Duration::from_secs(30);
        let now = loop {
            if let Ok(v) = sup.try_status_json()
                && xdp(&v)["program_id"].as_u64() != program_id
            {
                break xdp(&v);
            }
            assert!(
                Instant::now() < deadline,
                "re-exec {} into {}: the XDP program was not replaced",
                i + 1,
                binary.display()
            );
            std::thread::sleep(POLL);
        };
        times.push(t.elapsed());
        assert_eq!(
            now["link_id"].as_u64(),
            link_id,
            "re-exec {}: the link was replaced, not updated: {now}",
            i + 1
        );
        program_id = now["program_id"].as_u64();
        std::thread::sleep(GAP);
    }
    let denied = denied.finish();
    let allowed = allowed.finish();
    let mode = xdp(&sup.status_json())["mode"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    sup.stop();
    // The link's pin outlives the supervisor by design; removing it detaches the filter.
    let _ = std::fs::remove_dir_all(pins.path().join(&sup.config().name).join("xdp"));
    bench_xdp::wait_detached(&lab.server, &lab.ifname, Duration::from_secs(3));
    Row {
        allowed,
        denied,
        mode,
        times,
    }
}

/// Baseline: the same filter (the supervisor's library, the same build), closed and
/// attached again through a new link, as a tool without link updates replaces a
/// program. The kernel releases a closed link's attachment shortly after its last
/// reference goes, not at once: the new attach is retried until the interface is free.
fn detach_and_attach(plan: &XdpReplacePlan, lab: &Lab) -> Row {
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut sup = Supervisor::start(&lab.server, lab.service(plan, &pins, runtime.path(), false));
    let dir = pins.path().join("by-hand");
    let config = lab.filter_config();
    let listeners = [lab.target];
    let start = || XdpFilter::start(&config, &dir, &listeners);
    let filter = lab
        .server
        .run_in(start)
        .unwrap_or_else(|e| panic!("attaching the filter: {e:#}"));
    let mode = filter.status().mode.to_string();
    let (allowed, denied) = lab.loads(plan);
    std::thread::sleep(GAP);
    let (filter, times) = lab.server.run_in(move || {
        let mut filter = filter;
        let mut times = Vec::new();
        for i in 0..plan.replacements {
            let t = Instant::now();
            filter
                .remove()
                .unwrap_or_else(|e| panic!("detaching the filter: {e:#}"));
            filter = loop {
                match start() {
                    Ok(f) => break f,
                    Err(e) if t.elapsed() > Duration::from_secs(5) => {
                        panic!("replacement {}: attaching again: {e:#}", i + 1)
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            };
            times.push(t.elapsed());
            std::thread::sleep(GAP);
        }
        (filter, times)
    });
    let denied = denied.finish();
    let allowed = allowed.finish();
    let _ = filter.remove();
    sup.stop();
    bench_xdp::wait_detached(&lab.server, &lab.ifname, Duration::from_secs(3));
    Row {
        allowed,
        denied,
        mode,
        times,
    }
}

/// The figure: both rows on one veth pair, one after the other.
pub fn xdp_replace(plan: &XdpReplacePlan) -> Figure {
    let mut fig = Figure {
        title: format!(
            "XDP program replaced under load: {} replacements at {}/s allowed, {}/s denied",
            plan.replacements,
            thousands(plan.rate),
            thousands(plan.denied_rate)
        ),
        ..Figure::default()
    };
    fig.intro.push(format!(
        "Echo service ({} workers) behind the XDP filter (`mode = \"native\"`, deny one source) on the \
         server's end of a veth pair. From the client's end, allowed datagrams ({} flows from its own \
         address, every one answered) and denied ones (one flow from a second address on the deny \
         list; a reply to it is a denied datagram that reached a worker). The program is replaced \
         {} times, {} ms apart. **link update**: `supervisor reexec` into the `selector-variant` \
         build (its filter program differs by a check that never holds) and back, alternately; each \
         re-exec finds the pinned link and moves it onto its own program (`BPF_LINK_UPDATE`), the \
         link id staying the same (checked); the time runs from `reexec` to `status` showing the new \
         program id (polled every {} ms), so it is a whole re-exec. **baseline**: the same filter \
         (the supervisor's library, this build) detached (link closed, pin removed) and attached \
         again through a new link as soon as the kernel has released the old one; the time runs \
         from the detach to the new link attached, the interface unfiltered for most of it.",
        plan.workers,
        plan.senders,
        plan.replacements,
        GAP.as_millis(),
        POLL.as_millis()
    ));
    let mut t = Table::new(&[
        "replacement",
        "mode",
        ">done",
        ">allowed sent",
        ">lost",
        ">duplicated",
        ">denied sent",
        ">denied let through",
        ">time per replacement (median / max)",
    ]);
    let lab = match measure(
        "xdp-replace: veth pair, neighbour entry, denied source",
        Lab::new,
    ) {
        Ok(lab) => lab,
        Err(e) => {
            t.row([format!("failed to set up the veth pair: {e}")]);
            fig.tables.push(t);
            fig.json = json!({"error": e});
            return fig;
        }
    };
    let rows: [(&str, Result<Row, String>); 2] = [
        (
            "link update (re-exec into another build and back)",
            measure("xdp-replace: link update by re-exec", || {
                link_update(plan, &lab)
            }),
        ),
        (
            "baseline: detach, then attach again",
            measure("xdp-replace: detach and attach again", || {
                detach_and_attach(plan, &lab)
            }),
        ),
    ];
    let mut j = Vec::new();
    for (label, r) in rows {
        match r {
            Ok(row) => {
                let (a, d) = (&row.allowed, &row.denied);
                t.row([
                    label.to_string(),
                    row.mode.clone(),
                    row.times.len().to_string(),
                    thousands(a.sent),
                    thousands(a.lost),
                    thousands(a.duplicated),
                    thousands(d.sent),
                    format!(
                        "{} ({})",
                        thousands(d.received),
                        percent(d.received, d.sent)
                    ),
                    median_max(&row.times)
                        .map_or("-".into(), |(m, x)| format!("{} / {}", ms(m), ms(x))),
                ]);
                j.push(json!({
                    "what": label,
                    "mode": row.mode,
                    "replacements": row.times.len(),
                    "allowed": a.to_json(),
                    "denied_sent": d.sent,
                    "denied_let_through": d.received,
                    "time_ms": row.times.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
                }));
            }
            Err(e) => {
                t.row([format!("{label}: failed: {e}")]);
                j.push(json!({"what": label, "error": e}));
            }
        }
    }
    fig.tables.push(t);
    fig.notes.push(
        "Allowed datagrams pass while no filter is attached, so the baseline's cost is in \
         \"denied let through\": what reached the service while the interface was unfiltered. \
         With the link update there is no such moment: each packet meets the old program or the \
         new one."
            .into(),
    );
    fig.json = json!({ "plan": {
        "replacements": plan.replacements, "rate": plan.rate, "senders": plan.senders,
        "denied_rate": plan.denied_rate, "workers": plan.workers,
    }, "rows": j });
    fig
}
