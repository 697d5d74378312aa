//! `bench`: the numbers a user of the supervisor would ask for, each next to the
//! baseline it should be compared with, measured in the same run.
//!
//! Every measurement gets a fresh network namespace, pin directory and runtime
//! directory (the test harness), so one cannot disturb the next. Prints markdown on
//! stdout (progress goes to stderr); `--json FILE` also writes the raw figures.
//! Run it as root through `scripts/bench.sh` (release build); on a 2-core machine the
//! default run takes about ten minutes (half of it the 1000 consecutive upgrades),
//! `--quick` about two.
//!
//! Figures: spread of one sender over 4 workers; the selector's cost per datagram
//! (kernel BPF statistics) per balance mode and path (flow hit, cookie miss and hit)
//! beside an empty program's (the floor), on one non-echoing receiver, in rounds; throughput with and without the selector on
//! the same sockets; loss across upgrades against the two ways of restarting a plain
//! `SO_REUSEPORT` service by hand; upgrade timing; the supervisor's own footprint; and
//! the XDP filter's discard rate and per-packet cost against discarding in user space,
//! over a veth pair; and the XDP program replaced under load, in place (link update)
//! against detaching and attaching again. The selector costs and the upgrades are also drawn as SVG files
//! (`target/bench/selector-cost.svg`, `target/bench/upgrade.svg`, or `--svg-dir`).

#![deny(unsafe_code)]

use std::any::Any;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use supervisor_tests::bench::bpf;
use supervisor_tests::bench::chaos::{self as bench_chaos, ChaosPlan};
use supervisor_tests::bench::cleanup;
use supervisor_tests::bench::crash::{self as bench_crash, CrashPlan};
use supervisor_tests::bench::figure::Figure;
use supervisor_tests::bench::handrun::{HandWorker, NotifyListener, terminate_all};
use supervisor_tests::bench::many_flows::{self, ManyFlows};
use supervisor_tests::bench::phases::{self, UpgradeTiming, median_max};
use supervisor_tests::bench::plot::{self, CostBar, Mark, MarkKind};
use supervisor_tests::bench::procfs::{self, CpuMeter, CpuUse};
use supervisor_tests::bench::rounds;
use supervisor_tests::bench::table::{Table, ms, percent, thousands};
use supervisor_tests::bench::xdp as bench_xdp;
use supervisor_tests::bench::xdp_program_cost;
use supervisor_tests::bench::xdp_replace::{self as bench_xdp_replace, XdpReplacePlan};
use supervisor_tests::plain::run_plain_baseline;
use supervisor_tests::{
    BackgroundLoad, Balance, LoadConfig, PinDir, Report, ServiceConfig, Supervisor, TempDir,
    TestNet, bin_path, loadgen, output_with_timeout,
};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmark of the UDP upgrade supervisor against plain SO_REUSEPORT (run as root; markdown on stdout)."
)]
struct Args {
    /// About two minutes instead of ten: fewer datagrams, rounds and upgrades, shorter runs.
    #[arg(long)]
    quick: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Datagrams per spread run [default: 1000000; --quick: 200000].
    #[arg(long)]
    spread_count: Option<u64>,
    /// Send rate of the spread runs, datagrams/s [default: 100000].
    #[arg(long)]
    spread_rate: Option<u64>,
    /// Datagrams per selector-cost row and round [default: 300000; --quick: 100000].
    #[arg(long)]
    cost_count: Option<u64>,
    /// Send rate of the selector-cost rows, datagrams/s [default: 200000].
    #[arg(long)]
    cost_rate: Option<u64>,
    /// Rounds of the selector-cost rows (median and range over them) [default: 3; --quick: 2].
    #[arg(long)]
    cost_rounds: Option<usize>,
    /// Senders of the selector-cost rows' "many senders" half [default: 8].
    #[arg(long)]
    cost_senders: Option<usize>,
    /// Seconds per throughput run (flat out) [default: 5; --quick: 2].
    #[arg(long)]
    throughput_secs: Option<f64>,
    /// Upgrades (or hand restarts) per loss run [default: 10; --quick: 3].
    #[arg(long)]
    upgrades: Option<u32>,
    /// Send rate during the upgrades, datagrams/s [default: 20000].
    #[arg(long)]
    upgrade_rate: Option<u64>,
    /// Sending sockets (flows) during the upgrades [default: 4].
    #[arg(long)]
    upgrade_flows: Option<usize>,
    /// Consecutive upgrades of the scale row [default: 1000; --quick: 30].
    #[arg(long)]
    scale_upgrades: Option<u32>,
    /// Send rate of the scale row, datagrams/s [default: 100000].
    #[arg(long)]
    scale_rate: Option<u64>,
    /// Workers of the scale row [default: 8].
    #[arg(long)]
    scale_workers: Option<u32>,
    /// Sending sockets of the scale and saturation rows [default: 4].
    #[arg(long)]
    scale_senders: Option<usize>,
    /// Seconds per saturation run (capacity, control, with upgrades) [default: 6; --quick: 3].
    #[arg(long)]
    saturation_secs: Option<f64>,
    /// Deny prefixes per address family in the XDP cost rows [default: 2000].
    #[arg(long)]
    xdp_prefixes: Option<usize>,
    /// Seconds per XDP discard run (flat out) [default: 4; --quick: 2].
    #[arg(long)]
    xdp_secs: Option<f64>,
    /// Run only these figures: spread, selector (cost per datagram), throughput, upgrades (with
    /// timing), scale (many upgrades under load), saturation (upgrades at 90% of capacity),
    /// footprint, xdp (filter versus user-space discard), xdp-replace (the XDP program replaced
    /// under load), crash (supervisor SIGKILL), chaos (random events at 100 000/s).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// XDP program replacements per row of the xdp-replace figure [default: 20; --quick: 6].
    #[arg(long)]
    xdp_replacements: Option<u32>,
    /// Allowed datagrams per second during the XDP program replacements [default: 20000].
    #[arg(long)]
    xdp_replace_rate: Option<u64>,
    /// Events of the chaos figure [default: 1000; --quick: 20].
    #[arg(long)]
    chaos_events: Option<u32>,
    /// Seed of the chaos figure's draw of events.
    #[arg(long, default_value_t = 11)]
    chaos_seed: u64,
    /// Also measure the crash figure under a real systemd (boots a container).
    #[arg(long)]
    crash_systemd: bool,
    /// Where to write the pictures (selector-cost.svg, upgrade.svg) [default:
    /// target/bench, next to the build this binary belongs to].
    #[arg(long, value_name = "DIR")]
    svg_dir: Option<PathBuf>,
}

/// Everything fixed for one run, resolved from the arguments.
#[derive(Clone, Debug)]
struct Plan {
    quick: bool,
    workers: u32,
    spread_count: u64,
    spread_rate: u64,
    cost_count: u64,
    cost_rate: u64,
    cost_rounds: usize,
    cost_senders: usize,
    throughput: Duration,
    upgrades: u32,
    upgrade_rate: u64,
    upgrade_flows: usize,
    /// Pause between two upgrades (or hand restarts), so each one starts from a steady
    /// state rather than from the tail of the previous one.
    upgrade_gap: Duration,
    footprint: Duration,
    footprint_rate: u64,
    scale_upgrades: u32,
    scale_rate: u64,
    scale_workers: u32,
    scale_senders: usize,
    saturation: Duration,
    xdp_prefixes: usize,
    /// Sending time of each XDP discard run.
    xdp: Duration,
    only: Vec<String>,
    /// Directory of the SVG pictures.
    svg_dir: PathBuf,
}

impl Plan {
    fn from(a: &Args) -> Plan {
        let q = a.quick;
        Plan {
            quick: q,
            workers: 4,
            spread_count: a
                .spread_count
                .unwrap_or(if q { 200_000 } else { 1_000_000 }),
            spread_rate: a.spread_rate.unwrap_or(100_000),
            cost_count: a.cost_count.unwrap_or(if q { 100_000 } else { 300_000 }),
            cost_rate: a.cost_rate.unwrap_or(200_000),
            cost_rounds: a.cost_rounds.unwrap_or(if q { 2 } else { 3 }),
            cost_senders: a.cost_senders.unwrap_or(8),
            // Negative or NaN seconds become zero, which `check` refuses.
            throughput: Duration::try_from_secs_f64(a.throughput_secs.unwrap_or(if q {
                2.0
            } else {
                5.0
            }))
            .unwrap_or_default(),
            upgrades: a.upgrades.unwrap_or(if q { 3 } else { 10 }),
            upgrade_rate: a.upgrade_rate.unwrap_or(20_000),
            upgrade_flows: a.upgrade_flows.unwrap_or(4),
            upgrade_gap: Duration::from_millis(300),
            scale_upgrades: a.scale_upgrades.unwrap_or(if q { 30 } else { 1000 }),
            scale_rate: a.scale_rate.unwrap_or(100_000),
            scale_workers: a.scale_workers.unwrap_or(8),
            scale_senders: a.scale_senders.unwrap_or(4),
            saturation: Duration::try_from_secs_f64(a.saturation_secs.unwrap_or(if q {
                3.0
            } else {
                6.0
            }))
            .unwrap_or_default(),
            footprint: Duration::from_secs(if q { 2 } else { 5 }),
            footprint_rate: 50_000,
            xdp_prefixes: a.xdp_prefixes.unwrap_or(2000),
            xdp: Duration::try_from_secs_f64(a.xdp_secs.unwrap_or(if q { 2.0 } else { 4.0 }))
                .unwrap_or_default(),
            only: a.only.clone(),
            svg_dir: a
                .svg_dir
                .clone()
                .unwrap_or_else(|| plot::default_dir("bench")),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.spread_count == 0 || self.spread_rate == 0 || self.upgrade_rate == 0 {
            return Err("counts and rates must be positive".into());
        }
        if self.cost_count == 0 || self.cost_rate == 0 || self.cost_rounds == 0 {
            return Err("--cost-count, --cost-rate and --cost-rounds must be positive".into());
        }
        if self.cost_senders < 2 {
            return Err(
                "--cost-senders must be at least 2 (the one-sender rows are always there)".into(),
            );
        }
        if self.scale_rate == 0 || self.scale_workers == 0 || self.scale_senders == 0 {
            return Err(
                "--scale-rate, --scale-workers and --scale-senders must be positive".into(),
            );
        }
        if self.saturation.is_zero() {
            return Err("--saturation-secs must be positive".into());
        }
        if self.upgrade_flows == 0 {
            return Err("--upgrade-flows must be at least 1".into());
        }
        if self.throughput.is_zero() {
            return Err("--throughput-secs must be positive".into());
        }
        if self.xdp.is_zero() {
            return Err("--xdp-secs must be positive".into());
        }
        Ok(())
    }

    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == figure)
    }
}

const ADDR: &str = "127.0.0.1:5300";
const SERVICE: &str = "echo";

