//! The upgrade state machine: the only code that creates, flips, drains and
//! retires generations.
//!
//! ```text
//!   begin ─► plan XDP ─► build ─► wait ready ─► flip ─► done (the upgrade returns here)
//!              │           │           │          └──► drain old ─► retire old   (a task per old generation)
//!              └───────────┴───────────┴──► tear down the new generation; the old ones keep serving
//! ```
//!
//! An upgrade is complete when the new generation serves. The generations it
//! flipped away from drain on their own clocks (`flow_idle`, `drain_timeout`), in
//! tasks of their own, so several can drain at once and the next deploy never
//! waits for them ([`slots`] says how many, and what happens when none is free).
//! The first generation at start-up takes the same path with nothing to drain.
//! Every step that can fail happens before the flip, and the flip itself is one
//! 8-byte store per listener, so a failed upgrade never touches what serves.
//!
//! Everything here runs against two seams: [`crate::dataplane::Dataplane`] (sockets
//! and the selector's maps) and [`crate::process::Launcher`] (worker processes),
//! so `tests` below drives every failure path without root.
mod build;
mod compat;
mod drain;
#[cfg(test)]
mod fakes;
mod slots;
mod state;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::SystemTime};

use anyhow::Result;
use supervisor_common::Control;

pub use build::slot_sockets;
pub use compat::check_compatible;
pub use drain::{stop_all, wait_drained};
pub use state::{
    DrainClock, Generation, GenerationListener, GenerationState, Progress, Shared, State,
};

use crate::{
    config::Config, error::InputError, readiness, worker::Policy, worker::WorkerSpec,
    xdp::XdpChange,
};

/// Clears `upgrading_to` however the upgrade ends (including when its task is aborted).
struct UpgradeGuard(Shared);

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.lock() {
            state.upgrading_to = None;
        }
    }
}

/// Reserves the right to upgrade and a generation number whose slot is free.
/// Refused while another upgrade is building (until its flip), and when every
/// slot is taken under `on_no_free_slot = "refuse"`; with `"retire-oldest"` the
/// oldest draining generation gives up its slot first (see [`slots`]).
pub fn begin(shared: &Shared, new_config: &Config, progress: &Progress) -> Result<u32, InputError> {
    let mut state = shared.lock().unwrap();
    if let Some(target) = state.upgrading_to {
        return Err(InputError::new(format!(
            "an upgrade to generation {target} is already in progress; try again when it has flipped"
        )));
    }
    check_compatible(&state.config, new_config)?;
    let number = slots::reserve(&mut state, new_config.service.on_no_free_slot, progress)?;
    state.next_generation = number + 1;
    state.upgrading_to = Some(number);
    Ok(number)
}

