//! The crate's one error type.
//!
//! A worker that fails here usually fails at startup, and the message ends up
//! in the supervisor's log. So every variant carries what an operator needs to
//! fix it without reading the code: the variable and its value, the fd number
//! and its `LISTEN_FDNAMES` entry, what was found instead of what was expected.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// Why a worker-sdk call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable of the protocol is set but malformed.
    InvalidEnv {
        /// The variable, e.g. `LISTEN_FDS`.
        var: &'static str,
        /// Its value (lossily converted if it was not UTF-8).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `LISTEN_FDS` promised an fd that is not open in this process.
    BadFd {
        /// The fd number (3, 4, ...).
        fd: RawFd,
        /// Its `LISTEN_FDNAMES` entry.
        name: String,
        /// What `fcntl(F_GETFD)` said.
        source: io::Error,
    },
    /// An inherited fd asked for as a UDP socket is something else.
    NotUdp {
        /// The fd number.
        fd: RawFd,
        /// Its `LISTEN_FDNAMES` entry.
        name: String,
        /// What it is instead, e.g. `"SOCK_STREAM socket"`.
        found: String,
    },
    /// The process was socket-activated, but no inherited fd has this name.
    NoSuchListener {
        /// The name asked for.
        name: String,
        /// The names that were passed, in fd order, without repeats.
        available: Vec<String>,
    },
    /// [`Listeners::from_env`](crate::Listeners::from_env) already took the
    /// inherited fds; two owners of one fd would close it under each other.
    AlreadyAdopted,
    /// A drain signal name or number that cannot be used.
    BadSignal {
        /// What was given.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidEnv { var, value, reason } => {
                write!(f, "{var}={value:?}: {reason}")
            }
            Error::BadFd { fd, name, source } => write!(
                f,
                "inherited fd {fd} (LISTEN_FDNAMES entry {name:?}) is not usable: {source}"
            ),
            Error::NotUdp { fd, name, found } => write!(
                f,
                "inherited fd {fd} (LISTEN_FDNAMES entry {name:?}) is not a UDP socket: it is {found}"
            ),
            Error::NoSuchListener { name, available } => {
                write!(f, "no inherited socket is named {name:?}; ")?;
                if available.is_empty() {
                    write!(f, "none were passed (LISTEN_FDS=0)")
                } else {
                    write!(f, "LISTEN_FDNAMES has {}", available.join(", "))
                }
            }
            Error::AlreadyAdopted => write!(
                f,
                "the inherited fds were already taken by an earlier Listeners::from_env() in this process"
            ),
            Error::BadSignal { value, reason } => {
                write!(f, "drain signal {value:?}: {reason}")
            }
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::BadFd { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Lets `?` work in functions returning `io::Result`. The message is kept;
/// the kind is the underlying one when there is one.
impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::BadFd { source, .. } | Error::Io { source, .. } => source.kind(),
            Error::NoSuchListener { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}