fn main() -> ExitCode {
    cleanup::install_signal_cleanup("bench");
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "bench: error: run as root (network namespaces, eBPF, SO_RCVBUFFORCE): sudo ./scripts/bench.sh"
        );
        return ExitCode::from(2);
    }
    for o in &args.only {
        let figures = [
            "spread",
            "selector",
            "throughput",
            "upgrades",
            "scale",
            "saturation",
            "footprint",
            "xdp",
            "xdp-replace",
            "crash",
            "chaos",
        ];
        if !figures.contains(&o.as_str()) {
            eprintln!(
                "bench: error: unknown figure {o:?} for --only ({})",
                figures.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let plan = Plan::from(&args);
    let crash_plan = CrashPlan {
        rate: 5_000,
        repeats: if args.quick { 3 } else { 10 },
        workers: 2,
        systemd: args.crash_systemd,
    };
    let chaos_plan = ChaosPlan {
        events: args
            .chaos_events
            .unwrap_or(if args.quick { 20 } else { 1000 }),
        rate: 100_000,
        seed: args.chaos_seed,
        workers: 4,
    };
    let xdp_replace_plan = XdpReplacePlan {
        replacements: args
            .xdp_replacements
            .unwrap_or(if args.quick { 6 } else { 20 }),
        rate: args.xdp_replace_rate.unwrap_or(20_000),
        senders: 4,
        denied_rate: 5_000,
        workers: 2,
    };
    if xdp_replace_plan.replacements == 0 || xdp_replace_plan.rate == 0 {
        eprintln!("bench: error: --xdp-replacements and --xdp-replace-rate must be positive");
        return ExitCode::from(2);
    }
    if let Err(e) = plan.check() {
        eprintln!("bench: error: {e}");
        return ExitCode::from(2);
    }
    // Measurement failures are caught per figure (and reported in the table); a panic
    // that still gets here has unwound through the harness' drops. Whatever might be
    // left is swept up by name.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run(&plan, &crash_plan, &chaos_plan, &xdp_replace_plan)
    }));
    for l in cleanup::remove_own_leftovers() {
        eprintln!("bench: cleanup: {l}");
    }
    let json = match result {
        Ok(j) => j,
        Err(p) => {
            eprintln!("bench: failed: {}", panic_text(&*p));
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.json {
        match std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ) {
            Ok(()) => eprintln!("bench: wrote {}", path.display()),
            Err(e) => {
                eprintln!("bench: error: write {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// One figure's output.
struct Section {
    /// Stable key of the figure in the JSON output.
    id: &'static str,
    title: String,
    intro: Vec<String>,
    tables: Vec<Table>,
    notes: Vec<String>,
    json: Value,
}

impl Section {
    fn new(id: &'static str, title: impl Into<String>) -> Section {
        Section {
            id,
            title: title.into(),
            intro: Vec::new(),
            tables: Vec::new(),
            notes: Vec::new(),
            json: json!({}),
        }
    }

    /// A figure measured by one of the `bench` modules.
    fn of(id: &'static str, f: Figure) -> Section {
        Section {
            id,
            title: f.title,
            intro: f.intro,
            tables: f.tables,
            notes: f.notes,
            json: f.json,
        }
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "## {}\n", self.title);
        for l in &self.intro {
            let _ = writeln!(out, "{l}");
        }
        if !self.intro.is_empty() {
            out.push('\n');
        }
        for t in &self.tables {
            out.push_str(&t.render());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
    }
}

/// Runs the figures, printing the markdown report as it goes (a figure's section as
/// soon as it is measured, so an interrupted run still shows what it got). Returns the
/// JSON document.
fn run(
    plan: &Plan,
    crash_plan: &CrashPlan,
    chaos_plan: &ChaosPlan,
    xdp_replace_plan: &XdpReplacePlan,
) -> Value {
    let started = Instant::now();
    let addr: SocketAddr = ADDR.parse().expect("valid address");
    let machine = procfs::machine();
    let rev = procfs::git_revision().unwrap_or_else(|| "unknown".into());
    let sysctl_before = bpf::stats_sysctl();
    eprintln!("bench: {machine}");
    println!("# udp-supervisor benchmark\n");
    println!("- machine: {machine}");
    println!("- build: release, git {rev}");
    println!(
        "- run: {}; every figure and its baseline measured in this run, each in a fresh network namespace",
        if plan.quick { "--quick" } else { "full" },
    );
    println!(
        "- kernel.bpf_stats_enabled before: {} (statistics are turned on only during the cost runs, through a BPF_ENABLE_STATS fd)\n",
        sysctl_before.as_deref().unwrap_or("?"),
    );

    let mut sections = Vec::new();
    let mut emit = |s: Section| {
        let mut md = String::new();
        s.render(&mut md);
        print!("{md}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        sections.push(s);
    };
    if plan.wants("spread") {
        emit(spread(plan, addr));
    }
    if plan.wants("selector") {
        emit(selector_cost(plan, addr));
    }
    if plan.wants("throughput") {
        emit(throughput(plan, addr));
    }
    if plan.wants("upgrades") {
        let (loss, timing) = upgrades(plan, addr);
        emit(loss);
        emit(timing);
    }
    if plan.wants("scale") {
        emit(upgrades_at_scale(plan, addr));
    }
    if plan.wants("saturation") {
        emit(saturation(plan, addr));
    }
    if plan.wants("footprint") {
        emit(footprint(plan, addr));
    }
    if plan.wants("xdp") {
        emit(xdp(plan, addr));
        emit(xdp_cost(plan));
    }
    if plan.wants("xdp-replace") {
        emit(Section::of(
            "xdp_replace",
            bench_xdp_replace::xdp_replace(xdp_replace_plan),
        ));
    }
    if plan.wants("crash") {
        emit(Section::of("crash", bench_crash::crash(crash_plan, addr)));
    }
    if plan.wants("chaos") {
        emit(Section::of("chaos", bench_chaos::chaos(chaos_plan, addr)));
    }
    let sysctl_after = bpf::stats_sysctl();
    println!(
        "---\n\nFinished in {:.0} s; kernel.bpf_stats_enabled after: {}.",
        started.elapsed().as_secs_f64(),
        sysctl_after.as_deref().unwrap_or("?")
    );
    json!({
        "machine": machine,
        "git": rev,
        "quick": plan.quick,
        "seconds": started.elapsed().as_secs_f64(),
        "bpf_stats_enabled": {"before": sysctl_before, "after": sysctl_after},
        "figures": sections.iter().map(|s| json!({"id": s.id, "title": s.title, "data": s.json})).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------
// Plumbing

fn panic_text(p: &(dyn Any + Send)) -> String {
    let text = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    // The harness' messages carry the daemon's whole log; a table cell wants one line.
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// Runs one measurement, reporting progress on stderr; a panic (a harness setup
/// failure, a supervisor that would not start) becomes `Err` with its first line, so
/// the other figures still get measured.
fn measure<T>(label: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    eprint!("bench: {label} ... ");
    let t = Instant::now();
    let r = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p));
    match &r {
        Ok(_) => eprintln!("{:.1} s", t.elapsed().as_secs_f64()),
        Err(e) => eprintln!("FAILED: {e}"),
    }
    r
}

/// A fresh namespace, pin directory and runtime directory for one measurement (the
/// supervisor borrows the namespace, so it is started next to this, not in it).
struct Stage {
    net: TestNet,
    pins: PinDir,
    runtime: TempDir,
}

impl Stage {
    fn new() -> Stage {
        Stage {
            net: TestNet::new(),
            pins: PinDir::new(),
            runtime: TempDir::new("sup-run"),
        }
    }

    /// The echo service with `workers` workers and balance mode `mode`.
    fn config(&self, addr: SocketAddr, workers: u32, mode: &str) -> ServiceConfig {
        service_config(addr, workers, mode, &self.pins, &self.runtime)
    }
}

fn service_config(
    addr: SocketAddr,
    workers: u32,
    mode: &str,
    pins: &PinDir,
    runtime: &TempDir,
) -> ServiceConfig {
    let cfg = ServiceConfig::echo(workers, addr, pins, runtime.path());
    match mode {
        "random" => cfg.balance(Balance::Random),
        "hash" => cfg.balance(Balance::Hash),
        "flow" => cfg.balance(Balance::Flow),
        other => {
            // Modes the harness has no enum value for: the raw key. `extra_toml` is
            // appended right after the `[[listen]]` table, so these keys belong to it.
            let mut cfg = cfg;
            cfg.extra_toml = format!("balance = \"{other}\"");
            if other == "cookie" {
                cfg.extra_toml += &format!("\ncookie_offset = {COOKIE_OFFSET}");
            }
            cfg
        }
    }
}

/// Whether the supervisor accepts a config, asked without a daemon: `supervisor status`
/// parses and validates the whole file before it tries to reach the daemon, so an
/// accepted file fails with "cannot reach the supervisor" and a refused one with the
/// reason naming the file.
fn config_accepted(cfg: &ServiceConfig) -> Result<(), String> {
    let dir = TempDir::new("sup-probe");
    let path = dir.path().join("probe.toml");
    std::fs::write(&path, cfg.to_toml()).map_err(|e| e.to_string())?;
    let out = output_with_timeout(
        Command::new(bin_path("supervisor"))
            .args(["status", "--config"])
            .arg(&path),
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("cannot reach the supervisor") {
        Ok(())
    } else {
        Err(err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or(err.trim())
            .replace(&path.display().to_string(), "config")
            .to_string())
    }
}

/// The balance modes this supervisor build accepts, in a fixed order.
fn supported_modes(addr: SocketAddr) -> (Vec<&'static str>, Vec<(&'static str, String)>) {
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut yes = Vec::new();
    let mut no = Vec::new();
    for mode in ["random", "hash", "flow", "cookie"] {
        match config_accepted(&service_config(addr, 4, mode, &pins, &runtime)) {
            Ok(()) => yes.push(mode),
            Err(e) => no.push((mode, e)),
        }
    }
    (yes, no)
}

/// Replies of generation `generation` per worker index `0..workers`.
fn replies_per_worker(r: &Report, generation: u32, workers: u32) -> Vec<u64> {
    (0..workers as u16)
        .map(|w| r.per_worker.get(&(generation, w)).copied().unwrap_or(0))
        .collect()
}

/// (max share, min share, max/min) of per-worker counts.
fn shares(counts: &[u64]) -> (f64, f64, f64) {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0) as f64;
    let ratio = if min == 0.0 { f64::INFINITY } else { max / min };
    (max / total, min / total, ratio)
}

fn fmt_ratio(r: f64, counts: &[u64]) -> String {
    if r.is_finite() {
        format!("{r:.3}")
    } else {
        let idle = counts.iter().filter(|&&c| c == 0).count();
        format!("∞ ({idle} of {} got nothing)", counts.len())
    }
}

fn pct(f: f64) -> String {
    format!("{:.2}%", f * 100.0)
}

/// One per-socket field of `status --json` for every socket of `generation`, in order.
fn socket_field(status: &Value, generation: u32, field: &str) -> Vec<u64> {
    supervisor_tests::supervisor::sockets_of(status, generation)
        .iter()
        .map(|s| s[field].as_u64().unwrap_or(0))
        .collect()
}

fn selected_per_socket(status: &Value, generation: u32) -> Vec<u64> {
    socket_field(status, generation, "selected")
}

fn socket_field_sum(status: &Value, generation: u32, field: &str) -> u64 {
    socket_field(status, generation, field).iter().sum()
}

// ---------------------------------------------------------------------------------
// Spread and selector cost

/// Offset of the cookie in the payload in `cookie` mode: right behind the load
/// generator's 8-byte sequence number.
const COOKIE_OFFSET: usize = 8;

/// Which of the selector's paths a run's traffic takes, for the modes where it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// random and hash: there is only one.
    Only,
    /// flow: one sender is one flow, known after its first datagram.
    FlowHit,
    /// flow: the senders go round `many_flows::FLOWS` flows, all known before the
    /// run, one datagram per flow in turn (the flow cache's worst case).
    FlowMany,
    /// cookie: no valid cookie in the payload (padding where the cookie would be).
    CookieMiss,
    /// cookie: every datagram carries a live socket's cookie, rotating over the sockets.
    CookieHit,
}

/// One run of the spread / selector-cost figure.
#[derive(Clone, Copy, Debug)]
struct Case {
    mode: &'static str,
    path: Path,
}

impl Case {
    /// The runs for the supported modes, in order: cookie twice (miss, then hit).
    fn all(modes: &[&'static str]) -> Vec<Case> {
        modes
            .iter()
            .flat_map(|&mode| {
                let paths: &[Path] = match mode {
                    "flow" => &[Path::FlowHit, Path::FlowMany],
                    "cookie" => &[Path::CookieMiss, Path::CookieHit],
                    _ => &[Path::Only],
                };
                paths.iter().map(move |&path| Case { mode, path })
            })
            .collect()
    }

    fn path_name(&self) -> Option<&'static str> {
        match self.path {
            Path::Only => None,
            Path::FlowHit | Path::CookieHit => Some("hit"),
            Path::FlowMany => Some("hit, 16 384 flows"),
            Path::CookieMiss => Some("miss"),
        }
    }

    /// `random`, `flow (hit)`, `cookie (miss)`, ...
    fn balance(&self) -> String {
        match self.path_name() {
            Some(p) => format!("{} ({p})", self.mode),
            None => self.mode.to_string(),
        }
    }

    fn spread_label(&self, sockets: u32) -> String {
        let base = format!("supervisor, balance = {}", self.mode);
        match self.path {
            Path::Only | Path::FlowHit | Path::FlowMany => base,
            Path::CookieMiss => base + " (miss: no valid cookie in the payload)",
            Path::CookieHit => {
                base + &format!(" (hit: valid cookies rotating over the {sockets} sockets)")
            }
        }
    }
}

struct SpreadRun {
    counts: Vec<u64>,
    report: Report,
    selected: Vec<u64>,
    /// Of the selections: datagrams of a known flow / with a valid cookie.
    affinity_hits: u64,
}

fn spread_run(plan: &Plan, addr: SocketAddr, case: Case) -> SpreadRun {
    let n = plan.spread_count;
    let rate = plan.spread_rate;
    let stage = Stage::new();
    let mut sup = Supervisor::start(&stage.net, stage.config(addr, plan.workers, case.mode));
    let generation = sup.serving_generation();
    let mut load = LoadConfig::new(addr).count(n).rate(rate);
    if case.path == Path::CookieHit {
        let sockets = selected_per_socket(&sup.status_json(), generation).len() as u32;
        assert!(sockets > 0, "no sockets in generation {generation}");
        load = load.stamp(
            COOKIE_OFFSET,
            (0..sockets)
                .map(|s| supervisor_common::cookie(generation, s))
                .collect(),
        );
    }
    let report = stage
        .net
        .run_in(|| loadgen::run(&load))
        .expect("load generator");
    let status = sup.status_json();
    sup.stop();
    SpreadRun {
        counts: replies_per_worker(&report, generation, plan.workers),
        selected: selected_per_socket(&status, generation),
        affinity_hits: socket_field_sum(&status, generation, "affinity_hits"),
        report,
    }
}

fn spread(plan: &Plan, addr: SocketAddr) -> Section {
    let (modes, refused) = supported_modes(addr);
    let n = plan.spread_count;
    let rate = plan.spread_rate;
    let mut spread = Section::new(
        "spread",
        format!(
            "Spread: one sender (one 4-tuple), {} workers, {} datagrams at {}/s",
            plan.workers,
            thousands(n),
            thousands(rate)
        ),
    );
    spread.intro.push(
        "Share of the replies each worker sent (max and min over the workers; 25% each is even). \
         The selector's per-socket `selected` counters agree with the replies unless noted."
            .into(),
    );
    let mut st = Table::new(&[
        "distribution",
        ">max share",
        ">min share",
        ">max/min",
        ">sent",
        ">lost",
    ]);
    let mut sj = Vec::new();

    // One flow row is enough for the spread: many flows spread like one.
    for case in Case::all(&modes)
        .into_iter()
        .filter(|c| c.path != Path::FlowMany)
    {
        let r = measure(&format!("spread, balance={}", case.balance()), || {
            spread_run(plan, addr, case)
        });
        let label = case.spread_label(plan.workers);
        match r {
            Ok(run) => {
                let (max, min, ratio) = shares(&run.counts);
                let sel_total: u64 = run.selected.iter().sum();
                if sel_total > 0 {
                    let (smax, smin, _) = shares(&run.selected);
                    if (smax - max).abs() > 0.01 || (smin - min).abs() > 0.01 {
                        spread.notes.push(format!(
                            "balance = {}: the selector's counters say max {} / min {} (replies differ when datagrams are lost)",
                            case.balance(),
                            pct(smax),
                            pct(smin)
                        ));
                    }
                }
                st.row([
                    label,
                    pct(max),
                    pct(min),
                    fmt_ratio(ratio, &run.counts),
                    thousands(run.report.sent),
                    thousands(run.report.lost),
                ]);
                sj.push(json!({"distribution": format!("supervisor/{}", case.mode), "path": case.path_name(),
                    "per_worker": run.counts, "selected_per_socket": run.selected,
                    "affinity_hits": run.affinity_hits, "report": run.report.to_json()}));
            }
            Err(e) => {
                st.row([label, format!("failed: {e}")]);
                sj.push(json!({"distribution": format!("supervisor/{}", case.mode), "path": case.path_name(), "error": e}));
            }
        }
    }

    let r = measure("spread, plain SO_REUSEPORT (no program)", || {
        let net = TestNet::new();
        run_plain_baseline(&net, addr, plan.workers as usize, n, rate)
    });
    match r {
        Ok((counts, report)) => {
            let (max, min, ratio) = shares(&counts);
            st.row([
                format!("plain SO_REUSEPORT, {} sockets, no program", plan.workers),
                pct(max),
                pct(min),
                fmt_ratio(ratio, &counts),
                thousands(report.sent),
                thousands(report.lost),
            ]);
            sj.push(
                json!({"distribution": "plain", "per_socket": counts, "report": report.to_json()}),
            );
        }
        Err(e) => {
            st.row([
                "plain SO_REUSEPORT, no program".to_string(),
                format!("failed: {e}"),
            ]);
        }
    }

    if modes.contains(&"hash") || modes.contains(&"flow") {
        spread.notes.push(
            "hash and flow keep one sender on one worker by design (hash: the 4-tuple hash, like the kernel; \
             flow: sticky per remote address and port); random and cookie spread it (cookie, miss: each datagram \
             is a new flow, placed at random; hit: each goes where its cookie says, here every socket in turn)."
                .into(),
        );
    }
    for (mode, why) in &refused {
        spread.notes.push(format!(
            "balance = {mode}: not measured, this supervisor refuses it ({why})"
        ));
    }
    spread.tables.push(st);
    spread.json = json!(sj);
    spread
}

// ---------------------------------------------------------------------------------
// Selector cost

/// One row kind of the selector-cost figure: the empty program, or the selector in
/// one balance mode and path.
#[derive(Clone, Copy, Debug)]
enum CostProgram {
    Empty,
    /// One `bpf_sk_select_reuseport` for socket 0 and nothing else.
    SelectFirst,
    Selector(Case),
}

impl CostProgram {
    fn label(&self) -> String {
        match self {
            CostProgram::Empty => "empty program".into(),
            CostProgram::SelectFirst => "select socket 0".into(),
            CostProgram::Selector(c) => c.balance(),
        }
    }
}

/// One measured run: BPF statistics deltas and the selector's hit share.
#[derive(Clone, Copy, Debug)]
struct CostSample {
    runs: u64,
    ns: f64,
    /// Of the selections, those of a known flow / with a valid cookie.
    hit_share: Option<f64>,
}

fn cost_cell_sum(status: &Value, generation: u32) -> (u64, u64) {
    (
        socket_field_sum(status, generation, "selected"),
        socket_field_sum(status, generation, "affinity_hits"),
    )
}

/// Pins the calling thread (and so the load generator's threads, which inherit its
/// mask) to `cpu`; returns the mask to restore.
fn pin_to_cpu(cpu: usize) -> Option<nix::sched::CpuSet> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let old = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut one = CpuSet::new();
    one.set(cpu).ok()?;
    sched_setaffinity(Pid::from_raw(0), &one).ok()?;
    Some(old)
}

fn unpin(old: Option<nix::sched::CpuSet>) {
    if let Some(old) = old {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old);
    }
}

/// One supervisor with `drain-worker`s (they receive with `recvmmsg` and answer
/// nothing) in `program`'s mode; for the empty program, the supervisor's group in
/// random mode with the empty program attached in place of the selector. Then, for
/// each sender count in `senders` (in that order), `plan.cost_count` datagrams from
/// that many sockets, all sending threads pinned to CPU 0.
fn cost_run(
    plan: &Plan,
    addr: SocketAddr,
    program: CostProgram,
    senders: &[usize],
) -> Vec<(usize, Result<CostSample, String>)> {
    let stage = Stage::new();
    let mode = match program {
        CostProgram::Empty | CostProgram::SelectFirst => "random",
        CostProgram::Selector(c) => c.mode,
    };
    let mut cfg = stage.config(addr, plan.workers, mode);
    cfg.command = vec![bin_path("drain-worker").to_string_lossy().into_owned()];
    let mut sup = Supervisor::start(&stage.net, cfg);
    let generation = sup.serving_generation();
    let pid = sup.pid().expect("running");
    // The empty program replaces the selector on the very same group (the program
    // belongs to the group): same sockets, same workers, same traffic.
    let (id, _empty) = match program {
        CostProgram::Empty => match stage.net.run_in(|| bpf::attach_floor(addr)) {
            Ok((fd, id)) => (Ok(id), Some(fd)),
            Err(e) => (Err(e), None),
        },
        CostProgram::SelectFirst => {
            let pin = stage
                .pins
                .path()
                .join(SERVICE)
                .join(SERVICE)
                .join(format!("gen-{generation}"));
            match stage.net.run_in(|| bpf::attach_select_first(addr, &pin)) {
                Ok((fd, id)) => (Ok(id), Some(fd)),
                Err(e) => (Err(e), None),
            }
        }
        CostProgram::Selector(_) => (
            bpf::find_selector(stage.pins.path(), SERVICE, SERVICE, pid),
            None,
        ),
    };
    let stamp = match program {
        CostProgram::Selector(c) if c.path == Path::CookieHit => {
            let sockets = selected_per_socket(&sup.status_json(), generation).len() as u32;
            Some(
                (0..sockets)
                    .map(|s| supervisor_common::cookie(generation, s))
                    .collect::<Vec<u16>>(),
            )
        }
        _ => None,
    };
    let stats_fd = bpf::enable_stats();
    let mut out = Vec::new();
    for &n in senders {
        if let CostProgram::Selector(c) = program
            && c.path == Path::FlowMany
        {
            out.push((
                n,
                many_flows_sample(&stage, &sup, id.clone(), &stats_fd, plan, addr, n),
            ));
            continue;
        }
        let mut load = LoadConfig::new(addr)
            .senders(n)
            .count(plan.cost_count)
            .rate(plan.cost_rate)
            .grace(Duration::from_millis(50));
        if let Some(values) = &stamp {
            load = load.stamp(COOKIE_OFFSET, values.clone());
        }
        let sample = (|| {
            let id = id.clone()?;
            if let Err(e) = &stats_fd {
                return Err(format!("BPF_ENABLE_STATS: {e}"));
            }
            let status_before = sup.status_json();
            let before = bpf::prog_stats(id)?;
            let old = pin_to_cpu(0);
            let report = stage.net.run_in(|| loadgen::run(&load));
            unpin(old);
            report.map_err(|e| format!("load generator: {e}"))?;
            let after = bpf::prog_stats(id)?;
            let status_after = sup.status_json();
            let (runs, ns) = after.since(&before);
            let ns = ns.ok_or("no runs counted")?;
            let hit_share = match program {
                CostProgram::Selector(c) if c.path != Path::Only => {
                    let (s0, h0) = cost_cell_sum(&status_before, generation);
                    let (s1, h1) = cost_cell_sum(&status_after, generation);
                    let selected = s1.saturating_sub(s0);
                    (selected > 0).then(|| h1.saturating_sub(h0) as f64 / selected as f64)
                }
                _ => None,
            };
            Ok(CostSample {
                runs,
                ns,
                hit_share,
            })
        })();
        out.push((n, sample));
    }
    drop(stats_fd);
    sup.stop();
    out
}

/// The "many flows" row's measurement: [`many_flows::FLOWS`] flows from `n`
/// threads, all known to the selector before the statistics are read (see
/// [`ManyFlows`]).
fn many_flows_sample(
    stage: &Stage,
    sup: &Supervisor,
    id: Result<u32, String>,
    stats_fd: &std::io::Result<std::os::fd::OwnedFd>,
    plan: &Plan,
    addr: SocketAddr,
    n: usize,
) -> Result<CostSample, String> {
    let id = id?;
    if let Err(e) = stats_fd {
        return Err(format!("BPF_ENABLE_STATS: {e}"));
    }
    let generation = sup.serving_generation();
    let flows = stage
        .net
        .run_in(|| ManyFlows::open(addr, n))
        .map_err(|e| format!("open {} flows: {e}", many_flows::FLOWS))?;
    let status_before = sup.status_json();
    let before = bpf::prog_stats(id)?;
    let sent = flows
        .send(plan.cost_count, plan.cost_rate, || {
            pin_to_cpu(0);
        })
        .map_err(|e| format!("many-flows sender: {e}"))?;
    let after = bpf::prog_stats(id)?;
    let status_after = sup.status_json();
    if sent == 0 {
        return Err("nothing sent".into());
    }
    let (runs, ns) = after.since(&before);
    let (s0, h0) = cost_cell_sum(&status_before, generation);
    let (s1, h1) = cost_cell_sum(&status_after, generation);
    let selected = s1.saturating_sub(s0);
    Ok(CostSample {
        runs,
        ns: ns.ok_or("no runs counted")?,
        hit_share: (selected > 0).then(|| h1.saturating_sub(h0) as f64 / selected as f64),
    })
}

#[expect(
    clippy::needless_range_loop,
    reason = "the round number also orders the rows and names the progress line, not only an index"
)]
fn selector_cost(plan: &Plan, addr: SocketAddr) -> Section {
    let (modes, refused) = supported_modes(addr);
    let mut programs = vec![CostProgram::Empty, CostProgram::SelectFirst];
    programs.extend(Case::all(&modes).into_iter().map(CostProgram::Selector));
    let sender_counts = [1usize, plan.cost_senders];
    // samples[program][sender count index] per round; floors per round likewise.
    let mut samples: Vec<[Vec<Option<CostSample>>; 2]> = programs
        .iter()
        .map(|_| [vec![None; plan.cost_rounds], vec![None; plan.cost_rounds]])
        .collect();
    let mut errors: Vec<String> = Vec::new();
    let order: Vec<usize> = (0..programs.len()).collect();
    for round in 0..plan.cost_rounds {
        for p in rounds::alternating(&order, round) {
            let senders = rounds::alternating(&sender_counts, round);
            let label = format!(
                "selector cost round {}/{}: {}",
                round + 1,
                plan.cost_rounds,
                programs[p].label()
            );
            match measure(&label, || cost_run(plan, addr, programs[p], &senders)) {
                Ok(results) => {
                    for (n, r) in results {
                        let k = usize::from(n != 1);
                        match r {
                            Ok(s) => samples[p][k][round] = Some(s),
                            Err(e) => errors.push(format!(
                                "{} ({n} senders), round {}: {e}",
                                programs[p].label(),
                                round + 1
                            )),
                        }
                    }
                }
                Err(e) => errors.push(format!("{label}: {e}")),
            }
        }
    }

    let mut cost = Section::new(
        "selector_cost",
        "Selector cost per datagram (kernel BPF statistics)",
    );
    cost.intro.push(format!(
        "Method: one supervisor per row and round, {} `drain-worker`s (they receive with `recvmmsg`, 64 per call, and \
         answer nothing, so no reply competes with the sender); the load generator's `sendmmsg` senders pinned to CPU 0; \
         {} datagrams per row at {}/s from one sender (one 4-tuple) and again from {} senders; {} rounds, the rows in \
         alternating order (forward, then backward) and the two sender counts too. Cost: `run_time_ns / run_cnt` deltas \
         of the group's program (`BPF_ENABLE_STATS`; the two clock reads the statistics add are in every row). The empty \
         program (`r0 = SK_PASS; exit`, the floor any `SK_REUSEPORT` program pays) is attached in place of the selector \
         to the same supervisor's group, same workers, same traffic; so is the selection floor, a program that makes \
         one `bpf_sk_select_reuseport` call for socket 0 of the serving generation's socket array (its `gen-N` pin) \
         and nothing else, the least a program that selects pays. Figures: median (min-max) over the rounds; \
         \"above empty\" is each round's row minus that round's empty program.",
        plan.workers,
        thousands(plan.cost_count),
        thousands(plan.cost_rate),
        plan.cost_senders,
        plan.cost_rounds,
    ));
    let mut t = Table::new(&[
        "program: balance (path)",
        ">senders",
        ">runs per round",
        ">ns per datagram",
        ">above empty",
        ">affinity hits",
    ]);
    let mut cj = Vec::new();
    let mut bars = Vec::new();
    for (k, &n) in sender_counts.iter().enumerate() {
        for (p, program) in programs.iter().enumerate() {
            let rows = &samples[p][k];
            let ns: Vec<f64> = rows.iter().flatten().map(|s| s.ns).collect();
            let above: Vec<f64> = rows
                .iter()
                .zip(&samples[0][k])
                .filter_map(|(s, f)| Some(s.as_ref()?.ns - f.as_ref()?.ns))
                .collect();
            let runs: Vec<u64> = rows.iter().flatten().map(|s| s.runs).collect();
            let hits: Vec<f64> = rows.iter().flatten().filter_map(|s| s.hit_share).collect();
            let spread = rounds::Spread::of(&ns);
            let above_spread = rounds::Spread::of(&above);
            let is_empty = matches!(program, CostProgram::Empty);
            t.row([
                match program {
                    CostProgram::Empty => "empty program (floor)".to_string(),
                    CostProgram::SelectFirst => {
                        "one `bpf_sk_select_reuseport`, socket 0 (selection floor)".to_string()
                    }
                    CostProgram::Selector(c) => {
                        format!("`{}`: {}", bpf::SELECTOR_NAME, c.balance())
                    }
                },
                n.to_string(),
                runs.iter().min().map_or("-".into(), |m| thousands(*m)),
                spread.map_or("not measured".into(), |s| s.cell(false)),
                if is_empty {
                    "-".into()
                } else {
                    above_spread.map_or("-".into(), |s| s.cell(true))
                },
                rounds::Spread::of(&hits).map_or("-".into(), |s| pct(s.median)),
            ]);
            if n == 1
                && let Some(s) = spread
            {
                bars.push(CostBar {
                    label: if is_empty {
                        "empty program (floor)".into()
                    } else {
                        format!("balance = {}", program.label())
                    },
                    ns: s.median,
                    floor: is_empty,
                });
            }
            cj.push(json!({
                "program": match program {
                    CostProgram::Empty => "empty",
                    CostProgram::SelectFirst => "select_first",
                    CostProgram::Selector(_) => bpf::SELECTOR_NAME,
                },
                "balance": program.label(),
                "senders": n,
                "ns_per_run": ns,
                "above_empty": above,
                "runs": runs,
                "hit_share": hits,
                "median": spread.map(|s| s.median),
                "above_empty_median": above_spread.map(|s| s.median),
            }));
        }
    }
    cost.tables.push(t);
    let svg = plan.svg_dir.join("selector-cost.svg");
    match plot::selector_cost(
        &svg,
        &format!(
            "Selector cost per datagram, median of {} rounds ({} datagrams at {}/s, one sender)",
            plan.cost_rounds,
            thousands(plan.cost_count),
            thousands(plan.cost_rate)
        ),
        &bars,
    ) {
        Ok(()) => {
            eprintln!("bench: wrote {}", svg.display());
            cost.notes.push(format!("picture: `{}`", svg.display()));
        }
        Err(e) => cost.notes.push(format!("no picture: {e}")),
    }
    cost.notes.push(
        "flow (hit): each sender is one flow, so after its first datagram every run is a flow-table hit. cookie (miss): \
         the cookie bytes are padding (0x5a5a, no live generation), each datagram is a new flow placed at random. cookie \
         (hit): each datagram carries a live socket's cookie, rotating over the sockets."
            .into(),
    );
    cost.notes.push(
        "Targets (issue 15), above the empty program in this measurement: random <= 40 ns, flow hit <= 80 ns, \
         cookie hit <= 35 ns, hash <= 20 ns. For scale: udpgrm measured the same way, 180 ns (no-op) and 269 ns (flow table)."
            .into(),
    );
    for (mode, why) in &refused {
        cost.notes.push(format!(
            "balance = {mode}: not measured, this supervisor refuses it ({why})"
        ));
    }
    for e in errors {
        cost.notes.push(format!("not measured: {e}"));
    }
    cost.json = json!(cj);
    cost
}

// ---------------------------------------------------------------------------------
// Throughput

fn throughput(plan: &Plan, addr: SocketAddr) -> Section {
    let secs = plan.throughput;
    let mut s = Section::new(
        "throughput",
        format!(
            "Throughput: flat out for {:.0} s, {} workers (echo-worker processes under the supervisor)",
            secs.as_secs_f64(),
            plan.workers
        ),
    );
    s.intro.push(
        "Received/s = distinct datagrams answered per second of sending. \"No program\" is the same supervisor, \
         sockets and workers with the selector detached from the reuseport group before the traffic \
         (the kernel then picks by 4-tuple hash): the difference is the selector's doing, its cost per datagram \
         and its spreading one flow over all workers."
            .into(),
    );
    let mut t = Table::new(&[
        "sockets",
        ">flows",
        ">sent/s",
        ">received/s",
        ">lost",
        ">loss",
        "workers answering",
    ]);
    let mut j = Vec::new();
    for flows in [1usize, 4] {
        for with_selector in [true, false] {
            let label = if with_selector {
                "selector, balance = random"
            } else {
                "same sockets, no program"
            };
            let r = measure(&format!("throughput, {label}, {flows} flow(s)"), || {
                let stage = Stage::new();
                let mut sup =
                    Supervisor::start(&stage.net, stage.config(addr, plan.workers, "random"));
                let generation = sup.serving_generation();
                if !with_selector {
                    stage
                        .net
                        .run_in(|| bpf::detach_group_program(addr))
                        .expect("detach the selector from the reuseport group");
                }
                let report = stage
                    .net
                    .run_in(|| {
                        loadgen::run(
                            &LoadConfig::new(addr)
                                .senders(flows)
                                .duration(secs)
                                .flat_out(),
                        )
                    })
                    .expect("load generator");
                let selected: u64 = selected_per_socket(&sup.status_json(), generation)
                    .iter()
                    .sum();
                sup.stop();
                (report, selected, generation)
            });
            match r {
                Ok((report, selected, generation)) => {
                    let d = report.duration.as_secs_f64().max(1e-9);
                    let answering = replies_per_worker(&report, generation, plan.workers)
                        .iter()
                        .filter(|&&c| c > 0)
                        .count();
                    t.row([
                        label.to_string(),
                        flows.to_string(),
                        thousands((report.sent as f64 / d) as u64),
                        thousands((report.received as f64 / d) as u64),
                        thousands(report.lost),
                        percent(report.lost, report.sent),
                        format!("{answering} of {}", plan.workers),
                    ]);
                    if !with_selector && selected > 0 {
                        s.notes.push(format!(
                            "{flows} flow(s), no program: the selector still counted {selected} selections, so the detach did not take"
                        ));
                    }
                    j.push(json!({"sockets": label, "flows": flows, "selector": with_selector,
                        "sent_per_s": report.sent as f64 / d, "received_per_s": report.received as f64 / d,
                        "selector_selected": selected, "report": report.to_json()}));
                }
                Err(e) => {
                    t.row([label.to_string(), flows.to_string(), format!("failed: {e}")]);
                }
            }
        }
    }
    s.notes.push(format!(
        "The load generator, the {} workers and the kernel share this machine's CPUs, so these are end-to-end figures of \
         the whole box, not of the selector alone (its own cost is in the table above).",
        plan.workers
    ));
    s.tables.push(t);
    s.json = json!(j);
    s
}

// ---------------------------------------------------------------------------------
// Loss across upgrades, and upgrade timing

struct LossRun {
    report: Report,
    /// Upgrades (or replacements by hand) that completed.
    done: u32,
    failures: Vec<String>,
    timings: Vec<UpgradeTiming>,
    /// Wall time of each `supervisor upgrade` call / replacement by hand.
    walls: Vec<Duration>,
    /// Old workers that had to be SIGKILLed (by hand only).
    killed: usize,
    cpu: Option<CpuUse>,
    rss_kib: Option<(u64, u64)>,
    /// Request, flip and gone of each upgrade on the load's time axis (supervisor only).
    marks: Vec<Mark>,
}

impl LossRun {
    fn new(report: Report) -> LossRun {
        LossRun {
            report,
            done: 0,
            failures: Vec::new(),
            timings: Vec::new(),
            walls: Vec::new(),
            killed: 0,
            cpu: None,
            rss_kib: None,
            marks: Vec::new(),
        }
    }
}

fn load_cfg(plan: &Plan, addr: SocketAddr) -> LoadConfig {
    LoadConfig::new(addr)
        .senders(plan.upgrade_flows)
        .rate(plan.upgrade_rate)
}

/// Traffic runs from half a second before the first replacement to a fifth of a second
/// after the last one (time for the last stragglers), so every replacement happens
/// under load and the steady state around them is small.
const LEAD_IN: Duration = Duration::from_millis(500);
const LEAD_OUT: Duration = Duration::from_millis(200);

fn upgrades_supervisor(plan: &Plan, addr: SocketAddr) -> LossRun {
    let stage = Stage::new();
    let mut sup = Supervisor::start(&stage.net, stage.config(addr, plan.workers, "random"));
    let pid = sup.pid().expect("running");
    let rss_before = procfs::rss_kib(pid);
    let meter = CpuMeter::start(pid);
    // Time series for the picture: the whole run if each upgrade takes under 2 s.
    let span = LEAD_IN + LEAD_OUT + Duration::from_secs(2 * u64::from(plan.upgrades) + 2);
    let load_started = Instant::now();
    let load = BackgroundLoad::start(&stage.net, load_cfg(plan, addr).timeline(span));
    std::thread::sleep(LEAD_IN);
    let mut run = LossRun::new(Report::default());
    let mut requests = Vec::new();
    for i in 0..plan.upgrades {
        let t = Instant::now();
        let out = sup.upgrade();
        run.walls.push(t.elapsed());
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            run.done += 1;
            let timing = phases::timing(&phases::parse(&stdout));
            requests.push((t, timing));
            run.timings.push(timing);
        } else {
            run.failures.push(format!(
                "upgrade {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or("failed")
            ));
        }
        std::thread::sleep(plan.upgrade_gap);
    }
    std::thread::sleep(LEAD_OUT);
    run.report = load.finish();
    // The load's own start is a moment after `load_started`, inside its thread.
    let zero = run
        .report
        .timeline
        .as_ref()
        .and_then(|t| t.start)
        .unwrap_or(load_started);
    for (t, timing) in requests {
        let at = t.saturating_duration_since(zero).as_secs_f64();
        run.marks.push(Mark {
            secs: at,
            kind: MarkKind::Request,
        });
        for (d, kind) in [(timing.flip, MarkKind::Flip), (timing.gone, MarkKind::Gone)] {
            if let Some(d) = d {
                run.marks.push(Mark {
                    secs: at + d.as_secs_f64(),
                    kind,
                });
            }
        }
    }
    run.cpu = meter.and_then(|m| m.finish());
    run.rss_kib = rss_before.zip(procfs::rss_kib(pid));
    sup.stop();
    run
}

/// How a service is replaced by hand.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ByHand {
    /// Nothing is replaced: the same traffic for as long, as a control (at a rate the
    /// workers cannot keep up with, this is where loss without any restart shows).
    Control,
    /// SIGTERM every old worker, wait until they are gone, start the new ones.
    StopThenStart,
    /// Start the new workers, wait until every one said READY=1, SIGTERM the old ones.
    StartThenStop,
}

