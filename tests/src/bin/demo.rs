//! `demo`: the supervisor's main job in about ten seconds.
//!
//! Starts the supervisor with the echo example on 127.0.0.1:5300 inside a private
//! network namespace (so it can neither disturb nor be disturbed by anything on the
//! machine), sends numbered datagrams from one client socket at a fixed rate, upgrades
//! the service while they flow, and shows what happened to every datagram. Cleans up
//! everything it created (namespace, processes, eBPF pins, temporary files), also on
//! Ctrl-C. Draws the replies per 10 ms per generation across the upgrade in
//! `target/demo/upgrade.svg` (or `--svg-dir`).
//!
//! Run by `scripts/demo.sh` (which builds it), as root; it finds the `supervisor` and
//! `echo-worker` binaries next to itself.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use supervisor_tests::bench::phases::{self, Phase, UpgradeTiming};
use supervisor_tests::bench::plot::{self, Mark, MarkKind};
use supervisor_tests::bench::{cleanup, table::thousands};
use supervisor_tests::supervisor::CLI_TIMEOUT;
use supervisor_tests::{
    BackgroundLoad, Balance, LoadConfig, PinDir, Report, ServiceConfig, Supervisor, TempDir,
    TestNet, output_with_timeout,
};

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Zero-downtime upgrade of a UDP echo service under traffic, in a private network namespace (run as root)."
)]
struct Args {
    /// Worker processes per generation.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    workers: u32,
    /// Datagrams per second sent by the one client socket.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// How long the client sends, in seconds.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// When to start the upgrade, in seconds after the traffic started.
    #[arg(long, default_value_t = 2.0)]
    upgrade_at: f64,
    /// How the selector spreads datagrams over the workers: random, hash or flow.
    #[arg(long, default_value = "random")]
    balance: String,
    /// Where to write the picture (upgrade.svg) [default: target/demo, next to the
    /// build this binary belongs to].
    #[arg(long, value_name = "DIR")]
    svg_dir: Option<PathBuf>,
}

const ADDR: &str = "127.0.0.1:5300";

fn main() -> ExitCode {
    cleanup::install_signal_cleanup("demo");
    let args = Args::parse();
    let balance = match args.balance.as_str() {
        "random" => Balance::Random,
        "hash" => Balance::Hash,
        "flow" => Balance::Flow,
        other => {
            eprintln!("demo: error: unknown balance mode {other:?} (random, hash or flow)");
            return ExitCode::from(2);
        }
    };
    if !(args.seconds > 0.0 && args.upgrade_at >= 0.0 && args.upgrade_at < args.seconds) {
        eprintln!("demo: error: need 0 <= --upgrade-at < --seconds");
        return ExitCode::from(2);
    }
    if args.rate == 0 {
        eprintln!("demo: error: --rate must be positive");
        return ExitCode::from(2);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "demo: error: run as root (it creates a network namespace, loads eBPF programs and pins them): sudo ./scripts/demo.sh"
        );
        return ExitCode::from(2);
    }
    // A panic unwinds through the harness' drops (namespace, pins, processes); whatever
    // might still be left is swept up by name afterwards.
    let result = std::panic::catch_unwind(|| run(&args, balance));
    let left = cleanup::remove_own_leftovers();
    for l in &left {
        eprintln!("demo: cleanup: {l}");
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(_) => {
            eprintln!("demo: failed (see the message above); everything it created was removed");
            ExitCode::from(1)
        }
    }
}

