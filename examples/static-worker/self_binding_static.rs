//! A self-binding echo worker with the standard library alone, meant to be built
//! as a static binary (`rustc -C target-feature=+crt-static`): nothing for an
//! `LD_PRELOAD` shim to hook, so only a kernel-side interception (seccomp, as
//! `handoff = "bind"` does) can hand it a socket. It binds the address given as
//! its one argument, says `READY=1` on `$NOTIFY_SOCKET` (a path), and echoes with
//! the echo-protocol trailer (docs/echo-protocol.md).
use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;

fn env_number(key: &str) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5300".into());
    let socket = UdpSocket::bind(&address).unwrap_or_else(|e| {
        eprintln!("self_binding_static: binding {address}: {e}");
        std::process::exit(1)
    });
    let mut trailer = [0u8; 8];
    trailer[0..4].copy_from_slice(&env_number("SUPERVISOR_GENERATION").to_le_bytes());
    trailer[4..6].copy_from_slice(&(env_number("SUPERVISOR_WORKER") as u16).to_le_bytes());
    if let Ok(path) = std::env::var("NOTIFY_SOCKET") {
        let notify = UnixDatagram::unbound().expect("a unix datagram socket");
        if let Err(e) = notify.send_to(b"READY=1", &path) {
            eprintln!("self_binding_static: READY=1 to {path}: {e}");
            std::process::exit(1);
        }
    }
    let mut buffer = vec![0u8; 65536];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buffer[..65536 - 8]) else {
            std::process::exit(1)
        };
        buffer[len..len + 8].copy_from_slice(&trailer);
        let _ = socket.send_to(&buffer[..len + 8], peer);
    }
}
