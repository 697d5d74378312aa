//! `supervisor handoff-check`: the candidate's side of the check a running
//! supervisor makes before it re-execs into a binary (see `reexec_vet` for the
//! daemon's side).
//!
//! The candidate answers with a [`Proof`], one JSON line on stdout: that it is a
//! supervisor, which version, which handoff format it reads, whether the config
//! parses, and whether the service's pins are all there and of the kind this
//! build expects. It reads the pins and changes nothing: no pin, file, lock or
//! socket is created, and nothing is logged.
use std::path::Path;

use aya::programs::ProgramInfo;
use serde::{Deserialize, Serialize};
use supervisor_common::{pin_names, xdp};

use crate::{
    config::Config,
    reexec::HANDOFF_FORMAT,
    selector_layout::{MapDefinition, PinKind, SelectorLayout, pin_kind},
};

/// The `program` of every proof: anything else did not come from a supervisor.
pub const PROGRAM: &str = "supervisor";

/// For tests only (tests/tests/reexec.rs): a candidate run with this variable
/// claims to read the handoff format it names instead of [`HANDOFF_FORMAT`], to
/// stand in for a build with another format. Not part of the outward contract.
pub const FAKE_FORMAT_ENV: &str = "SUPERVISOR_TEST_FAKE_HANDOFF_FORMAT";

/// `BPF_PROG_TYPE_SK_REUSEPORT` and `BPF_PROG_TYPE_XDP` from the kernel's uapi.
const PROG_TYPE_SK_REUSEPORT: u32 = 21;
const PROG_TYPE_XDP: u32 = 6;

/// The candidate's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Proof {
    pub program: String,
    pub version: String,
    /// The handoff format this build writes and reads (`reexec::HANDOFF_FORMAT`).
    pub handoff_format: u32,
    /// Every handoff format this build reads, `handoff_format` included: a build
    /// that still reads an older layout lists it, so a supervisor writing that one
    /// may re-exec into it. Absent: `handoff_format` only.
    #[serde(default)]
    pub reads_formats: Vec<u32>,
    /// Why the config does not parse for this build; `None`: it does.
    pub config_error: Option<String>,
    /// What is missing or of another kind among the pins; empty: all present.
    pub pin_problems: Vec<String>,
}

impl Proof {
    /// Whether the candidate reads a handoff in `format`.
    pub fn reads(&self, format: u32) -> bool {
        self.handoff_format == format || self.reads_formats.contains(&format)
    }

    pub fn pins_ok(&self) -> bool {
        self.config_error.is_none() && self.pin_problems.is_empty()
    }
}

/// Runs the check and prints the proof. Exit 0 when everything is in order for
/// a handoff in `format`, 2 otherwise (the daemon judges the proof, not this).
pub fn run(config_path: &Path, format: u32) -> i32 {
    let proof = prove(config_path);
    match serde_json::to_string(&proof) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("error: {e}");
            return crate::error::EXIT_FAILED;
        }
    }
    if proof.pins_ok() && proof.reads(format) {
        crate::error::EXIT_OK
    } else {
        crate::error::EXIT_BAD_INPUT
    }
}

pub fn prove(config_path: &Path) -> Proof {
    let handoff_format = std::env::var(FAKE_FORMAT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HANDOFF_FORMAT);
    let (config_error, pin_problems) = match Config::load(config_path) {
        Ok(config) => (None, pin_problems(&config)),
        Err(e) => (Some(e.to_string()), Vec::new()),
    };
    Proof {
        program: PROGRAM.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        handoff_format,
        reads_formats: vec![handoff_format],
        config_error,
        pin_problems,
    }
}

/// Every pin of every listener (and of the XDP filter when the config has one)
/// that is missing or not of the kind and type this build expects.
pub fn pin_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let selector = match SelectorLayout::of_this_build() {
        Ok(layout) => layout,
        Err(e) => return vec![format!("{e:#}")],
    };
    let pin_dir = config.pin_dir();
    for listener in &config.listeners {
        let dir = pin_dir.join(&listener.name);
        check_program(
            &dir.join(pin_names::SELECTOR),
            PROG_TYPE_SK_REUSEPORT,
            &mut problems,
        );
        for (map, pin) in crate::selector_layout::PINNED_MAPS {
            let expected = selector.maps.get(map).map(|d| d.map_type);
            check_map(&dir.join(pin), expected, &mut problems);
        }
    }
    if let Some(filter) = &config.xdp {
        let dir = pin_dir
            .join(xdp::pin_names::XDP_DIR)
            .join(&filter.interface);
        check_kind(
            &dir.join(xdp::pin_names::LINK),
            PinKind::Link,
            &mut problems,
        );
        check_program(
            &dir.join(xdp::pin_names::PROGRAM),
            PROG_TYPE_XDP,
            &mut problems,
        );
        // The maps of a filter pinned by a build with other map layouts (across
        // an upgrade that adds or changes an XDP map) are not reused: adoption puts
        // fresh ones in place in the same link update as the program, so their pins
        // need not be this build's. Only the control word saying so must be there.
        if crate::xdp::pinned_by_another_layout(&dir) {
            return problems;
        }
        let object = aya_obj::Object::parse(crate::ebpf::XDP_OBJECT).ok();
        for (map, pin) in xdp::map_names::ALL {
            let expected = object
                .as_ref()
                .and_then(|o| o.maps.get(map))
                .map(|m| m.map_type());
            check_map(&dir.join(pin), expected, &mut problems);
        }
    }
    problems
}

fn check_kind(path: &Path, expected: PinKind, problems: &mut Vec<String>) -> bool {
    match pin_kind(path) {
        Ok(kind) if kind == expected => true,
        Ok(kind) => {
            problems.push(format!(
                "{} holds {kind}, expected {expected}",
                path.display()
            ));
            false
        }
        Err(e) => {
            problems.push(format!("{e:#}"));
            false
        }
    }
}

fn check_program(path: &Path, program_type: u32, problems: &mut Vec<String>) {
    if !check_kind(path, PinKind::Program, problems) {
        return;
    }
    match ProgramInfo::from_pin(path) {
        Ok(info) if info.program_type() as u32 == program_type => {}
        Ok(info) => problems.push(format!(
            "{} is a program of type {}, expected type {program_type}",
            path.display(),
            info.program_type() as u32
        )),
        Err(e) => problems.push(format!("{}: {e}", path.display())),
    }
}

fn check_map(path: &Path, map_type: Option<u32>, problems: &mut Vec<String>) {
    if !check_kind(path, PinKind::Map, problems) {
        return;
    }
    match (MapDefinition::of_pin(path), map_type) {
        (Ok(pinned), Some(expected)) if pinned.map_type == expected => {}
        (Ok(pinned), Some(expected)) => problems.push(format!(
            "{} is a map of type {}, expected type {expected}",
            path.display(),
            pinned.map_type
        )),
        (Ok(_), None) => problems.push(format!(
            "{}: this build has no map for this pin",
            path.display()
        )),
        (Err(e), _) => problems.push(format!("{e:#}")),
    }
}
