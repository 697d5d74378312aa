//! drain-worker: a worker that only receives. It drains every inherited socket
//! with `recvmmsg` (up to 64 datagrams per call) and answers nothing.
//!
//! The benchmark's selector-cost rows use it as their one receiver: with no
//! replies, the receiving side costs the same in every row and nothing else
//! competes with the sender for the CPU the selector runs on.
//!
//! Life cycle as echo-worker's (worker-contract.md): drain signal first, take
//! the sockets, `READY=1`; on the drain signal, receive until every socket has
//! been idle for the read deadline, then exit 0.

#![deny(unsafe_code)]

use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::socket::{MsgFlags, MultiHeaders, recvmmsg};
use worker_sdk::{DrainSignal, Listeners, NamedSocket};

/// Datagrams per `recvmmsg`.
const BATCH: usize = 64;
/// Room per datagram: the benchmark's requests are small; longer ones are truncated.
const SLOT: usize = 2048;
/// How often a receiving thread looks at the drain flag when nothing arrives.
const POLL: Duration = Duration::from_millis(20);

#[derive(Parser, Debug)]
#[command(
    name = "drain-worker",
    about = "Receives UDP datagrams on its inherited sockets with recvmmsg and answers nothing."
)]
struct Args {
    /// Signal that starts draining. [default: $SUPERVISOR_DRAIN_SIGNAL if set, else SIGTERM]
    #[arg(long, value_name = "SIGNAL")]
    drain_signal: Option<String>,

    /// While draining, a socket idle for this long is done.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    read_deadline_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(total) => {
            eprintln!("drain-worker: received {total} datagrams");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("drain-worker: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<u64, String> {
    let signal_name = args
        .drain_signal
        .clone()
        .or_else(|| std::env::var("SUPERVISOR_DRAIN_SIGNAL").ok())
        .unwrap_or_else(|| "SIGTERM".to_owned());
    let drain = DrainSignal::install_named(&signal_name).map_err(|e| e.to_string())?;
    let mut listeners = Listeners::from_env().map_err(|e| e.to_string())?;
    let sockets: Vec<NamedSocket> = listeners.take_all_udp().map_err(|e| e.to_string())?;
    if sockets.is_empty() {
        return Err("no inherited sockets (run it under the supervisor)".to_owned());
    }
    for s in &sockets {
        s.socket
            .set_read_timeout(Some(POLL))
            .map_err(|e| format!("SO_RCVTIMEO on {}[{}]: {e}", s.name, s.index))?;
    }
    let deadline = Duration::from_millis(args.read_deadline_ms);
    let received = AtomicU64::new(0);
    thread::scope(|scope| {
        let threads: Vec<_> = sockets
            .iter()
            .map(|s| {
                let (drain, received) = (&drain, &received);
                scope.spawn(move || {
                    let n = receive_until_drained(&s.socket, drain, deadline);
                    received.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        if let Err(e) = worker_sdk::notify_ready() {
            eprintln!("drain-worker: error: {e}");
            drain.request();
        }
        for t in threads {
            let _ = t.join();
        }
    });
    Ok(received.load(Ordering::Relaxed))
}

/// Receives in batches until draining was requested and the socket has then been
/// idle for `deadline`. Returns the datagrams received.
fn receive_until_drained(socket: &UdpSocket, drain: &DrainSignal, deadline: Duration) -> u64 {
    let mut buf = vec![0u8; BATCH * SLOT];
    let mut headers = MultiHeaders::<()>::preallocate(BATCH, None);
    let mut total = 0u64;
    let mut last = Instant::now();
    loop {
        let mut slots = buf.chunks_exact_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(slots.next().expect("buf has BATCH slots"))]);
        let got = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map(|r| r.count())
        .unwrap_or(0);
        if got > 0 {
            total += got as u64;
            last = Instant::now();
        } else if drain.requested() && last.elapsed() >= deadline {
            return total;
        }
    }
}