/// The baselines: `plan.workers` processes of `echo-worker --bind ADDR` in one plain
/// SO_REUSEPORT group (as many as the supervisor runs), replaced as a whole.
fn upgrades_by_hand(plan: &Plan, addr: SocketAddr, how: ByHand) -> LossRun {
    let net = TestNet::new();
    let notify = NotifyListener::new(&net);
    let ready = Duration::from_secs(10);
    let kill_after = Duration::from_secs(5);
    let start = |net: &TestNet| {
        let ws: Vec<HandWorker> = (0..plan.workers)
            .map(|_| HandWorker::spawn(net, addr, &notify))
            .collect();
        let pids: Vec<u32> = ws.iter().map(HandWorker::pid).collect();
        notify
            .wait_ready(&pids, ready)
            .unwrap_or_else(|e| panic!("echo-worker --bind {addr}: {e}"));
        ws
    };
    let mut workers = start(&net);
    let load = BackgroundLoad::start(&net, load_cfg(plan, addr));
    std::thread::sleep(LEAD_IN);
    let mut run = LossRun::new(Report::default());
    for _ in 0..plan.upgrades {
        let t = Instant::now();
        match how {
            ByHand::Control => {
                // As long as a replacement by hand takes, give or take.
                std::thread::sleep(Duration::from_millis(20));
            }
            ByHand::StopThenStart => {
                run.killed += terminate_all(std::mem::take(&mut workers), kill_after);
                workers = start(&net);
            }
            ByHand::StartThenStop => {
                let new = start(&net);
                run.killed += terminate_all(std::mem::replace(&mut workers, new), kill_after);
            }
        }
        run.walls.push(t.elapsed());
        run.done += 1;
        std::thread::sleep(plan.upgrade_gap);
    }
    std::thread::sleep(LEAD_OUT);
    run.report = load.finish();
    drop(workers);
    run
}

