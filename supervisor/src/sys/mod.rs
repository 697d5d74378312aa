//! Every `unsafe` block and raw syscall of the supervisor lives here, each with the
//! invariant that makes it sound written next to it. The rest of the crate uses the
//! safe functions below.
//!
//! - [`spawn_worker`]: fork + exec with the socket-activation fds moved to 3.. and
//!   `LISTEN_PID` written in the child, after fork, as systemd does. Nothing in the
//!   crates we use can do that: `std::process::Command` builds the environment
//!   before fork, and the child's pid is only known after it.
//! - pidfds ([`pidfd_open`], [`pidfd_signal`], [`pidfd_try_wait`]): race-free handles
//!   on worker processes (a pid can be reused, a pidfd cannot).
//! - [`ControlWord`]: the mmap of the selector's `CONTROL` map, so the generation flip
//!   is one atomic 8-byte store.
//! - [`socket_meminfo`]: `SO_MEMINFO`, the receive-queue bytes and drop count of a
//!   socket (nix has no wrapper for it).
//! - [`synchronize_rcu`]: `membarrier(MEMBARRIER_CMD_GLOBAL)`, an RCU grace period, so
//!   the XDP filter knows when no packet still uses a ruleset it switched away from.
//!
//! - [`seccomp`]: the `bind()` user-notification filter of `service.handoff =
//!   "bind"`, installed in the child between fork and exec, and the ioctls the
//!   supervisor answers its notifications with.
//!
//! One file per kind of call; every file keeps its `unsafe` blocks with the
//! invariant beside each.
mod bpf;
mod control_word;
mod fd;
mod pidfd;
pub mod seccomp;
mod socket;
mod spawn;

pub use bpf::{bpf_map_delete_u32, synchronize_rcu};
pub use control_word::ControlWord;
pub use fd::{register_async, set_cloexec, take_inherited_fd};
pub use pidfd::{ExitStatus, pidfd_getfd, pidfd_open, pidfd_signal, pidfd_try_wait};
pub use socket::{SocketMemInfo, socket_cookie, socket_meminfo};
pub use spawn::{PreparedExec, Spawned, spawn_worker};