/// Runs an upgrade to generation `number` (reserved by [`begin`]) up to the flip,
/// and starts the drains of the generations it flipped away from. Returns the
/// generations that drain now (older ones included).
pub async fn run(
    shared: &Shared,
    number: u32,
    config: Config,
    spec: Arc<WorkerSpec>,
    progress: &Progress,
) -> Result<Vec<u32>> {
    let _guard = UpgradeGuard(shared.clone());
    progress.emit(format!("generation {number}: building"));

    // The new XDP ruleset is built (and checked) before anything else, and
    // switched in at the flip: a bad rule refuses the upgrade with nothing changed.
    let xdp_change = {
        let state = shared.lock().unwrap();
        XdpChange::plan(state.xdp.as_ref(), &config)
    };
    let xdp_change = match xdp_change {
        Ok(change) => change,
        Err(e) => {
            drain::retire(shared, number, progress);
            return Err(e);
        }
    };
    let phase = std::time::Instant::now();
    if let Err(e) = build::build(shared, number, &config, spec.clone(), progress) {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        drain::teardown(shared, number, progress).await;
        return Err(e);
    }
    crate::metrics::upgrade_phase("build", phase.elapsed());
    let phase = std::time::Instant::now();
    if let Err(e) = readiness::wait(shared, number, &config, progress).await {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        drain::teardown(shared, number, progress).await;
        return Err(e);
    }

    crate::metrics::upgrade_phase("ready", phase.elapsed());
    // The flip phase: the XDP switch (its grace period included) and the stores.
    // It starts when the last worker's READY=1 has been taken in.
    let phase = std::time::Instant::now();
    // Waited here, with no lock held: the event loop keeps running meanwhile.
    let readers = xdp_change.readers_gone().await;
    let applied = {
        let mut state = shared.lock().unwrap();
        xdp_change.apply(&mut state.xdp, &config, readers)
    };
    match applied {
        Ok(Some(message)) => progress.emit(message),
        Ok(None) => {}
        Err(e) => {
            progress.emit(format!("generation {number}: failed: {e:#}"));
            drain::teardown(shared, number, progress).await;
            return Err(e);
        }
    }
    let previous = flip(shared, number, &config, spec);
    let flip_latency = phase.elapsed();
    crate::metrics::upgrade_phase("flip", flip_latency);
    progress.emit(format!(
        "generation {number}: flipped, now serving ({:.3} ms after the last READY=1)",
        flip_latency.as_secs_f64() * 1e3
    ));

    let draining = {
        let mut state = shared.lock().unwrap();
        for old in previous {
            let task = tokio::spawn({
                let shared = shared.clone();
                let progress = progress.clone();
                let drain_timeout = config.service.drain_timeout;
                async move { drain::drain(&shared, old, drain_timeout, &progress).await }
            });
            state.drains.insert(old, task.abort_handle());
        }
        state.draining()
    };
    progress.emit(match draining.len() {
        0 => format!("generation {number}: upgrade complete"),
        n => format!(
            "generation {number}: upgrade complete; {n} older generation{} draining ({})",
            if n == 1 { "" } else { "s" },
            draining
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
    Ok(draining)
}

/// After a take-over (see `daemon::recover`): a drain task for every draining
/// generation, on the deadline its flip gave it (one already past: at once).
pub fn resume_drains(shared: &Shared) {
    let mut state = shared.lock().unwrap();
    let now = SystemTime::now();
    let pending: Vec<(u32, std::time::Duration)> = state
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Draining && !state.drains.contains_key(&g.number))
        .map(|g| {
            let left = g
                .drain
                .map(|d| d.deadline.duration_since(now).unwrap_or_default())
                .unwrap_or(state.config.service.drain_timeout);
            (g.number, left)
        })
        .collect();
    for (number, left) in pending {
        let task = tokio::spawn({
            let shared = shared.clone();
            async move { drain::drain(&shared, number, left, &Progress::new(None)).await }
        });
        state.drains.insert(number, task.abort_handle());
    }
}

/// The switch: one control-word store per listener. Returns the generations that
/// now drain.
fn flip(shared: &Shared, number: u32, config: &Config, spec: Arc<WorkerSpec>) -> Vec<u32> {
    let mut state = shared.lock().unwrap();
    let state = &mut *state;
    let generation = state
        .generations
        .iter_mut()
        .find(|g| g.number == number)
        .expect("built");
    for (listener, dataplane) in generation.listeners.iter().zip(state.dataplanes.iter()) {
        dataplane.flip(Control {
            working_slot: generation.slot as u8,
            balance_mode: listener.balance as u8,
            socket_count: listener.sockets.len() as u16,
            generation: number,
        });
    }
    generation.state = GenerationState::Serving;
    for worker in &generation.workers {
        worker.set_policy(Policy::Serve);
    }
    state.config = config.clone();
    state.spec = spec;
    state.workers.journal.mark();
    let since = SystemTime::now();
    let deadline = since + config.service.drain_timeout;
    let mut previous = Vec::new();
    for old in state
        .generations
        .iter_mut()
        .filter(|g| g.number != number && g.state == GenerationState::Serving)
    {
        old.state = GenerationState::Draining;
        old.drain = Some(DrainClock { since, deadline });
        previous.push(old.number);
    }
    previous
}
