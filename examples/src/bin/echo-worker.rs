//! echo-worker: the reference worker for the supervisor.
//!
//! It answers every datagram with the datagram itself plus an 8-byte trailer
//! naming who answered (generation, worker, socket; see
//! `supervisor_examples::echo`), so tests can follow every datagram through
//! an upgrade. It shows the whole worker life cycle on worker-sdk:
//!
//! 1. catch the drain signal — first, so that from here on the signal can no
//!    longer kill us with datagrams still queued;
//! 2. take every inherited socket (or bind one with `--bind` when run by hand);
//! 3. serve each socket on its own thread, say `READY=1`;
//! 4. on the drain signal, keep serving until every socket has been idle for
//!    the read deadline, then report and exit 0.
//!
//! It is meant to be fast enough to benchmark the supervisor with: buffers
//! are reused, nothing is allocated, logged or locked per datagram.

#![deny(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use supervisor_examples::echo::{TRAILER_LEN, Trailer};
use worker_sdk::{DrainSignal, Listeners, MAX_DATAGRAM, NamedSocket, Served};

/// How often the main thread reports counts with `STATUS=` (and, with
/// `--verbose`, on stderr). Occasional on purpose: status is for humans.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// How often the main thread looks at the drain flag and the serving threads.
/// Short, because the exit waits for the tick that sees the last thread done:
/// it is part of every upgrade cycle.
const TICK: Duration = Duration::from_millis(10);

#[derive(Parser, Debug)]
#[command(
    name = "echo-worker",
    about = "Echoes UDP datagrams with a trailer naming the generation, worker and socket that answered."
)]
struct Args {
    /// Address to bind when not socket-activated (run by hand).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5300")]
    bind: SocketAddr,

    /// Signal that starts draining, e.g. SIGTERM or SIGUSR2.
    /// [default: $SUPERVISOR_DRAIN_SIGNAL if set, else SIGTERM]
    #[arg(long, value_name = "SIGNAL")]
    drain_signal: Option<String>,

    /// While draining, a socket idle for this long is done.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    read_deadline_ms: u64,

    /// Report sockets, status and drain progress on stderr.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("echo-worker: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// One serving thread's count, written only by that thread and read by the
/// main thread for status. Aligned to a cache line so that threads counting
/// side by side do not slow each other down (false sharing).
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

fn run(args: &Args) -> Result<(), String> {
    // 1. The drain signal, before anything can make us look ready.
    let signal_name = args
        .drain_signal
        .clone()
        .or_else(|| std::env::var("SUPERVISOR_DRAIN_SIGNAL").ok())
        .unwrap_or_else(|| "SIGTERM".to_owned());
    let drain = DrainSignal::install_named(&signal_name).map_err(|e| e.to_string())?;

    // 2. The sockets. `from_env` runs while we are still single-threaded, so
    // it can clean LISTEN_* out of the environment.
    let mut listeners = Listeners::from_env().map_err(|e| e.to_string())?;
    let activated = listeners.is_activated();
    let sockets: Vec<NamedSocket> = if activated {
        listeners.take_all_udp().map_err(|e| e.to_string())?
    } else {
        let socket = listeners
            .udp_or_bind("echo", args.bind)
            .map_err(|e| e.to_string())?;
        socket
            .into_iter()
            .map(|socket| NamedSocket {
                name: "echo".to_owned(),
                index: 0,
                socket,
            })
            .collect()
    };
    if sockets.is_empty() {
        return Err("socket-activated with no sockets (LISTEN_FDS=0): nothing to serve".to_owned());
    }

    let generation = worker_sdk::generation().unwrap_or(0);
    let worker = worker_sdk::worker_index().unwrap_or(0);
    let who = format!("echo-worker gen={generation} worker={worker}");
    let read_deadline = Duration::from_millis(args.read_deadline_ms);
    if args.verbose {
        let origin = if activated {
            "inherited"
        } else {
            "bound by hand"
        };
        for s in &sockets {
            let addr = s
                .socket
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string());
            eprintln!(
                "{who}: serving {}[{}] on {addr} ({origin})",
                s.name, s.index
            );
        }
        eprintln!("{who}: drain on {signal_name}, read deadline {read_deadline:?}");
    }

