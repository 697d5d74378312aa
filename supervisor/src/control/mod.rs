//! The control socket between the CLI (`upgrade`, `status`, `stop`, `reexec`) and
//! the daemon, both halves: a unix stream socket at `<runtime_dir>/<service>.sock`,
//! mode 0600, one JSON request line per connection, JSON event lines back (the
//! wire format is in `docs/control-protocol.md`).
//!
//! The server half only translates: a request becomes a [`Command`] for the
//! daemon's event loop, which owns everything that changes state, and the
//! command's outcome becomes events.
//!
//! Whatever a client does, the server half holds a bounded amount for it: at
//! most [`MAX_CONNECTIONS`] connections at once ([`Connections`]), a request line
//! of at most [`MAX_REQUEST`] bytes, sent within [`REQUEST_TIMEOUT`], and answers
//! each written within [`WRITE_TIMEOUT`].
mod client;
mod server;

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{status::Status, upgrade::Progress};

pub use client::{STATUS_TIMEOUT, call, fetch_status};
pub use server::*;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Re-read the config at `config` and build a new generation; answer when it
    /// serves, or with `wait = "drained"` once the older generations are gone too.
    Upgrade {
        config: PathBuf,
        #[serde(default)]
        wait: UpgradeWait,
    },
    Status,
    Stop,
    /// Replace the supervisor process image with `binary`, keeping everything.
    Reexec {
        binary: PathBuf,
    },
}

/// When an upgrade request is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpgradeWait {
    /// As soon as the new generation serves (older ones may still drain).
    #[default]
    Serving,
    /// Once every older generation has drained and is gone.
    Drained,
}

/// What a successful upgrade reports.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub generation: u32,
    /// Older generations still draining when the answer was sent.
    pub draining: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A phase of an upgrade, `at_ms` after the daemon received the request.
    Phase {
        at_ms: u64,
        text: String,
    },
    Status {
        status: Box<Status>,
    },
    /// The final line: success. For an upgrade, the older generations that are
    /// still draining.
    Done {
        message: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        draining: Vec<u32>,
    },
    /// The final line: failure, with the exit code the CLI should use.
    Error {
        exit_code: i32,
        message: String,
    },
}

/// What the server half asks of the daemon's event loop.
pub enum Command {
    Stop,
    /// Upgrade from the config at `config`; phases go to `progress`, the outcome
    /// to `done` (when the new generation serves, or per `wait`).
    Upgrade {
        config: PathBuf,
        wait: UpgradeWait,
        progress: Progress,
        done: oneshot::Sender<Result<Upgraded>>,
    },
    /// Exec `binary` in place; the sender hears why if that did not happen.
    Reexec {
        binary: PathBuf,
        refused: oneshot::Sender<String>,
    },
}