/// The window around the first upgrade of the picture: from a little before its
/// request to a little after its old generation was gone.
fn first_upgrade(marks: &[Mark]) -> Option<(f64, f64)> {
    let request = marks.iter().find(|m| m.kind == MarkKind::Request)?.secs;
    let end = marks
        .iter()
        .filter(|m| m.secs >= request)
        .take_while(|m| m.kind != MarkKind::Request || m.secs == request)
        .map(|m| m.secs)
        .fold(request, f64::max);
    let pad = ((end - request) * 0.25).max(0.05);
    Some((request - pad, end + pad))
}

fn upgrades(plan: &Plan, addr: SocketAddr) -> (Section, Section) {
    let mut loss = Section::new(
        "upgrade_loss",
        format!(
            "Loss across {} upgrades at {}/s ({} flows)",
            plan.upgrades,
            thousands(plan.upgrade_rate),
            plan.upgrade_flows
        ),
    );
    loss.intro.push(format!(
        "Steady traffic while the service is replaced {} times ({} ms apart). Baselines: `echo-worker --bind {ADDR}` run by hand \
         on a plain SO_REUSEPORT socket, no eBPF, exiting at once on SIGTERM like most services.",
        plan.upgrades,
        plan.upgrade_gap.as_millis()
    ));
    let mut t = Table::new(&[
        "method",
        ">sent",
        ">lost",
        ">loss",
        ">duplicated",
        ">ICMP refused",
        ">time per replacement (median)",
    ]);
    let mut j = Vec::new();
    let mut sup_run = None;
    let methods = [
        (
            format!(
                "supervisor upgrade ({} workers, balance = random)",
                plan.workers
            ),
            None,
        ),
        (
            format!(
                "by hand, control: nothing replaced ({} workers)",
                plan.workers
            ),
            Some(ByHand::Control),
        ),
        (
            format!(
                "by hand, stop-then-start: SIGTERM {0} old, start {0} new",
                plan.workers
            ),
            Some(ByHand::StopThenStart),
        ),
        (
            format!(
                "by hand, start-new-then-stop-old: start {0} new, all READY=1, SIGTERM {0} old",
                plan.workers
            ),
            Some(ByHand::StartThenStop),
        ),
    ];
    for (label, how) in methods {
        let r = measure(&format!("loss across upgrades: {label}"), || match how {
            None => upgrades_supervisor(plan, addr),
            Some(how) => upgrades_by_hand(plan, addr, how),
        });
        match r {
            Ok(run) => {
                let median = if how == Some(ByHand::Control) {
                    "-".into()
                } else {
                    median_max(&run.walls)
                        .map(|(m, _)| ms(m))
                        .unwrap_or_default()
                };
                let mut label = label.clone();
                if run.done < plan.upgrades {
                    label += &format!(" ({} of {} succeeded)", run.done, plan.upgrades);
                }
                if run.killed > 0 {
                    label += &format!(" ({} needed SIGKILL)", run.killed);
                }
                t.row([
                    label.clone(),
                    thousands(run.report.sent),
                    thousands(run.report.lost),
                    percent(run.report.lost, run.report.sent),
                    thousands(run.report.duplicated),
                    thousands(run.report.refused),
                    median,
                ]);
                for f in &run.failures {
                    loss.notes.push(f.clone());
                }
                j.push(json!({"method": label, "replacements": run.done, "report": run.report.to_json(),
                    "wall_ms": run.walls.iter().map(|w| w.as_secs_f64() * 1000.0).collect::<Vec<_>>()}));
                if how.is_none() {
                    sup_run = Some(run);
                }
            }
            Err(e) => {
                t.row([label.clone(), format!("failed: {e}")]);
            }
        }
    }
    loss.notes.push(
        "ICMP refused: sends that got \"connection refused\" back, i.e. moments when nothing was bound to the port."
            .into(),
    );
    loss.tables.push(t);
    loss.json = json!(j);

    let mut timing = Section::new(
        "upgrade_timing",
        format!(
            "Upgrade timing ({} upgrades under {}/s)",
            plan.upgrades,
            thousands(plan.upgrade_rate)
        ),
    );
    timing.intro.push(
        "From the phase lines of `supervisor upgrade` (times counted by the daemon from the request). \
         The old generation is gone once its queues are empty, its workers (drain signal, then 200 ms idle read \
         deadline of echo-worker) have exited and its sockets are closed."
            .into(),
    );
    let mut tt = Table::new(&["interval", ">median", ">max", ">upgrades"]);
    let mut tj = json!({});
    if let Some(run) = &sup_run {
        let svg = plan.svg_dir.join("upgrade.svg");
        let drawn = match &run.report.timeline {
            Some(t) => plot::replies_over_time(
                &svg,
                &format!(
                    "{} upgrades under {} datagrams/s ({} flows, {} workers, balance = random)",
                    run.done,
                    thousands(plan.upgrade_rate),
                    plan.upgrade_flows,
                    plan.workers
                ),
                t,
                &run.marks,
                first_upgrade(&run.marks),
            ),
            None => Err("no time series recorded".into()),
        };
        match drawn {
            Ok(()) => {
                eprintln!("bench: wrote {}", svg.display());
                timing.notes.push(format!(
                    "picture: `{}` (replies per 10 ms per generation; request, flip and old generation gone marked)",
                    svg.display()
                ));
            }
            Err(e) => timing.notes.push(format!("no picture: {e}")),
        }
        let flips: Vec<Duration> = run.timings.iter().filter_map(|t| t.flip).collect();
        let gones: Vec<Duration> = run.timings.iter().filter_map(|t| t.gone).collect();
        let drains: Vec<Duration> = run
            .timings
            .iter()
            .filter_map(|t| Some(t.gone?.saturating_sub(t.flip?)))
            .collect();
        for (label, v) in [
            ("request → flip (new generation receives)", &flips),
            ("flip → old generation gone", &drains),
            ("request → old generation gone", &gones),
            ("`supervisor upgrade` command, wall time", &run.walls),
        ] {
            match median_max(v) {
                Some((m, x)) => tt.row([label.to_string(), ms(m), ms(x), v.len().to_string()]),
                None => tt.row([label.to_string(), "-".into(), "-".into(), "0".into()]),
            };
        }
        let list = |v: &Vec<Duration>| {
            v.iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>()
        };
        tj = json!({"flip_ms": list(&flips), "gone_ms": list(&gones), "drain_ms": list(&drains), "wall_ms": list(&run.walls),
            "supervisor_cpu_ms": run.cpu.map(|c| c.run.as_secs_f64() * 1000.0),
            "supervisor_rss_kib_before_after": run.rss_kib});
        if let (Some(cpu), Some((before, after))) = (run.cpu, run.rss_kib) {
            timing.notes.push(format!(
                "the supervisor ran {:.1} ms on a CPU over these {:.1} s ({} upgrades); its RSS went from {} KiB to {} KiB",
                cpu.run.as_secs_f64() * 1000.0,
                cpu.wall.as_secs_f64(),
                run.done,
                thousands(before),
                thousands(after)
            ));
        }
    } else {
        tt.row(["not measured (the supervisor run failed)"]);
    }
    timing.tables.push(tt);
    timing.json = tj;
    (loss, timing)
}

// ---------------------------------------------------------------------------------
// Upgrades at scale and at saturation

/// Phase lines of one `upgrade --wait drained`, as durations from the request.
#[derive(Clone, Copy, Debug, Default)]
struct Cycle {
    wall: Duration,
    flip: Option<Duration>,
    signal: Option<Duration>,
    gone: Option<Duration>,
    /// From the last worker's READY=1 to the flip, as the supervisor reports it.
    flip_after_ready: Option<Duration>,
}

impl Cycle {
    fn of(wall: Duration, stdout: &str) -> Cycle {
        let ph = phases::parse(stdout);
        let find = |needle: &str| ph.iter().find(|p| p.text.contains(needle)).map(|p| p.at);
        let flip_after_ready = ph
            .iter()
            .find(|p| p.text.contains("flipped"))
            .and_then(|p| phases::after_ready(&p.text));
        Cycle {
            wall,
            flip: find("flipped"),
            signal: find("drain signal sent"),
            gone: find("drained and removed"),
            flip_after_ready,
        }
    }
}

/// `median / p99 / max` of some durations, in ms.
fn dist_ms(values: &[Duration]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let mut v = values.to_vec();
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!("{} / {} / {}", ms(at(0.5)), ms(at(0.99)), ms(at(1.0)))
}

/// Pins under the pin directory, files only.
fn pin_count(pins: &PinDir) -> usize {
    pins.entries().iter().filter(|p| !p.is_dir()).count()
}

struct ScaleRun {
    report: Report,
    /// Datagrams the namespace's kernel dropped at a full socket receive buffer
    /// (workers' or load generator's): loss from CPU starvation, not from upgrades.
    rcvbuf_drops: Option<u64>,
    cycles: Vec<Cycle>,
    refused: u64,
    failed: Vec<String>,
    fds: (usize, usize),
    pins: (usize, usize),
    rss_kib: Option<(u64, u64)>,
}