    // 3. Serve. The trailer's worker and socket fields are u16 on the wire.
    let worker16 = u16::try_from(worker).unwrap_or(u16::MAX);
    let counters: Vec<Counter> = sockets.iter().map(|_| Counter::default()).collect();
    let results: Vec<std::io::Result<Served>> = thread::scope(|scope| {
        let mut threads = Vec::with_capacity(sockets.len());
        for (s, counter) in sockets.iter().zip(&counters) {
            let trailer = Trailer {
                generation,
                worker: worker16,
                socket: u16::try_from(s.index).unwrap_or(u16::MAX),
            };
            let drain = &drain;
            let spawned = thread::Builder::new()
                .name(format!("echo-{}-{}", s.name, s.index))
                .spawn_scoped(scope, move || {
                    serve(&s.socket, drain, read_deadline, trailer, counter)
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    // Stop the threads already started; the scope joins them.
                    drain.request();
                    eprintln!("{who}: error: starting a serving thread: {e}");
                    break;
                }
            }
        }

        // Every socket is taken and served: ready. (If a thread could not
        // start, draining is already under way and we say nothing.)
        if threads.len() == sockets.len()
            && let Err(e) = worker_sdk::notify_ready()
        {
            // The supervisor would wait for READY=1 in vain; better to
            // stop now and let it see us exit.
            eprintln!("{who}: error: {e}");
            drain.request();
        }

        supervise(&who, &drain, &counters, args.verbose, || {
            threads.iter().all(|t| t.is_finished())
        });
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("serving thread panicked")))
            })
            .collect()
    });

    // 4. Report.
    let mut total = Served::default();
    let mut failed = false;
    for (s, result) in sockets.iter().zip(&results) {
        match result {
            Ok(served) => total += *served,
            Err(e) => {
                eprintln!("{who}: error: serving {}[{}]: {e}", s.name, s.index);
                failed = true;
            }
        }
    }
    if failed || results.len() != sockets.len() {
        return Err(format!(
            "{who} stopped after an error; served {} datagrams",
            total.datagrams
        ));
    }
    eprintln!("{who} drained: served {} datagrams", total.datagrams);
    if args.verbose {
        eprintln!(
            "{who}: {} of them after the drain signal",
            total.after_drain
        );
    }
    Ok(())
}

/// One socket's serving loop: echo with the trailer, count.
fn serve(
    socket: &UdpSocket,
    drain: &DrainSignal,
    read_deadline: Duration,
    trailer: Trailer,
    counter: &Counter,
) -> std::io::Result<Served> {
    let trailer = trailer.to_bytes();
    // Allocated once: request plus trailer always fits.
    let mut reply = Vec::with_capacity(MAX_DATAGRAM + TRAILER_LEN);
    let mut count = 0u64;
    worker_sdk::serve_until_drained(socket, drain, read_deadline, |socket, request, peer| {
        reply.clear();
        reply.extend_from_slice(request);
        reply.extend_from_slice(&trailer);
        // A failed send concerns one peer (gone, or our send buffer full);
        // like a datagram lost on the way, it does not stop the service.
        let _ = socket.send_to(&reply, peer);
        count += 1;
        // Only this thread writes the counter, so a plain store of our own
        // count is enough; no read-modify-write (fetch_add) needed.
        counter.0.store(count, Ordering::Relaxed);
    })
}

/// The main thread's job while the sockets are served: periodic `STATUS=`,
/// and `STOPPING=1` once draining starts. Returns when `all_done()`.
fn supervise(
    who: &str,
    drain: &DrainSignal,
    counters: &[Counter],
    verbose: bool,
    all_done: impl Fn() -> bool,
) {
    let total = || {
        counters
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let sockets = counters.len();
    let mut last_status = Instant::now();
    let mut stopping = false;
    while !all_done() {
        thread::sleep(TICK);
        if drain.requested() && !stopping {
            stopping = true;
            // Notify errors are not fatal here: we are on our way out anyway.
            let _ = worker_sdk::notify_stopping();
            let _ = worker_sdk::notify_status(&format!(
                "draining {sockets} sockets, {} datagrams served",
                total()
            ));
            if verbose {
                eprintln!("{who}: drain requested; serving until idle");
            }
        }
        if !stopping && last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            let status = format!("serving {sockets} sockets, {} datagrams served", total());
            let _ = worker_sdk::notify_status(&status);
            if verbose {
                eprintln!("{who}: {status}");
            }
        }
    }
}
