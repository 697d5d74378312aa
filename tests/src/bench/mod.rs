//! Building blocks of the benchmark (`src/bin/bench.rs`) and the demo
//! (`src/bin/demo.rs`): BPF run-time statistics, hand-run baselines, /proc readings,
//! upgrade phase lines, markdown tables, SVG pictures, the XDP figure's veth lab, the XDP program's cost alone (BPF_PROG_TEST_RUN), the XDP replacement figure, and
//! cleanup on Ctrl-C.
//! Their few system calls without a safe wrapper are in the crate's `sys` module.

pub mod bpf;
pub mod chaos;
pub mod cleanup;
pub mod crash;
pub mod figure;
pub mod handrun;
pub mod many_flows;
pub mod phases;
pub mod plot;
pub mod procfs;
pub mod rounds;
pub mod table;
pub mod xdp;
pub mod xdp_program_cost;
pub mod xdp_replace;
