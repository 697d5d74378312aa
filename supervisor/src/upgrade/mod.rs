//! The upgrade state machine: the only code that creates, flips, drains and
//! retires generations.
//!
//! ```text
//!   begin ─► plan XDP ─► build ─► wait ready ─► flip ─► drain old ─► retire old ─► done
//!              │           │           │
//!              └───────────┴───────────┴──► tear down the new generation; the old one keeps serving
//! ```
//!
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
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Result;
use supervisor_common::Control;

pub use build::slot_sockets;
pub use compat::check_compatible;
pub use drain::stop_all;
pub use state::{Generation, GenerationListener, GenerationState, Progress, Shared, State};

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

/// Reserves the right to upgrade. Refused while another upgrade (including its
/// drain) runs, so at most three generations exist and slots never collide.
pub fn begin(shared: &Shared, new_config: &Config) -> Result<u32, InputError> {
    let mut state = shared.lock().unwrap();
    if let Some(target) = state.upgrading_to {
        return Err(InputError::new(format!(
            "an upgrade to generation {target} is already in progress; try again when it has finished"
        )));
    }
    check_compatible(&state.config, new_config)?;
    let number = state.next_generation;
    state.next_generation += 1;
    state.upgrading_to = Some(number);
    Ok(number)
}

/// Runs a whole upgrade to generation `number` (reserved by [`begin`]).
pub async fn run(
    shared: &Shared,
    number: u32,
    config: Config,
    spec: Arc<WorkerSpec>,
    progress: &Progress,
) -> Result<()> {
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
    if let Err(e) = build::build(shared, number, &config, spec.clone(), progress) {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        drain::teardown(shared, number, progress).await;
        return Err(e);
    }
    if let Err(e) = readiness::wait(shared, number, &config, progress).await {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        drain::teardown(shared, number, progress).await;
        return Err(e);
    }

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
    progress.emit(format!("generation {number}: flipped, now serving"));

    let drain_timeout = config.service.drain_timeout;
    for old in previous {
        drain::drain(shared, old, drain_timeout, progress).await;
    }
    progress.emit(format!("generation {number}: upgrade complete"));
    Ok(())
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
    let mut previous = Vec::new();
    for old in state
        .generations
        .iter_mut()
        .filter(|g| g.number != number && g.state == GenerationState::Serving)
    {
        old.state = GenerationState::Draining;
        previous.push(old.number);
    }
    previous
}
