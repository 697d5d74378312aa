//! self-binding-worker: an echo worker written the way most Rust UDP services
//! are, knowing nothing of socket activation: it binds its own socket with
//! `std::net::UdpSocket::bind` and says `READY=1` with the `sd-notify` crate
//! (which needs `NOTIFY_SOCKET` to be a filesystem path).
//!
//! Under the supervisor with `handoff = "bind"` its `bind()` is answered with
//! the generation's socket; run by hand it just binds. Replies follow the
//! echo protocol (`supervisor_examples::echo`). SIGTERM keeps its default
//! action: it dies at once, so the supervisor's wait for empty queues is what
//! saves the datagrams of an upgrade.

#![deny(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;

use clap::Parser;
use supervisor_examples::echo::Trailer;

#[derive(Parser, Debug)]
#[command(
    name = "self-binding-worker",
    about = "Binds its own UDP socket and echoes datagrams with a trailer."
)]
struct Args {
    /// The address to bind.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5300")]
    bind: SocketAddr,
}

fn env_number(key: &str) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = match UdpSocket::bind(args.bind) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("self-binding-worker: binding {}: {e}", args.bind);
            return ExitCode::FAILURE;
        }
    };
    let trailer = Trailer {
        generation: env_number("SUPERVISOR_GENERATION"),
        worker: env_number("SUPERVISOR_WORKER") as u16,
        socket: 0,
    }
    .to_bytes();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        eprintln!("self-binding-worker: READY=1: {e}");
        return ExitCode::FAILURE;
    }
    let mut buffer = vec![0u8; 65536];
    loop {
        let (len, peer) = match socket.recv_from(&mut buffer[..65536 - trailer.len()]) {
            Ok(received) => received,
            Err(e) => {
                eprintln!("self-binding-worker: recv: {e}");
                return ExitCode::FAILURE;
            }
        };
        buffer[len..len + trailer.len()].copy_from_slice(&trailer);
        let _ = socket.send_to(&buffer[..len + trailer.len()], peer);
    }
}