/// `n` consecutive `upgrade --wait drained` of a `workers`-worker echo service while
/// `senders` sockets send `rate` datagrams/s in all.
fn upgrade_series(
    addr: SocketAddr,
    workers: u32,
    senders: usize,
    rate: Option<u64>,
    n: u32,
    label: &str,
) -> ScaleRun {
    let stage = Stage::new();
    let mut sup = Supervisor::start(&stage.net, stage.config(addr, workers, "random"));
    let pid = sup.pid().expect("running");
    let fds_before = supervisor_tests::leaks::FdCensus::of(pid)
        .map(|c| c.total())
        .unwrap_or(0);
    let pins_before = pin_count(&stage.pins);
    let rss_before = procfs::rss_kib(pid);
    let mut cfg = LoadConfig::new(addr).senders(senders);
    cfg = match rate {
        Some(r) => cfg.rate(r),
        None => cfg.flat_out(),
    };
    let drops_before = stage.net.run_in(procfs::udp_rcvbuf_errors);
    let load = BackgroundLoad::start(&stage.net, cfg);
    std::thread::sleep(LEAD_IN);
    let mut cycles = Vec::new();
    let mut refused = 0;
    let mut failed = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let out = sup.upgrade();
        let wall = t.elapsed();
        match out.status.code() {
            Some(0) => cycles.push(Cycle::of(wall, &String::from_utf8_lossy(&out.stdout))),
            Some(2) => refused += 1,
            _ => failed.push(format!(
                "upgrade {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or("failed")
            )),
        }
        if (i + 1) % 100 == 0 {
            eprintln!("bench: {label}: {} of {n} upgrades", i + 1);
        }
    }
    std::thread::sleep(LEAD_OUT);
    let report = load.finish();
    let drops_after = stage.net.run_in(procfs::udp_rcvbuf_errors);
    let fds_after = supervisor_tests::leaks::FdCensus::of(pid)
        .map(|c| c.total())
        .unwrap_or(0);
    let pins_after = pin_count(&stage.pins);
    let rss_after = procfs::rss_kib(pid);
    sup.stop();
    ScaleRun {
        report,
        rcvbuf_drops: drops_before
            .zip(drops_after)
            .map(|(b, a)| a.saturating_sub(b)),
        cycles,
        refused,
        failed,
        fds: (fds_before, fds_after),
        pins: (pins_before, pins_after),
        rss_kib: rss_before.zip(rss_after),
    }
}

fn cycle_columns(cycles: &[Cycle]) -> [String; 5] {
    let pick = |f: &dyn Fn(&Cycle) -> Option<Duration>| -> Vec<Duration> {
        cycles.iter().filter_map(f).collect()
    };
    let micros = |v: Vec<Duration>| -> String {
        if v.is_empty() {
            return "-".into();
        }
        let mut v = v;
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
        format!("{:.0} µs / {:.0} µs / {:.0} µs", at(0.5), at(0.99), at(1.0))
    };
    [
        dist_ms(&pick(&|c| Some(c.wall))),
        dist_ms(&pick(&|c| c.flip)),
        micros(pick(&|c| c.flip_after_ready)),
        dist_ms(&pick(&|c| Some(c.signal?.saturating_sub(c.flip?)))),
        dist_ms(&pick(&|c| Some(c.gone?.saturating_sub(c.signal?)))),
    ]
}

