//! The supervisor daemon and its CLI, as a library so its parts are testable.
//!
//! | module      | owns |
//! |-------------|------|
//! | `config`    | the TOML contract and its validation |
//! | `upgrade`   | the generation state machine: build, ready, flip, drain, retire |
//! | `maps`      | user space's half of the maps contract with the selector |
//! | `worker`    | one worker process slot: exec, readiness, restarts, drain signal |
//! | `sys`       | every `unsafe` block and raw syscall |
//! | `daemon`    | start-up, the event loop, shutdown |
//! | `control`   | the CLI ↔ daemon socket |
//! | `xdp`       | the XDP filter at the interface: attach/adopt via a pinned link, rulesets |
pub mod bpffs;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod ebpf;
pub mod error;
pub mod maps;
pub mod notify;
pub mod process;
pub mod readiness;
pub mod reexec;
pub mod sockets;
pub mod status;
pub mod sys;
pub mod systemd;
pub mod upgrade;
pub mod worker;
pub mod xdp;