/// The whole demo; true when the upgrade succeeded and nothing was lost.
fn run(args: &Args, balance: Balance) -> bool {
    let started = Instant::now();
    let addr: SocketAddr = ADDR.parse().expect("valid address");
    let upgrade_at = Duration::from_secs_f64(args.upgrade_at);
    let traffic = Duration::from_secs_f64(args.seconds);

    println!("udp-supervisor demo");
    println!("===================");
    println!(
        "A UDP echo service with {} worker processes listens on {ADDR}. One client sends {} numbered\n\
         datagrams per second for {:.0} s; after {:.0} s the service is upgraded to a new generation of workers\n\
         while the datagrams keep coming. Every reply says which generation and worker answered it,\n\
         so we can check that every datagram was answered exactly once.\n\
         Everything runs in a private network namespace and is removed at the end.",
        args.workers,
        thousands(args.rate),
        args.seconds,
        args.upgrade_at
    );

    // 1. The service.
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let config = ServiceConfig::echo(args.workers, addr, &pins, runtime.path()).balance(balance);
    section(
        1,
        "the configuration (built in; paths are this run's private directories)",
    );
    for line in config.to_toml().lines() {
        println!("    {line}");
    }
    section(2, "starting the supervisor");
    let mut sup = Supervisor::start(&net, config);
    let status = sup.status_json();
    let first = sup.serving_generation();
    let pids = supervisor_tests::supervisor::worker_pids(&status, first);
    println!(
        "    supervisor pid {}; generation {first} serving with {} workers (pids {})",
        sup.pid().unwrap_or(0),
        pids.len(),
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "    eBPF selector pinned under {}",
        pins.path().join("echo").display()
    );

    // 2. Traffic, and the upgrade in the middle of it.
    section(
        3,
        &format!(
            "sending {} datagrams/s from one client socket for {:.0} s",
            thousands(args.rate),
            args.seconds
        ),
    );
    let load_started = Instant::now();
    let load = BackgroundLoad::start(
        &net,
        LoadConfig::new(addr)
            .senders(1)
            .rate(args.rate)
            .duration(traffic)
            // The sending time, the wait for the last replies, and some slack.
            .timeline(traffic + Duration::from_secs(5)),
    );
    std::thread::sleep(upgrade_at.saturating_sub(load_started.elapsed()));
    section(
        4,
        &format!(
            "t = {:.1} s: `supervisor upgrade` (its phase lines, as they happen)",
            load_started.elapsed().as_secs_f64()
        ),
    );
    let upgrade_started = Instant::now();
    let (upgrade_ok, phase_lines) = upgrade_live(&sup);
    let upgrade_wall = upgrade_started.elapsed();

    // Let the traffic run its course, then collect every reply.
    while !load.is_finished() && load_started.elapsed() < traffic + Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = load.finish();

    // 3. What happened.
    section(5, "what happened to every datagram");
    let no_loss = summary(&report);
    let timing = phases::timing(&phase_lines);
    println!();
    println!("    upgrade timing (measured by the supervisor from the upgrade request):");
    match timing.flip {
        Some(t) => println!(
            "      request -> flip:                {:>7.1} ms  (new workers started and said READY=1; from here new datagrams go to them)",
            ms(t)
        ),
        None => println!("      request -> flip:                not reached"),
    }
    match (timing.flip, timing.gone) {
        (Some(f), Some(g)) => {
            println!(
                "      flip -> old generation gone:    {:>7.1} ms  (old workers emptied their queues and exited; their sockets were closed)",
                ms(g.saturating_sub(f))
            );
            println!(
                "      request -> old generation gone: {:>7.1} ms  (`supervisor upgrade` returned after {:.1} ms)",
                ms(g),
                ms(upgrade_wall)
            );
        }
        _ => println!("      old generation gone:            not reported"),
    }

    let dir = args
        .svg_dir
        .clone()
        .unwrap_or_else(|| plot::default_dir("demo"));
    match picture(&dir, &report, upgrade_started, timing, args) {
        Ok(path) => {
            println!();
            println!(
                "    picture: {} (replies per 10 ms per generation; upgrade request, flip and old generation gone marked)",
                path.display()
            );
        }
        Err(e) => println!("    (no picture: {e})"),
    }

    section(6, "`supervisor status` after the upgrade");
    let out = output_with_timeout(&mut sup.cli(&["status"]), CLI_TIMEOUT);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    if !out.status.success() {
        println!(
            "    (status failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    section(7, "stopping");
    let stop_started = Instant::now();
    let exit = sup.stop();
    println!(
        "    supervisor drained its workers and exited ({exit}) in {:.0} ms",
        ms(stop_started.elapsed())
    );
    let pins_left = pins.entries().len();
    println!(
        "    pins left behind by the supervisor: {pins_left}; removing the namespace, pin and runtime directories"
    );
    drop(sup);
    drop(runtime);
    drop(pins);
    drop(net);

    let verdict = upgrade_ok && no_loss;
    println!();
    if verdict {
        println!(
            "Result: upgraded from generation {first} to {} under {} datagrams/s, every datagram answered exactly once. ({:.1} s in all)",
            first + 1,
            thousands(args.rate),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "Result: NOT clean: {}{}. ({:.1} s in all)",
            if upgrade_ok {
                ""
            } else {
                "the upgrade failed; "
            },
            if no_loss {
                "no datagram lost"
            } else {
                "datagrams were lost or doubled, see above"
            },
            started.elapsed().as_secs_f64()
        );
    }
    verdict
}

/// Draws `upgrade.svg` in `dir`: replies per 10 ms per generation, with the request,
/// the flip and the end of the old generation (the daemon counts the phase times from
/// when it received the request, a fraction of a millisecond after `requested`).
fn picture(
    dir: &std::path::Path,
    report: &Report,
    requested: Instant,
    timing: UpgradeTiming,
    args: &Args,
) -> Result<PathBuf, String> {
    let timeline = report.timeline.as_ref().ok_or("no time series recorded")?;
    let at = timeline
        .secs_at(requested)
        .ok_or("the time series has no start")?;
    let mut marks = vec![Mark {
        secs: at,
        kind: MarkKind::Request,
    }];
    for (t, kind) in [(timing.flip, MarkKind::Flip), (timing.gone, MarkKind::Gone)] {
        if let Some(t) = t {
            marks.push(Mark {
                secs: at + t.as_secs_f64(),
                kind,
            });
        }
    }
    let path = dir.join("upgrade.svg");
    plot::replies_over_time(
        &path,
        &format!(
            "demo: one client, {} datagrams/s, {} workers, balance = {}, one upgrade",
            thousands(args.rate),
            args.workers,
            args.balance
        ),
        timeline,
        &marks,
        Some(zoom(&marks)),
    )?;
    Ok(path)
}

/// The window around the upgrade: from a little before the request to a little
/// after the old generation was gone (or the flip, if that is the last mark).
fn zoom(marks: &[Mark]) -> (f64, f64) {
    let first = marks.iter().map(|m| m.secs).fold(f64::INFINITY, f64::min);
    let last = marks
        .iter()
        .map(|m| m.secs)
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((last - first) * 0.25).max(0.05);
    (first - pad, last + pad)
}

fn section(n: u32, title: &str) {
    println!();
    println!("[{n}] {title}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `supervisor upgrade --wait drained` (the whole cycle, flip and drain,
/// so the demo can show both), printing its lines as they arrive. Returns whether
/// it exited 0, and the phase lines.
fn upgrade_live(sup: &Supervisor<'_>) -> (bool, Vec<Phase>) {
    let mut child = sup
        .cli(&["upgrade", "--wait", "drained"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn `supervisor upgrade`");
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let readers = [
        child
            .stdout
            .take()
            .map(|s| (false, Box::new(s) as Box<dyn std::io::Read + Send>)),
        child
            .stderr
            .take()
            .map(|s| (true, Box::new(s) as Box<dyn std::io::Read + Send>)),
    ];
    for (is_err, stream) in readers.into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send((is_err, line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    // Bounded like the harness' upgrade: ready and drain timeouts plus slack.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut phase_lines = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((false, line)) => {
                println!("    {line}");
                phase_lines.extend(phases::parse_line(&line));
            }
            Ok((true, line)) => {
                // The CLI's own errors; the daemon's log lines are not interesting here.
                if line.starts_with("error:") {
                    println!("    {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!("    (no answer within 60 s; giving up on the upgrade)");
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait for `supervisor upgrade`");
    (status.success(), phase_lines)
}

/// Prints the counts and the per-worker table; true when nothing was lost or doubled.
fn summary(r: &Report) -> bool {
    println!(
        "    sent {}   received {}   lost {}   duplicated {}{}",
        thousands(r.sent),
        thousands(r.received),
        thousands(r.lost),
        thousands(r.duplicated),
        if r.malformed > 0 {
            format!("   malformed {}", thousands(r.malformed))
        } else {
            String::new()
        }
    );
    println!(
        "    (received = datagrams answered at least once; lost = sent, never answered; duplicated = answered twice)"
    );
    println!();
    println!("    replies per worker (each generation has its own worker processes):");
    let gens: BTreeSet<u32> = r.per_worker.keys().map(|(g, _)| *g).collect();
    let workers: BTreeSet<u16> = r.per_worker.keys().map(|(_, w)| *w).collect();
    let mut header = format!("    {:<14}", "");
    for w in &workers {
        header += &format!("{:>11}", format!("worker {w}"));
    }
    header += &format!("{:>11}", "total");
    println!("{header}");
    let total = r.total_replies().max(1);
    for g in &gens {
        let mut line = format!("    {:<14}", format!("generation {g}"));
        let mut sum = 0;
        for w in &workers {
            let n = r.per_worker.get(&(*g, *w)).copied().unwrap_or(0);
            sum += n;
            line += &format!("{:>11}", thousands(n));
        }
        line += &format!(
            "{:>11}   ({:.1}% of all replies)",
            thousands(sum),
            sum as f64 * 100.0 / total as f64
        );
        println!("{line}");
    }
    let clean = r.lost == 0 && r.duplicated == 0 && r.malformed == 0 && r.sent > 0;
    println!();
    if clean {
        println!(
            "    every one of the {} datagrams was answered exactly once, across the upgrade.",
            thousands(r.sent)
        );
    } else {
        println!(
            "    {} of {} datagrams were not answered, {} were answered twice.",
            thousands(r.lost),
            thousands(r.sent),
            thousands(r.duplicated)
        );
    }
    clean
}
