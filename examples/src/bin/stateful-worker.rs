//! A stateful UDP worker: it keeps a counter per client (remote address and
//! port), the way a QUIC server keeps connections or a game server sessions. If a
//! client's datagrams ever reach another worker, that worker starts the client's
//! counter at 1 again and the client sees its state reset: the tests use it to
//! prove that `balance = "flow"` and `balance = "cookie"` keep clients where they
//! started, across upgrades.
//!
//! Protocol (all integers little-endian unless said otherwise):
//! - request: at least 16 bytes: `cookie: u16` big-endian (0 = none; at
//!   `cookie_offset = 0` of the listener), 6 reserved bytes, `sequence: u64`.
//! - reply: the 16 request bytes, then the echo trailer (`generation: u32`,
//!   `worker: u16`, `socket: u16`), then `count: u64` (datagrams this worker has
//!   had from this client, this one included), then `cookie: u16` big-endian of
//!   the socket that received it (from `SUPERVISOR_COOKIES`; 0 if none), which a
//!   cookie-mode client puts into its next requests.

#![deny(unsafe_code)]

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    process::ExitCode,
    sync::Mutex,
    thread,
    time::Duration,
};

use clap::Parser;
use supervisor_examples::echo::Trailer;
use worker_sdk::{DrainSignal, Listeners, NamedSocket};

/// Bytes of a request this worker reads; shorter requests are ignored.
pub const REQUEST_LEN: usize = 16;

#[derive(Parser, Debug)]
#[command(
    name = "stateful-worker",
    about = "Answers each client with its own running count."
)]
struct Args {
    /// Address to bind when not socket-activated.
    #[arg(long, default_value = "127.0.0.1:5300")]
    bind: SocketAddr,
    /// How long to keep reading after the drain signal when nothing arrives.
    #[arg(long, default_value_t = 200)]
    read_deadline_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("stateful-worker: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let signal = std::env::var("SUPERVISOR_DRAIN_SIGNAL").unwrap_or_else(|_| "SIGTERM".into());
    let drain = DrainSignal::install_named(&signal).map_err(|e| e.to_string())?;
    let mut listeners = Listeners::from_env().map_err(|e| e.to_string())?;
    let sockets: Vec<NamedSocket> = if listeners.is_activated() {
        listeners.take_all_udp().map_err(|e| e.to_string())?
    } else {
        listeners
            .udp_or_bind("stateful", args.bind)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|socket| NamedSocket {
                name: "stateful".into(),
                index: 0,
                socket,
            })
            .collect()
    };
    // One cookie per inherited fd, in fd order; sockets were taken in fd order.
    let cookies = worker_sdk::cookies().unwrap_or_default();
    let generation = worker_sdk::generation().unwrap_or(0);
    let worker = worker_sdk::worker_index().unwrap_or(0) as u16;
    // All sockets of this worker share the client table: a client is this
    // worker's, whichever of its sockets the datagram came in on.
    let clients: Mutex<HashMap<SocketAddr, u64>> = Mutex::new(HashMap::new());
    let deadline = Duration::from_millis(args.read_deadline_ms);

    thread::scope(|scope| {
        for (position, named) in sockets.iter().enumerate() {
            let trailer = Trailer {
                generation,
                worker,
                socket: named.index as u16,
            };
            let cookie = cookies.get(position).copied().unwrap_or(0);
            let (clients, drain) = (&clients, &drain);
            scope.spawn(move || serve(&named.socket, drain, deadline, trailer, cookie, clients));
        }
        let _ = worker_sdk::notify_ready();
    });
    let served: usize = clients.lock().unwrap().len();
    eprintln!("stateful-worker gen={generation} worker={worker} drained: {served} clients");
    Ok(())
}

fn serve(
    socket: &UdpSocket,
    drain: &DrainSignal,
    deadline: Duration,
    trailer: Trailer,
    cookie: u16,
    clients: &Mutex<HashMap<SocketAddr, u64>>,
) {
    let mut reply = Vec::with_capacity(64);
    let result =
        worker_sdk::serve_until_drained(socket, drain, deadline, |socket, request, peer| {
            if request.len() < REQUEST_LEN {
                return;
            }
            let count = {
                let mut clients = clients.lock().unwrap();
                let count = clients.entry(peer).or_insert(0);
                *count += 1;
                *count
            };
            reply.clear();
            reply.extend_from_slice(&request[..REQUEST_LEN]);
            reply.extend_from_slice(&trailer.to_bytes());
            reply.extend_from_slice(&count.to_le_bytes());
            reply.extend_from_slice(&cookie.to_be_bytes());
            let _ = socket.send_to(&reply, peer);
        });
    if let Err(e) = result {
        eprintln!("stateful-worker: {e}");
        drain.request();
    }
}