fn upgrades_at_scale(plan: &Plan, addr: SocketAddr) -> Section {
    let mut s = Section::new(
        "upgrades_at_scale",
        format!(
            "{} consecutive upgrades, {} workers, {} datagrams/s from {} senders",
            plan.scale_upgrades,
            plan.scale_workers,
            thousands(plan.scale_rate),
            plan.scale_senders
        ),
    );
    s.intro.push(format!(
        "Each upgrade is `supervisor upgrade --wait drained` (it returns once the old generation is gone), the next one \
         right after; the echo workers drain after {} ms idle (their read deadline). Times are median / p99 / max in ms.",
        200
    ));
    let r = measure("upgrades at scale", || {
        upgrade_series(
            addr,
            plan.scale_workers,
            plan.scale_senders,
            Some(plan.scale_rate),
            plan.scale_upgrades,
            "upgrades at scale",
        )
    });
    let mut t = Table::new(&["measure", "value"]);
    match r {
        Ok(run) => {
            let [wall, flip, after_ready, to_signal, signal_to_gone] = cycle_columns(&run.cycles);
            t.row([
                "upgrades done / refused / failed".to_string(),
                format!(
                    "{} / {} / {}",
                    run.cycles.len(),
                    run.refused,
                    run.failed.len()
                ),
            ]);
            t.row(["datagrams sent".to_string(), thousands(run.report.sent)]);
            t.row([
                "lost / duplicated / refused (ICMP)".to_string(),
                format!(
                    "{} / {} / {}",
                    thousands(run.report.lost),
                    thousands(run.report.duplicated),
                    thousands(run.report.refused)
                ),
            ]);
            t.row([
                "dropped by the kernel at a full socket receive buffer (RcvbufErrors)".to_string(),
                run.rcvbuf_drops.map_or("-".into(), thousands),
            ]);
            t.row([
                "per upgrade, request to old generation gone".to_string(),
                wall,
            ]);
            t.row(["request to flip".to_string(), flip]);
            t.row(["flip after the last READY=1".to_string(), after_ready]);
            t.row([
                "flip to drain signal (supervisor: queues read empty)".to_string(),
                to_signal,
            ]);
            t.row([
                "drain signal to removed (worker: read deadline, exit)".to_string(),
                signal_to_gone,
            ]);
            t.row([
                "supervisor fds before → after".to_string(),
                format!("{} → {}", run.fds.0, run.fds.1),
            ]);
            t.row([
                "pins before → after".to_string(),
                format!("{} → {}", run.pins.0, run.pins.1),
            ]);
            t.row([
                "supervisor RSS before → after".to_string(),
                run.rss_kib.map_or("-".into(), |(a, b)| {
                    format!("{:.1} → {:.1} MiB", a as f64 / 1024.0, b as f64 / 1024.0)
                }),
            ]);
            for f in run.failed.iter().take(5) {
                s.notes.push(f.clone());
            }
            s.json = json!({"report": run.report.to_json(), "refused_upgrades": run.refused, "failed": run.failed,
                "fds": [run.fds.0, run.fds.1], "pins": [run.pins.0, run.pins.1], "rss_kib": run.rss_kib,
                "wall_ms": run.cycles.iter().map(|c| c.wall.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                "flip_after_ready_us": run.cycles.iter().filter_map(|c| c.flip_after_ready).map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>()});
        }
        Err(e) => {
            t.row(["failed".to_string(), e.clone()]);
            s.json = json!({"error": e});
        }
    }
    s.tables.push(t);
    s
}

/// Replies per second flat out from `senders` sockets, over `secs`.
fn capacity(addr: SocketAddr, workers: u32, senders: usize, d: Duration) -> Report {
    let stage = Stage::new();
    let mut sup = Supervisor::start(&stage.net, stage.config(addr, workers, "random"));
    let report = stage
        .net
        .run_in(|| {
            loadgen::run(
                &LoadConfig::new(addr)
                    .senders(senders)
                    .flat_out()
                    .duration(d),
            )
        })
        .expect("load generator");
    sup.stop();
    report
}

/// `rate` datagrams/s for `d`, with upgrades back to back all along (or none).
fn at_rate(
    addr: SocketAddr,
    workers: u32,
    senders: usize,
    rate: u64,
    d: Duration,
    upgrades: bool,
) -> (Report, Vec<Cycle>, Option<u64>) {
    let stage = Stage::new();
    let mut sup = Supervisor::start(&stage.net, stage.config(addr, workers, "random"));
    let drops_before = stage.net.run_in(procfs::udp_rcvbuf_errors);
    let load = BackgroundLoad::start(
        &stage.net,
        LoadConfig::new(addr)
            .senders(senders)
            .rate(rate)
            .duration(d),
    );
    let mut cycles = Vec::new();
    let started = Instant::now();
    if upgrades {
        while started.elapsed() + Duration::from_millis(500) < d {
            let t = Instant::now();
            let out = sup.upgrade();
            if out.status.success() {
                cycles.push(Cycle::of(
                    t.elapsed(),
                    &String::from_utf8_lossy(&out.stdout),
                ));
            }
        }
    }
    // The load stops by itself after `d`; `finish` would cut it short.
    while !load.is_finished() && started.elapsed() < d + Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = load.finish();
    let drops = drops_before
        .zip(stage.net.run_in(procfs::udp_rcvbuf_errors))
        .map(|(b, a)| a.saturating_sub(b));
    sup.stop();
    (report, cycles, drops)
}

fn saturation(plan: &Plan, addr: SocketAddr) -> Section {
    let mut s = Section::new(
        "saturation",
        format!(
            "Upgrades at saturation: {} workers, {} senders, 90% of the capacity measured just before",
            plan.workers, plan.scale_senders
        ),
    );
    s.intro.push(format!(
        "Capacity: replies per second flat out for {} s. Then {} s at 90% of it, without upgrades (control) and with \
         upgrades back to back (`--wait drained`, so a new generation starts cold on the same 2 cores while the old one \
         drains). Each run in a fresh supervisor.",
        plan.saturation.as_secs_f64(),
        plan.saturation.as_secs_f64()
    ));
    let mut t = Table::new(&[
        "run",
        ">offered/s",
        ">sent",
        ">replies/s",
        ">lost",
        ">of which at a full receive buffer",
        ">duplicated",
        ">upgrades",
        "request to gone ms (median / p99 / max)",
    ]);
    let cap = measure("saturation: capacity flat out", || {
        capacity(addr, plan.workers, plan.scale_senders, plan.saturation)
    });
    let mut sj = json!({});
    match cap {
        Ok(cap) => {
            let per_s = cap.received as f64 / cap.duration.as_secs_f64().max(1e-9);
            t.row([
                "capacity (flat out)".to_string(),
                thousands(cap.rate as u64),
                thousands(cap.sent),
                thousands(per_s as u64),
                thousands(cap.lost),
                "-".into(),
                thousands(cap.duplicated),
                "-".into(),
                "-".into(),
            ]);
            let rate = (per_s * 0.9) as u64;
            sj["capacity"] = cap.to_json();
            let mut lost = [None, None];
            for (k, upgrades) in [(0, false), (1, true)] {
                let label = if upgrades {
                    "90%, upgrades back to back"
                } else {
                    "90%, control (no upgrades)"
                };
                match measure(&format!("saturation: {label}"), || {
                    at_rate(
                        addr,
                        plan.workers,
                        plan.scale_senders,
                        rate.max(1),
                        plan.saturation,
                        upgrades,
                    )
                }) {
                    Ok((r, cycles, drops)) => {
                        lost[k] = Some(r.lost);
                        t.row([
                            label.to_string(),
                            thousands(rate),
                            thousands(r.sent),
                            thousands(
                                (r.received as f64 / r.duration.as_secs_f64().max(1e-9)) as u64,
                            ),
                            thousands(r.lost),
                            drops.map_or("-".into(), thousands),
                            thousands(r.duplicated),
                            if upgrades {
                                cycles.len().to_string()
                            } else {
                                "-".into()
                            },
                            if upgrades {
                                dist_ms(&cycles.iter().map(|c| c.wall).collect::<Vec<_>>())
                            } else {
                                "-".into()
                            },
                        ]);
                        sj[if upgrades { "upgrades" } else { "control" }] =
                            json!({"report": r.to_json(), "upgrades": cycles.len()});
                    }
                    Err(e) => {
                        t.row([label.to_string(), format!("failed: {e}")]);
                    }
                }
            }
            if let [Some(c), Some(u)] = lost {
                s.notes.push(format!(
                    "lost with upgrades minus lost in the control row: {} (what the cold start of each new generation \
                     next to the draining one costs; the control row shows what this shared machine loses at this rate \
                     with nothing replaced)",
                    u as i64 - c as i64
                ));
            }
        }
        Err(e) => {
            t.row(["capacity".to_string(), format!("failed: {e}")]);
        }
    }
    s.tables.push(t);
    s.json = sj;
    s
}

// ---------------------------------------------------------------------------------
// Footprint

fn footprint(plan: &Plan, addr: SocketAddr) -> Section {
    let mut s = Section::new(
        "footprint",
        format!(
            "Footprint of the supervisor process ({} workers not included)",
            plan.workers
        ),
    );
    s.intro.push(format!(
        "VmRSS from /proc/PID/status. CPU over the interval: utime + stime from /proc/PID/stat (in {} ms ticks), and \
         the run time of all its threads from /proc/PID/task/*/schedstat (ns), which the percentage uses. \
         Datagrams never pass through the supervisor: the kernel hands them to the workers' sockets.",
        1000 / procfs::clock_ticks()
    ));
    let mut t = Table::new(&[
        "state",
        ">interval",
        ">RSS",
        ">utime + stime",
        ">run time",
        ">CPU (% of one core)",
    ]);
    let r = measure("footprint", || {
        let stage = Stage::new();
        let mut sup = Supervisor::start(&stage.net, stage.config(addr, plan.workers, "random"));
        let pid = sup.pid().expect("running");
        std::thread::sleep(Duration::from_millis(500));
        let idle_meter = CpuMeter::start(pid).expect("read /proc");
        std::thread::sleep(plan.footprint);
        let idle = idle_meter.finish().expect("read /proc");
        let idle_rss = procfs::rss_kib(pid).unwrap_or(0);
        let load_meter = CpuMeter::start(pid).expect("read /proc");
        let load = BackgroundLoad::start(
            &stage.net,
            LoadConfig::new(addr)
                .senders(4)
                .rate(plan.footprint_rate)
                .duration(plan.footprint),
        );
        let mut peak = 0;
        while !load.is_finished() {
            peak = peak.max(procfs::rss_kib(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        let busy = load_meter.finish().expect("read /proc");
        let report = load.finish();
        sup.stop();
        (idle, idle_rss, busy, peak, report)
    });
    match r {
        Ok((idle, idle_rss, busy, peak, report)) => {
            let row = |label: String, rss: u64, used: CpuUse| {
                [
                    label,
                    format!("{:.1} s", used.wall.as_secs_f64()),
                    format!("{} KiB", thousands(rss)),
                    format!("{:.0} ms", used.cpu.as_secs_f64() * 1000.0),
                    format!("{:.1} ms", used.run.as_secs_f64() * 1000.0),
                    format!("{:.2}%", used.percent()),
                ]
            };
            t.row(row("idle".into(), idle_rss, idle));
            t.row(row(
                format!(
                    "under load: {}/s from 4 flows ({} sent, {} lost); peak RSS",
                    thousands(plan.footprint_rate),
                    thousands(report.sent),
                    thousands(report.lost)
                ),
                peak,
                busy,
            ));
            let j = |rss: u64, u: CpuUse| {
                json!({"rss_kib": rss, "utime_stime_ms": u.cpu.as_secs_f64() * 1000.0,
                    "run_ms": u.run.as_secs_f64() * 1000.0, "secs": u.wall.as_secs_f64()})
            };
            s.json = json!({"idle": j(idle_rss, idle), "load": j(peak, busy),
                "load_rate": plan.footprint_rate, "load_report": report.to_json()});
        }
        Err(e) => {
            t.row(["footprint".to_string(), format!("failed: {e}")]);
        }
    }
    s.notes
        .push("CPU during upgrades: see the note under the upgrade timing.".into());
    s.tables.push(t);
    s
}

// ---------------------------------------------------------------------------------
// XDP

/// The service port of the XDP figure, on the server's veth address.
const XDP_PORT: u16 = 5300;

/// The veth pair of the XDP figure, set up for a flood from `client` to `server`.
struct XdpLab {
    server: TestNet,
    client: TestNet,
    ifname: String,
    target: SocketAddr,
    /// The sender's address: the deny rule's prefix.
    source: Ipv4Addr,
    /// The same service port on the server's IPv6 address (fd00:c8:X::1), and the
    /// sender's IPv6 address (fd00:c8:X::2), for the IPv6 sender rows.
    target6: SocketAddr,
    source6: Ipv6Addr,
    /// The sender's CPU and the receiving CPU, when there are two to choose from.
    send_cpu: Option<usize>,
    recv_cpu: Option<usize>,
    /// Whether Receive Packet Steering moved the receive backlog to `recv_cpu`.
    rps: Result<(), String>,
}

impl XdpLab {
    fn new() -> XdpLab {
        let (server, client) = TestNet::pair();
        let veth = server.veth().expect("a veth pair").clone();
        let mac = bench_xdp::mac(&server, &veth.ifname).unwrap_or_else(|e| panic!("{e}"));
        let client_if = client.veth().expect("a veth pair").ifname.clone();
        bench_xdp::permanent_neighbour(&client, &client_if, veth.addr.into(), &mac);
        // IPv6 beside the IPv4 addresses, in a /64 of their own, set up the same way.
        let x = u16::from(veth.addr.octets()[2]);
        let server6 = Ipv6Addr::new(0xfd00, 0xc8, x, 0, 0, 0, 0, 1);
        let client6 = Ipv6Addr::new(0xfd00, 0xc8, x, 0, 0, 0, 0, 2);
        bench_xdp::add_ipv6_nodad(&server, &veth.ifname, server6);
        bench_xdp::add_ipv6_nodad(&client, &client_if, client6);
        bench_xdp::permanent_neighbour(&client, &client_if, server6.into(), &mac);
        let (send_cpu, recv_cpu) = match bench_xdp::allowed_cpus().as_slice() {
            [first, .., last] => (Some(*first), Some(*last)),
            _ => (None, None),
        };
        let rps = match recv_cpu {
            Some(cpu) => bench_xdp::steer_receive_to(&server, &veth.ifname, cpu),
            None => Err("only one CPU to run on".into()),
        };
        XdpLab {
            target: SocketAddr::new(veth.addr.into(), XDP_PORT),
            source: veth.peer_addr,
            target6: SocketAddr::new(server6.into(), XDP_PORT),
            source6: client6,
            ifname: veth.ifname,
            server,
            client,
            send_cpu,
            recv_cpu,
            rps,
        }
    }

    fn flood(&self, duration: Duration) -> Report {
        self.flood_to(self.target, duration)
    }

    fn flood_to(&self, target: SocketAddr, duration: Duration) -> Report {
        bench_xdp::flood(&self.client, target, duration, self.send_cpu).expect("load generator")
    }

    /// Detaches the filter a stopped supervisor left on the veth, so the next run
    /// starts from a bare interface: the link's pin outlives the supervisor by design
    /// (a restart keeps filtering), and removing it detaches the filter. Whether the
    /// interface is bare within 3 s.
    fn detach_filter(&self, pins: &PinDir) -> bool {
        let _ = std::fs::remove_dir_all(pins.path().join(SERVICE).join("xdp"));
        bench_xdp::wait_detached(&self.server, &self.ifname, Duration::from_secs(3))
    }

    /// Busy time of the receiving CPU so far.
    fn recv_busy(&self) -> Option<Duration> {
        self.recv_cpu.and_then(procfs::cpu_busy)
    }
}

/// One way of discarding the flood.
struct DiscardRun {
    /// The sender's report (nothing answers, so only `sent` and `duration` matter).
    report: Report,
    discarded: u64,
    /// Busy time of the receiving CPU over the run, and the wall time that covers.
    recv_busy: Option<(Duration, Duration)>,
    /// XDP: (runs, ns per run) from the program's statistics, or why not.
    program: Option<Result<(u64, f64), String>>,
    /// XDP: the attach mode the status reports.
    mode: Option<String>,
    /// XDP: datagrams the filter let through, and replies that came back (both 0 when
    /// the deny rule holds).
    passed: u64,
    /// User space: drops at the socket's full receive buffer.
    rcvbuf_errors: Option<u64>,
    /// XDP: the filter was gone from the interface after the pin was removed.
    detached: bool,
}

/// Busy time of the receiving CPU between two readings, with the wall time between.
fn busy_over(
    before: Option<Duration>,
    after: Option<Duration>,
    wall: Duration,
) -> Option<(Duration, Duration)> {
    Some((after?.saturating_sub(before?), wall))
}

/// (b) of the figure's baseline: a plain socket and one thread that reads and throws away.
fn discard_in_user_space(lab: &XdpLab, duration: Duration) -> DiscardRun {
    let busy = lab.recv_busy();
    let t = Instant::now();
    let (d, report) =
        bench_xdp::read_and_discard(&lab.server, lab.target, 4 << 20, lab.recv_cpu, || {
            lab.flood(duration)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let recv_busy = busy_over(busy, lab.recv_busy(), t.elapsed());
    DiscardRun {
        report,
        discarded: d.read,
        recv_busy,
        program: None,
        mode: None,
        passed: 0,
        rcvbuf_errors: d.rcvbuf_errors,
        detached: true,
    }
}

/// The XDP filter as the supervisor runs it (`[xdp]` with a deny rule for the sender), in
/// `mode`; counters and cost from `supervisor status --json`.
fn discard_with_xdp(lab: &XdpLab, duration: Duration, mode: &str) -> DiscardRun {
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut cfg = ServiceConfig::echo(1, lab.target, &pins, runtime.path());
    cfg.extra_toml = format!(
        "[xdp]\ninterface = \"{}\"\nmode = \"{mode}\"\ndeny = [\"{}/32\"]\n",
        lab.ifname, lab.source
    );
    let mut sup = Supervisor::start(&lab.server, cfg);
    let xdp_status = |sup: &Supervisor| {
        let v = sup.status_json()["xdp"].clone();
        assert!(v.is_object(), "`status --json` has no xdp section: {v}");
        v
    };
    let stats_fd = bpf::enable_stats();
    let before = xdp_status(&sup);
    let busy = lab.recv_busy();
    let t = Instant::now();
    let report = lab.flood(duration);
    let recv_busy = busy_over(busy, lab.recv_busy(), t.elapsed());
    let after = xdp_status(&sup);
    let stats_fd = stats_fd.map(drop);
    sup.stop();
    let detached = lab.detach_filter(&pins);
    let delta = |v: &dyn Fn(&Value) -> &Value| {
        v(&after)
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(v(&before).as_u64().unwrap_or(0))
    };
    let runs = delta(&|s| &s["run_count"]);
    let ns = delta(&|s| &s["run_time_ns"]);
    let program = Some(match stats_fd {
        Err(e) => Err(format!("BPF_ENABLE_STATS: {e}")),
        Ok(()) if runs == 0 => Err("no runs counted".into()),
        Ok(()) => Ok((runs, ns as f64 / runs as f64)),
    });
    DiscardRun {
        discarded: delta(&|s| &s["counters"]["denied"]),
        passed: delta(&|s| &s["counters"]["passed"]) + report.received,
        report,
        recv_busy,
        program,
        mode: after["mode"].as_str().map(str::to_string),
        rcvbuf_errors: None,
        detached,
    }
}

/// XDP figures: datagrams per second discarded by the XDP filter (through the real
/// supervisor with an `[xdp]` deny rule) versus a user-space reader, over a veth pair,
/// and the filter's cost per packet from the kernel's BPF statistics.
fn xdp(plan: &Plan, addr: SocketAddr) -> Section {
    let secs = plan.xdp;
    let mut s = Section::new(
        "xdp",
        format!(
            "XDP filter: discarding a flood ({:.0} s flat out from one sender over a veth pair)",
            secs.as_secs_f64()
        ),
    );
    // The supervisor must accept `[xdp]` (asked without a daemon, on `lo`).
    {
        let pins = PinDir::new();
        let runtime = TempDir::new("sup-run");
        let mut cfg = service_config(addr, 1, "random", &pins, &runtime);
        // Appended after `[[listen]]`, so it starts a table of its own.
        cfg.extra_toml = "[xdp]\ninterface = \"lo\"".into();
        if let Err(why) = config_accepted(&cfg) {
            let why = format!("the supervisor does not accept `[xdp]` ({why})");
            s.intro.push(format!("Not available: {why}."));
            s.json = json!({"available": false, "why": why});
            return s;
        }
    }
    let lab = match measure(
        "xdp: veth pair, neighbour entry, receive steering",
        XdpLab::new,
    ) {
        Ok(lab) => lab,
        Err(e) => {
            s.intro.push(format!(
                "Not measured: setting up the veth pair failed: {e}."
            ));
            s.json = json!({"available": true, "error": e});
            return s;
        }
    };
    let cpu = |c: Option<usize>| c.map_or_else(|| "any CPU".to_string(), |c| format!("CPU {c}"));
    let (send_cpu, recv_cpu) = (cpu(lab.send_cpu), cpu(lab.recv_cpu));
    s.intro.push(format!(
        "One load-generator socket in the client namespace sends 64-byte datagrams flat out to {} (the server's `{}`), \
         its threads pinned to {send_cpu}; the same sender for every row. Discarded/s counts what was thrown away \
         per second of sending: for user space the datagrams the reader received, for XDP the filter's `denied` counter \
         (`supervisor status --json`, `xdp.counters`). The XDP rows run the real supervisor with `[xdp] interface = \"{}\"`, \
         `deny = [\"{}/32\"]` (the sender) and one echo worker.",
        lab.target, lab.ifname, lab.ifname, lab.source
    ));
    let user_where = match &lab.rps {
        Ok(()) => format!("{recv_cpu}: the reader, pinned, and the kernel's receive path (RPS)"),
        Err(_) => format!("{recv_cpu}: the reader, pinned (receive path: on {send_cpu})"),
    };
    let generic_where = match &lab.rps {
        Ok(()) => format!("{recv_cpu} (RPS)"),
        Err(_) => format!("{send_cpu}, the sender's"),
    };
    let runs: Vec<(String, String, Result<DiscardRun, String>)> = vec![
        (
            "user space: one thread, `recv` and throw away (plain UDP socket, no filter)".into(),
            user_where,
            measure("xdp: discard in user space", || {
                discard_in_user_space(&lab, secs)
            }),
        ),
        (
            "XDP filter, generic mode (`mode = \"generic\"`)".into(),
            generic_where,
            measure("xdp: discard with the filter, generic mode", || {
                discard_with_xdp(&lab, secs, "generic")
            }),
        ),
        (
            "XDP filter, `mode = \"auto\"` (the default)".into(),
            format!("{send_cpu}, the sender's (veth runs native XDP in its NAPI poll there)"),
            measure("xdp: discard with the filter, mode = auto", || {
                discard_with_xdp(&lab, secs, "auto")
            }),
        ),
    ];
    let rps = lab.rps.clone();
    drop(lab);

    let mut t = Table::new(&[
        "discarded by",
        "where it runs",
        ">sent/s",
        ">discarded/s",
        ">not discarded",
        ">receiving CPU busy",
        ">receiving CPU per datagram",
        ">XDP program per packet",
    ]);
    let mut j = Vec::new();
    // Rows whose discarding ran on the receiving CPU, for the summary note.
    struct OnRecvCpu {
        label: String,
        /// ns of the receiving CPU per discarded datagram.
        ns: f64,
        /// Busy percentage of the receiving CPU.
        busy: f64,
        /// Discarded per second of sending.
        rate: f64,
    }
    let mut per_datagram: Vec<OnRecvCpu> = Vec::new();
    for (label, place, run) in runs {
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                t.row([label.clone(), place, format!("failed: {e}")]);
                j.push(json!({"discarded_by": label, "error": e}));
                continue;
            }
        };
        let label = match (&run.mode, label.contains("auto")) {
            (Some(m), true) => format!("{label}: {m} mode"),
            _ => label,
        };
        let d = run.report.duration.as_secs_f64().max(1e-9);
        // The receiving CPU's figures mean something only where the discarding runs on
        // it (not for native XDP on a veth, which runs on the sender's CPU).
        let on_recv_cpu = run.mode.as_deref() != Some("native");
        let (busy, per) = match run.recv_busy {
            Some((busy, wall)) if on_recv_cpu && run.discarded > 0 => {
                let ns = busy.as_nanos() as f64 / run.discarded as f64;
                let pct = busy.as_secs_f64() * 100.0 / wall.as_secs_f64().max(1e-9);
                per_datagram.push(OnRecvCpu {
                    label: label.clone(),
                    ns,
                    busy: pct,
                    rate: run.discarded as f64 / d,
                });
                (format!("{pct:.0}%"), format!("{ns:.0} ns"))
            }
            Some((busy, wall)) => (
                format!("({:.0}%)", busy.as_secs_f64() * 100.0 / wall.as_secs_f64()),
                "-".into(),
            ),
            None => ("-".into(), "-".into()),
        };
        let program = match &run.program {
            None => "-".to_string(),
            Some(Ok((_, ns))) => format!("{ns:.1} ns"),
            Some(Err(e)) => format!("not measured: {e}"),
        };
        t.row([
            label.clone(),
            place,
            thousands((run.report.sent as f64 / d) as u64),
            thousands((run.discarded as f64 / d) as u64),
            thousands(run.report.sent.saturating_sub(run.discarded)),
            busy,
            per,
            program,
        ]);
        if run.passed > 0 {
            s.notes.push(format!(
                "{label}: {} datagrams of the denied sender got past the filter",
                thousands(run.passed)
            ));
        }
        if let Some(drops) = run.rcvbuf_errors.filter(|&d| d > 0) {
            s.notes.push(format!(
                "{label}: of the {} not discarded, {} were dropped by the kernel at the socket's full receive \
                 buffer (4 MiB): the reader could not keep up",
                thousands(run.report.sent.saturating_sub(run.discarded)),
                thousands(drops)
            ));
        }
        if !run.detached {
            s.notes.push(format!(
                "{label}: the filter was still attached 3 s after its pin was removed"
            ));
        }
        j.push(
            json!({"discarded_by": label, "mode": run.mode, "sent": run.report.sent,
            "seconds": d, "discarded": run.discarded, "passed": run.passed,
            "recv_cpu_busy_ns": run.recv_busy.map(|(b, _)| b.as_nanos() as u64),
            "recv_cpu_wall_ns": run.recv_busy.map(|(_, w)| w.as_nanos() as u64),
            "program_runs": run.program.as_ref().and_then(|p| p.as_ref().ok()).map(|p| p.0),
            "program_ns_per_run": run.program.as_ref().and_then(|p| p.as_ref().ok()).map(|p| p.1),
            "rcvbuf_errors": run.rcvbuf_errors}),
        );
    }
    s.tables.push(t);
    let find = |prefix: &str| per_datagram.iter().find(|c| c.label.starts_with(prefix));
    if let (Some(user), Some(filter)) = (find("user"), find("XDP")) {
        s.notes.push(format!(
            "One receiving core: in user space the reader read {}/s with that CPU {:.0}% busy{}; the {} discarded \
             {}/s with it {:.0}% busy. Per datagram discarded the receiving CPU spent {:.0} ns with the filter against \
             {:.0} ns in user space, {:.1} times less: at those costs one core would discard about {}/s with XDP and \
             {}/s in user space.",
            thousands(user.rate as u64),
            user.busy,
            if user.busy >= 85.0 {
                " (saturated; what it could not read was dropped at the full socket buffer, and the kernel's work \
                 on those datagrams counts in its cost)"
            } else {
                ""
            },
            if filter.label.contains("generic") {
                "generic-mode filter"
            } else {
                "filter"
            },
            thousands(filter.rate as u64),
            filter.busy,
            filter.ns,
            user.ns,
            user.ns / filter.ns.max(1e-9),
            thousands((1e9 / filter.ns.max(1e-9)) as u64),
            thousands((1e9 / user.ns.max(1e-9)) as u64),
        ));
    }
    s.notes.push(
        "Receiving CPU busy: user + system + irq + softirq time of that CPU from /proc/stat from the start of \
         sending until the reader or the sender finished (tick-sampled), and that time per datagram discarded. It \
         includes the kernel's receive path, not only the program or the `recv` calls, and anything else that ran \
         there (this machine is shared). In parentheses where the discarding does not run on that CPU."
            .into(),
    );
    s.notes.push(
        "Where the work runs on a veth pair: the sender's transmit delivers each datagram on the sending CPU. \
         Native XDP runs in veth's NAPI poll scheduled there, so it shares the sender's CPU and its \"one core\" cannot \
         be told apart from the sender's; what it can discard is bounded by what one sender can offer. Everything \
         else goes through the receive backlog, which RPS moves to the receiving CPU: the user-space path and a \
         generic-mode filter both run there alone. On a physical NIC, native XDP runs in the driver on the CPU that \
         takes the interrupt."
            .into(),
    );
    s.notes.push(
        "XDP program per packet: `xdp.run_time_ns / xdp.run_count` deltas from `supervisor status --json` while \
         BPF statistics were on (two clock reads per run included). The pinned link outlives `supervisor stop` by \
         design; the benchmark removes its pin directory after each XDP run, which detaches the filter."
            .into(),
    );
    if let Err(why) = &rps {
        s.notes.push(format!(
            "Receive Packet Steering could not be set ({why}): the kernel's receive path ran on the sender's CPU, \
             so the receiving CPU's figures cover only the reader and are not comparable with native XDP's."
        ));
    }
    s.json = json!({"available": true, "seconds": secs.as_secs_f64(), "runs": j});
    s
}

// ---------------------------------------------------------------------------------
// XDP measured where it runs

/// Prefixes of the realistic ruleset: `n` IPv4 /24s in 100.64.0.0/10 and `n` IPv6 /48s
/// in 2001:db8::/32, none of which covers the lab's sender (10.200.x.2).
fn deny_list(n: usize) -> Vec<String> {
    let v4 = (0..n).map(|i| format!("100.{}.{}.0/24", 64 + (i >> 8) % 64, i & 0xff));
    let v6 = (0..n).map(|i| format!("2001:db8:{:x}::/48", i & 0xffff));
    v4.chain(v6).collect()
}

/// One XDP cost row's figures.
struct XdpCostRun {
    sent: u64,
    seconds: f64,
    /// (runs, ns per run) of the program, or why not.
    program: Result<(u64, f64), String>,
    /// CPU time of the work where it runs (the NAPI thread for native, the receiving
    /// CPU for generic and user space), per packet, or why not.
    cpu_ns: Result<f64, String>,
    /// Packets the rules dropped / passed (filter rows).
    verdicts: Option<(u64, u64)>,
}

/// Sum of the run time of `pids` (kernel threads).
fn threads_time(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|&p| procfs::run_time(p)).sum()
}

/// CPU time between two readings per packet, or why not.
fn per_packet(
    before: Option<Duration>,
    after: Option<Duration>,
    packets: u64,
    why: impl FnOnce() -> String,
) -> Result<f64, String> {
    match (before, after) {
        (Some(b), Some(a)) if packets > 0 => {
            Ok(a.saturating_sub(b).as_nanos() as f64 / packets as f64)
        }
        (Some(_), Some(_)) => Err("no packets".into()),
        _ => Err(why()),
    }
}

/// The empty program (`XDP_DROP`) on the receiving veth, natively (in its threaded
/// NAPI, pinned to the receiving CPU) or in generic mode.
fn xdp_empty_row(lab: &XdpLab, d: Duration, native: bool) -> XdpCostRun {
    xdp_floor_row(lab, d, native, None)
}

/// A floor program on the receiving veth: the empty one, or one lookup (see
/// [`bpf::XdpLookupFloor`]), measured like [`xdp_empty_row`].
fn xdp_floor_row(
    lab: &XdpLab,
    d: Duration,
    native: bool,
    lookup: Option<bpf::XdpLookupFloor<'_>>,
) -> XdpCostRun {
    let ifindex = bench_xdp::ifindex(&lab.server, &lab.ifname).unwrap_or_else(|e| panic!("{e}"));
    let (map, program, link, id) = lab
        .server
        .run_in(|| match lookup {
            None => bpf::attach_xdp_floor(ifindex, native).map(|(p, l, id)| (None, p, l, id)),
            Some(floor) => bpf::attach_xdp_lookup_floor(ifindex, native, floor)
                .map(|(m, p, l, id)| (Some(m), p, l, id)),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let recv = lab.recv_cpu.unwrap_or(0);
    let napi = if native {
        bench_xdp::threaded_napi_on(&lab.server, &lab.ifname, recv)
    } else {
        Err("generic mode".into())
    };
    let stats_fd = bpf::enable_stats();
    let before = bpf::prog_stats(id);
    let napi_before = napi.as_ref().ok().and_then(|p| threads_time(p));
    let busy_before = lab.recv_busy();
    let report = lab.flood(d);
    let after = bpf::prog_stats(id);
    let napi_after = napi.as_ref().ok().and_then(|p| threads_time(p));
    let busy_after = lab.recv_busy();
    drop(stats_fd);
    let program_stats = match (before, after) {
        (Ok(b), Ok(a)) => match a.since(&b) {
            (runs, Some(ns)) => Ok((runs, ns)),
            _ => Err("no runs counted".into()),
        },
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let runs = program_stats.as_ref().map_or(0, |p| p.0);
    let cpu_ns = if native {
        per_packet(napi_before, napi_after, runs, || {
            napi.clone()
                .err()
                .unwrap_or_else(|| "NAPI thread time unreadable".into())
        })
    } else {
        per_packet(busy_before, busy_after, runs, || {
            "receiving CPU time unreadable".into()
        })
    };
    drop(link);
    drop(program);
    drop(map);
    XdpCostRun {
        sent: report.sent,
        seconds: report.duration.as_secs_f64(),
        program: program_stats,
        cpu_ns,
        verdicts: None,
    }
}

/// The echo service on `target` behind the filter with the realistic ruleset
/// (`prefixes` deny prefixes per family, a rate limit of 1000/s per source), the
/// sender's address of `target`'s family also denied (its /32 or /128) with
/// `deny_sender`.
fn filter_config(
    lab: &XdpLab,
    target: SocketAddr,
    mode: &str,
    prefixes: usize,
    deny_sender: bool,
    pins: &PinDir,
    runtime: &TempDir,
) -> ServiceConfig {
    let mut cfg = ServiceConfig::echo(1, target, pins, runtime.path());
    let mut deny = deny_list(prefixes);
    if deny_sender {
        deny.push(if target.is_ipv6() {
            format!("{}/128", lab.source6)
        } else {
            format!("{}/32", lab.source)
        });
    }
    let deny: Vec<String> = deny.iter().map(|p| format!("\"{p}\"")).collect();
    cfg.extra_toml = format!(
        "[xdp]\ninterface = \"{}\"\nmode = \"{mode}\"\nrate_limit = {{ packets_per_second = 1000 }}\ndeny = [{}]\n",
        lab.ifname,
        deny.join(", ")
    );
    cfg
}

/// Runs of the program alone per `BPF_PROG_TEST_RUN` call, enough that the kernel's
/// mean is steady (about 0.1 s per call).
const XDP_TEST_RUN_REPEAT: u32 = 2_000_000;

/// The filter's cost per path with nothing but the program running (see
/// [`xdp_program_cost`]): the supervisor's filter as the veth rows run it (the
/// realistic ruleset, the sender denied by its /32 or /128), once per family, on
/// frames that take each path, next to the empty program.
fn xdp_program_alone(
    lab: &XdpLab,
    prefixes: usize,
    round_count: usize,
) -> Result<Vec<xdp_program_cost::PathCost>, String> {
    use xdp_program_cost::{FramePath, udp_frame};
    let next_v4 = Ipv4Addr::from(u32::from(lab.source) + 1);
    let next_v6 = Ipv6Addr::from(u128::from(lab.source6) + 1);
    let path = |label: &str, src: IpAddr, target: SocketAddr| FramePath {
        label: label.into(),
        frame: udp_frame(src, target, 22),
    };
    let families = [
        (
            lab.target,
            vec![
                path(
                    "IPv4, rate-limited (in no prefix)",
                    next_v4.into(),
                    lab.target,
                ),
                path("IPv4, denied by its /32", lab.source.into(), lab.target),
                path(
                    "IPv4, denied by one of the /24s",
                    Ipv4Addr::new(100, 64, 5, 9).into(),
                    lab.target,
                ),
            ],
        ),
        (
            lab.target6,
            vec![
                path(
                    "IPv6, rate-limited (no prefix under its first 16 bits)",
                    "2a02:1::9".parse::<Ipv6Addr>().unwrap().into(),
                    lab.target6,
                ),
                path(
                    "IPv6, rate-limited (next to the denied /128)",
                    next_v6.into(),
                    lab.target6,
                ),
                path("IPv6, denied by its /128", lab.source6.into(), lab.target6),
                path(
                    "IPv6, denied by one of the /48s",
                    "2001:db8:5::9".parse::<Ipv6Addr>().unwrap().into(),
                    lab.target6,
                ),
            ],
        ),
    ];
    let mut costs = Vec::new();
    for (target, paths) in families {
        let pins = PinDir::new();
        let runtime = TempDir::new("sup-run");
        let cfg = filter_config(lab, target, "native", prefixes, true, &pins, &runtime);
        let mut sup = Supervisor::start(&lab.server, cfg);
        let pin = pins
            .path()
            .join(SERVICE)
            .join("xdp")
            .join(&lab.ifname)
            .join("program");
        let measured = aya::programs::ProgramInfo::from_pin(&pin)
            .and_then(|info| info.fd())
            .map_err(|e| format!("the filter program at {}: {e}", pin.display()))
            .and_then(|program| {
                xdp_program_cost::measure(program.as_fd(), &paths, round_count, XDP_TEST_RUN_REPEAT)
            });
        sup.stop();
        lab.detach_filter(&pins);
        costs.extend(measured?);
    }
    Ok(costs)
}

/// The supervisor's filter with the realistic ruleset (`prefixes` deny prefixes per
/// family, a rate limit of 1000/s per source), the sender also denied by its /32 (or
/// /128) when `deny_sender`, else only rate-limited. With `ipv6`, the service listens
/// on the server's IPv6 address and the sender sends from its IPv6 address.
fn xdp_filter_row(
    lab: &XdpLab,
    d: Duration,
    mode: &str,
    prefixes: usize,
    deny_sender: bool,
    ipv6: bool,
) -> XdpCostRun {
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let target = if ipv6 { lab.target6 } else { lab.target };
    let cfg = filter_config(lab, target, mode, prefixes, deny_sender, &pins, &runtime);
    let mut sup = Supervisor::start(&lab.server, cfg);
    let native = sup.status_json()["xdp"]["mode"].as_str() == Some("native");
    let napi = if native {
        bench_xdp::threaded_napi_on(&lab.server, &lab.ifname, lab.recv_cpu.unwrap_or(0))
    } else {
        Err(format!("{mode} mode"))
    };
    let xdp = |sup: &Supervisor| sup.status_json()["xdp"].clone();
    let stats_fd = bpf::enable_stats();
    let before = xdp(&sup);
    let napi_before = napi.as_ref().ok().and_then(|p| threads_time(p));
    let busy_before = lab.recv_busy();
    let report = lab.flood_to(target, d);
    let after = xdp(&sup);
    let napi_after = napi.as_ref().ok().and_then(|p| threads_time(p));
    let busy_after = lab.recv_busy();
    let stats_fd = stats_fd.map(drop);
    sup.stop();
    lab.detach_filter(&pins);
    let delta = |f: &dyn Fn(&Value) -> &Value| {
        f(&after)
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(f(&before).as_u64().unwrap_or(0))
    };
    let runs = delta(&|s| &s["run_count"]);
    let ns = delta(&|s| &s["run_time_ns"]);
    let program = match stats_fd {
        Err(e) => Err(format!("BPF_ENABLE_STATS: {e}")),
        Ok(()) if runs == 0 => Err("no runs counted".into()),
        Ok(()) => Ok((runs, ns as f64 / runs as f64)),
    };
    let dropped = delta(&|s| &s["counters"]["denied"]) + delta(&|s| &s["counters"]["rate_limited"]);
    let passed = delta(&|s| &s["counters"]["passed"]);
    let cpu_ns = if native {
        per_packet(napi_before, napi_after, runs, || {
            napi.err()
                .unwrap_or_else(|| "NAPI thread time unreadable".into())
        })
    } else {
        per_packet(busy_before, busy_after, runs, || {
            "receiving CPU time unreadable".into()
        })
    };
    XdpCostRun {
        sent: report.sent,
        seconds: report.duration.as_secs_f64(),
        program,
        cpu_ns,
        verdicts: Some((dropped, passed)),
    }
}

/// Allowed traffic (echoed, every datagram counted) while `switches` upgrades each
/// switch the filter to another ruleset of `prefixes` deny prefixes per family (the
/// sender never denied, the rate limit far above the rate).
/// Returns the load's report, the upgrades done, the packets the filter dropped
/// meanwhile (its `denied`, `not_allowed`, `rate_limited` and `malformed` counters),
/// and the UDP receive-buffer overflows in the server's and the client's namespaces
/// (a worker's socket, the load generator's): losses neither counted happened
/// elsewhere (the upgrades, the veth).
fn xdp_switches_under_load(
    lab: &XdpLab,
    prefixes: usize,
    switches: u32,
) -> (Report, u32, u64, (Option<u64>, Option<u64>)) {
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let config = |round: u32| {
        let mut cfg = ServiceConfig::echo(1, lab.target, &pins, runtime.path());
        // Each ruleset differs from the last: one more /24 on odd rounds.
        let mut deny = deny_list(prefixes);
        if round % 2 == 1 {
            deny.push("198.51.100.0/24".into());
        }
        let deny: Vec<String> = deny.iter().map(|p| format!("\"{p}\"")).collect();
        cfg.extra_toml = format!(
            "[xdp]\ninterface = \"{}\"\nrate_limit = {{ packets_per_second = 1000000000 }}\ndeny = [{}]\n",
            lab.ifname,
            deny.join(", ")
        );
        cfg
    };
    let mut sup = Supervisor::start(&lab.server, config(0));
    let load = BackgroundLoad::start(&lab.client, LoadConfig::new(lab.target).rate(20_000));
    std::thread::sleep(LEAD_IN);
    let dropped = |sup: &Supervisor| {
        let c = sup.status_json()["xdp"]["counters"].clone();
        ["denied", "not_allowed", "rate_limited", "malformed"]
            .iter()
            .map(|k| c[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let dropped_before = dropped(&sup);
    let overflows = || {
        (
            lab.server.run_in(procfs::udp_rcvbuf_errors),
            lab.client.run_in(procfs::udp_rcvbuf_errors),
        )
    };
    let overflows_before = overflows();
    let mut done = 0;
    for round in 1..=switches {
        sup.set_config(config(round));
        if sup.upgrade().status.success() {
            done += 1;
        }
    }
    std::thread::sleep(LEAD_OUT);
    let report = load.finish();
    let filter_dropped = dropped(&sup).saturating_sub(dropped_before);
    let overflows_after = overflows();
    sup.stop();
    lab.detach_filter(&pins);
    let since = |after: Option<u64>, before: Option<u64>| Some(after?.saturating_sub(before?));
    let overflowed = (
        since(overflows_after.0, overflows_before.0),
        since(overflows_after.1, overflows_before.1),
    );
    (report, done, filter_dropped, overflowed)
}

fn xdp_cost(plan: &Plan) -> Section {
    let d = plan.xdp;
    let prefixes = plan.xdp_prefixes;
    let mut s = Section::new(
        "xdp_cost",
        format!(
            "XDP filter cost where it runs: {} deny prefixes per family, rate limit on, {:.0} s flat out per row and round, {} rounds, over a veth pair",
            thousands(prefixes as u64),
            d.as_secs_f64(),
            plan.cost_rounds
        ),
    );
    let lab = match measure("xdp cost: veth pair", XdpLab::new) {
        Ok(lab) => lab,
        Err(e) => {
            s.intro.push(format!("Not measured: {e}"));
            return s;
        }
    };
    s.intro.push(format!(
        "One sender (64-byte datagrams, pinned to CPU {}) into the server's `{}`. Program cost: `run_time_ns / run_cnt` \
         (BPF_ENABLE_STATS) of the program on the interface; \"above empty\" is against the empty program (`r0 = XDP_DROP; \
         exit`, loaded by the benchmark) in the same mode and round. Every row runs once per round, the rows in \
         alternating order (reversed every other round); figures are the median (min..max) over the rounds, \
         packets/s and CPU per packet the median, dropped / passed the sum. CPU per packet: native rows, the run time of \
         veth's NAPI kernel thread (`threaded = 1`, the `napi/{}-*` thread pinned to CPU {}) per packet the program saw; \
         generic and user-space rows, the busy time of CPU {} (receive steering points there) per packet. The filter \
         rows run the supervisor with `deny` = {} IPv4 /24s and {} IPv6 /48s and `rate_limit = {{ packets_per_second = \
         1000 }}`; the sender is either rate-limited (full path: listener, prefix lookup that misses, rate-limit entry) \
         or denied by one more /32 (prefix lookup that hits); the IPv6 rows do the same from the sender's IPv6 address \
         (fd00:c8:X::2, denied by one more /128) to the service listening on the server's (fd00:c8:X::1).",
        lab.send_cpu.map_or("?".into(), |c| c.to_string()),
        lab.ifname,
        lab.ifname,
        lab.recv_cpu.map_or("?".into(), |c| c.to_string()),
        lab.recv_cpu.map_or("?".into(), |c| c.to_string()),
        thousands(prefixes as u64),
        thousands(prefixes as u64),
    ));
    // Every program row, run in rounds (alternating order, as the selector rows): a
    // row's figure is its median, and "above empty" compares it with the empty
    // program of the same mode in the same round.
    let v4_prefixes: Vec<(u32, [u8; 4])> = deny_list(prefixes)
        .iter()
        .filter_map(|p| {
            let (addr, len) = p.split_once('/')?;
            Some((
                len.parse().ok()?,
                addr.parse::<std::net::Ipv4Addr>().ok()?.octets(),
            ))
        })
        .collect();
    let v4_prefixes = &v4_prefixes;
    type RunRow<'a> = Box<dyn Fn() -> XdpCostRun + 'a>;
    let mut specs: Vec<(&'static str, &'static str, RunRow)> = Vec::new();
    let lab = &lab;
    specs.push((
        "empty program (XDP_DROP)",
        "native",
        Box::new(move || xdp_empty_row(lab, d, true)),
    ));
    use bpf::XdpClock;
    for (what, clock, key_len) in [
        (
            "floor: `bpf_ktime_get_ns` + one LRU hash lookup (20-byte key, hit)",
            Some(XdpClock::Ktime),
            20,
        ),
        ("floor: `bpf_ktime_get_ns` only", Some(XdpClock::Ktime), 0),
        (
            "floor: `bpf_ktime_get_coarse_ns` only",
            Some(XdpClock::Coarse),
            0,
        ),
        (
            "floor: `bpf_jiffies64` only (inlined)",
            Some(XdpClock::Jiffies),
            0,
        ),
        ("floor: one LRU hash lookup (20-byte key, hit)", None, 20),
    ] {
        specs.push((
            what,
            "native",
            Box::new(move || {
                xdp_floor_row(
                    lab,
                    d,
                    true,
                    Some(bpf::XdpLookupFloor::RateEntry { clock, key_len }),
                )
            }),
        ));
    }
    specs.push((
        "floor: one LPM trie lookup (IPv4 /24s above, a miss)",
        "native",
        Box::new(move || {
            xdp_floor_row(
                lab,
                d,
                true,
                Some(bpf::XdpLookupFloor::PrefixTrie {
                    prefixes: v4_prefixes,
                    source: lab.source.octets(),
                }),
            )
        }),
    ));
    for (what, mode, denied, ipv6) in [
        ("filter, sender rate-limited", "native", false, false),
        ("filter, sender denied", "native", true, false),
        ("filter, IPv6 sender rate-limited", "native", false, true),
        ("filter, IPv6 sender denied", "native", true, true),
    ] {
        specs.push((
            what,
            mode,
            Box::new(move || xdp_filter_row(lab, d, mode, prefixes, denied, ipv6)),
        ));
    }
    specs.push((
        "empty program (XDP_DROP)",
        "generic",
        Box::new(move || xdp_empty_row(lab, d, false)),
    ));
    specs.push((
        "filter, sender rate-limited",
        "generic",
        Box::new(move || xdp_filter_row(lab, d, "generic", prefixes, false, false)),
    ));
    let round_count = plan.cost_rounds;
    let mut runs: Vec<Vec<Result<XdpCostRun, String>>> = specs.iter().map(|_| Vec::new()).collect();
    let order: Vec<usize> = (0..specs.len()).collect();
    for round in 0..round_count {
        for i in rounds::alternating(&order, round) {
            let (what, mode, run) = &specs[i];
            runs[i].push(measure(
                &format!(
                    "xdp cost: {what}, {mode} (round {} of {round_count})",
                    round + 1
                ),
                run,
            ));
        }
    }
    let alone = measure("xdp cost: the filter alone (BPF_PROG_TEST_RUN)", || {
        xdp_program_alone(lab, prefixes, round_count)
    })
    .and_then(|r| r);
    let user = measure("xdp cost: user-space discard", || {
        discard_in_user_space(lab, d)
    });
    let switches = if plan.quick { 5 } else { 20 };
    let switched = measure("xdp: ruleset switches under load", || {
        xdp_switches_under_load(lab, prefixes, switches)
    });
    let program_ns = |r: &Result<XdpCostRun, String>| -> Option<f64> {
        r.as_ref().ok()?.program.as_ref().ok().map(|p| p.1)
    };
    let empty_of = |mode: &str| {
        specs
            .iter()
            .position(|(what, m, _)| what.starts_with("empty") && *m == mode)
    };
    let mut t = Table::new(&[
        "program",
        "mode",
        ">packets/s",
        ">program ns per packet",
        ">above empty",
        ">CPU per packet where it runs",
        ">dropped / passed",
    ]);
    let mut j = Vec::new();
    for (i, (what, mode, _)) in specs.iter().enumerate() {
        let ok: Vec<&XdpCostRun> = runs[i].iter().filter_map(|r| r.as_ref().ok()).collect();
        if ok.is_empty() {
            let e = runs[i]
                .iter()
                .find_map(|r| r.as_ref().err())
                .cloned()
                .unwrap_or_default();
            t.row([what.to_string(), mode.to_string(), format!("failed: {e}")]);
            j.push(json!({"program": what, "mode": mode, "error": e}));
            continue;
        }
        let ns: Vec<f64> = runs[i].iter().filter_map(program_ns).collect();
        // Per round, against that round's empty program of the mode.
        let above: Vec<f64> = match empty_of(mode) {
            Some(e) if e != i => runs[i]
                .iter()
                .zip(&runs[e])
                .filter_map(|(r, empty)| Some(program_ns(r)? - program_ns(empty)?))
                .collect(),
            _ => Vec::new(),
        };
        let rates: Vec<f64> = ok
            .iter()
            .map(|run| run.sent as f64 / run.seconds.max(1e-9))
            .collect();
        let cpu: Vec<f64> = ok
            .iter()
            .filter_map(|run| run.cpu_ns.as_ref().ok().copied())
            .collect();
        let verdicts = ok
            .iter()
            .filter_map(|run| run.verdicts)
            .reduce(|a, b| (a.0 + b.0, a.1 + b.1));
        let ns_spread = rounds::Spread::of(&ns);
        let above_spread = rounds::Spread::of(&above);
        t.row([
            what.to_string(),
            mode.to_string(),
            rounds::Spread::of(&rates).map_or("-".into(), |s| thousands(s.median as u64)),
            match (
                ns_spread,
                ok.iter().find_map(|run| run.program.as_ref().err()),
            ) {
                (Some(s), _) => s.cell(false),
                (None, Some(e)) => format!("not measured: {e}"),
                (None, None) => "-".into(),
            },
            above_spread.map_or("-".into(), |s| s.cell(true)),
            match (
                rounds::Spread::of(&cpu),
                ok.iter().find_map(|run| run.cpu_ns.as_ref().err()),
            ) {
                (Some(s), _) => format!("{:.0} ns", s.median),
                (None, Some(e)) => format!("not measured: {e}"),
                (None, None) => "-".into(),
            },
            verdicts.map_or("-".into(), |(dr, p)| {
                format!("{} / {}", thousands(dr), thousands(p))
            }),
        ]);
        j.push(json!({"program": what, "mode": mode,
            "sent": ok.iter().map(|run| run.sent).collect::<Vec<_>>(),
            "seconds": ok.iter().map(|run| run.seconds).collect::<Vec<_>>(),
            "program_ns": ns_spread.map(|s| s.median), "program_ns_rounds": ns,
            "above_empty_ns": above_spread.map(|s| s.median), "above_empty_ns_rounds": above,
            "cpu_ns_per_packet_rounds": cpu, "verdicts": verdicts}));
    }
    drop(specs);
    match &user {
        Ok(run) => {
            let d = run.report.duration.as_secs_f64().max(1e-9);
            let per = match run.recv_busy {
                Some((busy, _)) if run.discarded > 0 => {
                    format!("{:.0} ns", busy.as_nanos() as f64 / run.discarded as f64)
                }
                _ => "-".into(),
            };
            t.row([
                "user space: `recv` and throw away".to_string(),
                "-".into(),
                thousands((run.report.sent as f64 / d) as u64),
                "-".into(),
                "-".into(),
                per,
                format!("read {}", thousands(run.discarded)),
            ]);
        }
        Err(e) => {
            t.row(["user space".to_string(), "-".into(), format!("failed: {e}")]);
        }
    }
    s.tables.push(t);
    let mut alone_json = Vec::new();
    match &alone {
        Ok(costs) => {
            let mut t = Table::new(&[
                "path (the filter alone, BPF_PROG_TEST_RUN)",
                ">filter ns per run",
                ">empty program ns per run",
                ">above empty",
                "action",
            ]);
            for c in costs {
                let cell =
                    |s: Option<rounds::Spread>, signed| s.map_or("-".into(), |s| s.cell(signed));
                t.row([
                    c.label.clone(),
                    cell(c.filter(), false),
                    cell(c.empty(), false),
                    cell(rounds::Spread::of(&c.above()), true),
                    match c.action {
                        1 => "drop".to_string(),
                        2 => "pass".to_string(),
                        other => format!("action {other}"),
                    },
                ]);
                alone_json.push(json!({"path": c.label, "filter_ns_rounds": c.filter_ns,
                    "empty_ns_rounds": c.empty_ns, "above_empty_ns": rounds::Spread::of(&c.above()).map(|s| s.median),
                    "action": c.action}));
            }
            s.tables.push(t);
            s.notes.push(format!(
                "The filter alone: the kernel runs the supervisor's filter program (the ruleset above, the sender \
                 denied by its /32 or /128; one supervisor per family) on one crafted frame {} times per call \
                 (`BPF_PROG_TEST_RUN`), and the empty program on the same frame right after; {} rounds, the paths \
                 in alternating order, median (min..max) of the kernel's mean per run. The frame stays in the cache \
                 and nothing else runs, so this is the program's own work per path; the veth rows above add what \
                 fetching the frame's headers, written by another CPU just before, costs.",
                thousands(u64::from(XDP_TEST_RUN_REPEAT)),
                round_count
            ));
        }
        Err(e) => s
            .notes
            .push(format!("The filter alone (BPF_PROG_TEST_RUN): failed: {e}")),
    }
    match &switched {
        Ok((r, done, filter_dropped, (server_overflows, client_overflows))) => {
            let count = |n: &Option<u64>| n.map_or("?".into(), thousands);
            s.notes.push(format!(
                "Ruleset switches under load: {done} upgrades, each switching the filter to a new ruleset ({} prefixes \
                 per family, one /24 more or less than the last; the sender allowed), while 20 000 datagrams/s were \
                 echoed: {} sent, {} lost, {} duplicated, {} refused; the filter dropped {} of them (its drop counters); \
                 UDP receive-buffer overflows meanwhile: {} in the server's namespace (the worker's socket), {} in the \
                 client's (the load generator's socket, the replies).",
                thousands(prefixes as u64),
                thousands(r.sent),
                thousands(r.lost),
                thousands(r.duplicated),
                thousands(r.refused),
                thousands(*filter_dropped),
                count(server_overflows),
                count(client_overflows),
            ));
            s.json["switches"] = json!({"upgrades": done, "report": r.to_json(), "filter_dropped": filter_dropped,
                "rcvbuf_errors_server": server_overflows, "rcvbuf_errors_client": client_overflows});
        }
        Err(e) => s
            .notes
            .push(format!("Ruleset switches under load: failed: {e}")),
    }
    s.notes.push(
        "The veth floor: native XDP on veth turns every skb the peer transmits into an XDP buffer in the receiving \
         veth's NAPI poll, so the empty program's CPU per packet in that thread is the cost of veth's XDP path itself, \
         not of a program; on a physical NIC the driver hands XDP a buffer it already has. So the rows here compare \
         programs with each other and with the empty one, not XDP with user space as a real NIC would show it."
            .into(),
    );
    s.notes.push(
        "Floor rows: programs of a few raw instructions (loaded by the benchmark) that do one piece of what a filter \
         may do and drop the packet: a clock helper, one LRU hash lookup of a key that is there (20 bytes, like a \
         source address key), one LPM trie lookup of the sender in a trie of the IPv4 prefixes above. They say what \
         each piece costs here on its own; what the filter does per path: docs/xdp-cost.md."
            .into(),
    );
    s.notes.push(
        "Target (issue 15): the filter at most 30 ns above the empty program with this ruleset."
            .into(),
    );
    let switches_json = s.json["switches"].take();
    s.json = json!({"prefixes_per_family": prefixes, "rows": j, "alone": alone_json, "switches": switches_json});
    s
}
