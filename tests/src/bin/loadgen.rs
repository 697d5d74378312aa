//! Command-line front end of the test load generator.
//!
//! Sends sequence-numbered UDP datagrams to an echo service and reports how many were
//! answered, by whom (generation/worker from the echo trailer), and what was lost or
//! duplicated. Only point it at services you run on this machine.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use supervisor_tests::loadgen::{LoadConfig, run};

#[derive(Parser, Debug)]
#[command(
    about = "UDP echo load generator (sendmmsg/recvmmsg, counts replies per sequence number)"
)]
struct Args {
    /// Target address, e.g. 127.0.0.1:5300.
    #[arg(long)]
    target: SocketAddr,
    /// Number of sending sockets (flows).
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Total datagrams over all senders.
    #[arg(long)]
    count: Option<u64>,
    /// Send for this long (e.g. 10s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Total datagrams per second; omit to send as fast as possible.
    #[arg(long)]
    rate: Option<u64>,
    /// Request size in bytes (at least 8).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Largest sendmmsg batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Wait this long for late replies after the last send.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Receive buffer per sending socket, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    recv_buffer: usize,
    /// Run inside the named network namespace (/run/netns/NAME).
    #[arg(long)]
    netns: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.count.is_none() && a.duration.is_none() {
        eprintln!("error: give --count or --duration (a run must be bounded)");
        return ExitCode::from(2);
    }
    if let Some(name) = &a.netns {
        let path = format!("/run/netns/{name}");
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: open {path}: {e}");
                return ExitCode::from(2);
            }
        };
        // Before any socket exists, so all of them are created in the namespace.
        if let Err(e) = nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("error: setns {path}: {e}");
            return ExitCode::from(2);
        }
    }
    let mut cfg = LoadConfig::new(a.target)
        .senders(a.senders)
        .payload_size(a.size)
        .max_batch(a.batch)
        .grace(a.grace)
        .recv_buffer(a.recv_buffer);
    cfg.count = a.count;
    cfg.duration = a.duration;
    cfg.rate = a.rate;
    match run(&cfg) {
        Ok(report) => {
            if a.json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
