//! Everything a UDP worker needs to be run by the upgrade supervisor — or by
//! systemd, or by hand.
//!
//! The supervisor hands a worker its sockets and expects three things back.
//! This crate covers each one, using only the standard protocols, so a worker
//! built on it also runs unchanged under systemd socket activation:
//!
//! 1. **Take the inherited sockets.** The supervisor creates and binds the
//!    sockets itself (they belong to its `SO_REUSEPORT` group and its eBPF
//!    selector, and they outlive any one worker) and passes them with the
//!    systemd socket-activation protocol: fds 3.., described by `LISTEN_FDS`,
//!    `LISTEN_PID` and `LISTEN_FDNAMES`. See [`Listeners`].
//! 2. **Say when it is ready.** `READY=1` on `NOTIFY_SOCKET` (the sd_notify
//!    protocol) tells the supervisor it may switch traffic to this generation.
//!    See [`notify_ready`].
//! 3. **Drain, then exit.** After the switch, the old generation's workers get
//!    the drain signal (SIGTERM unless configured otherwise). A worker should
//!    keep reading until its sockets stay idle for a short *read deadline*, so
//!    that every datagram the kernel already queued is served, then exit 0.
//!    See [`DrainSignal`] and [`serve_until_drained`].
//!
//! A minimal worker:
//!
//! ```no_run
//! use worker_sdk::{DrainSignal, Listeners, DEFAULT_READ_DEADLINE};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Install the drain handler first: once it exists, SIGTERM can no
//!     // longer kill us before we have served what is queued.
//!     let drain = DrainSignal::install_default()?;
//!     let mut listeners = Listeners::from_env()?;
//!     let sockets = listeners.udp_or_bind("echo", "127.0.0.1:5300".parse()?)?;
//!     worker_sdk::notify_ready()?;
//!     worker_sdk::serve_all_until_drained(&sockets, &drain, DEFAULT_READ_DEADLINE, |_index| {
//!         |socket: &std::net::UdpSocket, request: &[u8], peer| {
//!             let _ = socket.send_to(request, peer);
//!         }
//!     })?;
//!     Ok(())
//! }
//! ```
//!
//! With the `tokio` feature, the `worker_sdk::tokio` module has the async
//! equivalents: tokio sockets, a drain signal that wakes tasks, an async serve loop.
//!
//! All `unsafe` code lives in the private `sys` module; each block there says
//! which invariant makes it sound.

#![deny(unsafe_code)]

mod drain;
mod env;
mod error;
mod listen;
mod notify;
#[allow(unsafe_code)]
mod sys;

#[cfg(feature = "tokio")]
pub mod tokio;

pub use drain::{
    DEFAULT_READ_DEADLINE, DrainSignal, MAX_DATAGRAM, POLL_INTERVAL, Served, parse_signal,
    serve_all_until_drained, serve_until_drained,
};
pub use env::{cookies, generation, worker_index};
pub use error::Error;
pub use listen::{Listeners, NamedSocket};
pub use notify::{notify, notify_ready, notify_status, notify_stopping};
