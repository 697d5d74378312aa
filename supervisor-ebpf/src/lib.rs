//! Shared helpers for the supervisor's eBPF programs. Each program is a `[[bin]]`.
#![no_std]
