//! The supervisor daemon and its CLI, as a library so its parts are testable.
//! `docs/ARCHITECTURE.md` follows one upgrade through these modules.
//!
//! | module      | owns |
//! |-------------|------|
//! | `config`    | the TOML contract and its validation |
//! | `daemon`    | start-up (fresh or re-exec'd, one path), the event loop, shutdown |
//! | `control`   | the CLI ↔ daemon socket: protocol, server half, client half |
//! | `upgrade`   | the generation state machine: build, ready, flip, drain, retire |
//! | `readiness` | when a new generation is ready: notify, exec, probe |
//! | `dataplane` | the seam between the state machine and the kernel's side of a listener |
//! | `maps`      | the real dataplane: the pinned selector and its maps |
//! | `sockets`   | the listener sockets |
//! | `process`   | the seam for worker processes, and the real fork/exec + pidfd one |
//! | `worker`    | one worker process slot: exec, readiness, restarts, drain signal |
//! | `notify`    | the workers' `NOTIFY_SOCKET` |
//! | `handoff`   | `handoff = "bind"`: a worker's own `bind()` answered with the generation's socket |
//! | `systemd`   | the supervisor's own sd_notify conversation |
//! | `status`    | what `supervisor status` reports, typed |
//! | `reexec`    | replacing the supervisor's image in place |
//! | `handoff_check`, `reexec_vet` | the check a binary passes before a re-exec into it |
//! | `selector_layout`, `selector_swap` | a new build's selector replacing the pinned one |
//! | `xdp`       | the XDP filter at the interface: attach/adopt via a pinned link, rulesets |
//! | `bpffs`, `ebpf`, `error` | bpffs mounting, the embedded eBPF objects, exit codes |
//! | `locks`     | one supervisor per service: the runtime directory's and the pins' locks |
//! | `trust`     | the runtime directory, files written there, the daemon the CLI talks to |
//! | `procfs`    | who else holds a socket or a lock (for refusals that name them) |
//! | `metrics`   | the optional Prometheus endpoint and the stalled-queue check |
//! | `sys`       | every `unsafe` block and raw syscall |
// Unsafe code lives in `sys` alone, each block with its invariant beside it.
#![deny(unsafe_code)]

pub mod bpffs;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod ebpf;
pub mod error;
pub mod fdstore;
pub mod handoff;
pub mod handoff_check;
pub mod journal;
pub mod locks;
pub mod maps;
pub mod metrics;
pub mod notify;
pub mod process;
pub mod procfs;
pub mod readiness;
pub mod reexec;
pub mod reexec_vet;
pub mod selector_layout;
pub mod selector_swap;
pub mod sockets;
pub mod status;
#[allow(unsafe_code)]
pub mod sys;
pub mod systemd;
pub mod trust;
pub mod upgrade;
pub mod worker;
pub mod xdp;
