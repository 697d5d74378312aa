//! Building a generation: sockets, socket arrays, workers; everything up to the
//! point where only readiness is missing.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
};

use anyhow::{Result, bail};
use supervisor_common::{GENERATION_SLOTS, Settings, cookie};

use super::{Generation, GenerationListener, Progress, Shared};
use crate::{
    config::Config,
    worker::{SlotSockets, WorkerSlot, WorkerSpec},
};

/// Builds generation `number` in slot `number % GENERATION_SLOTS`. On error what
/// was built so far stays recorded in the generation (each listener as soon as its
/// array is installed), so the caller's teardown removes all of it.
pub(super) fn build(
    shared: &Shared,
    number: u32,
    config: &Config,
    spec: Arc<WorkerSpec>,
    progress: &Progress,
) -> Result<()> {
    let mut state = shared.lock().unwrap();
    let state = &mut *state;
    let slot = number % GENERATION_SLOTS;
    // `begin` chose a number whose slot is free; a slot in use here is a bug.
    if state
        .generations
        .iter()
        .any(|g| g.slot == slot && g.holds_slot())
    {
        bail!("generation slot {slot} is still in use");
    }
    state.generations.push(Generation::starting(number, slot));
    let generation = state.generations.last_mut().expect("pushed above");
    for (listener, dataplane) in config.listeners.iter().zip(state.dataplanes.iter_mut()) {
        let count = config.sockets_for(listener);
        let mut fds = Vec::with_capacity(count as usize);
        for _ in 0..count {
            fds.push(dataplane.bind_socket(listener)?);
            if fds.len() == 1 {
                // Attached as soon as the group exists (first generation) and again
                // on every generation: cheap, and it repairs a group whose program
                // was detached behind our back.
                dataplane.attach(fds[0].as_fd())?;
            }
        }
        let settings = Settings {
            flow_idle_ms: listener.flow_idle.as_millis().min(u128::from(u32::MAX)) as u32,
            cookie_offset: listener.cookie_offset,
        };
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        // Under systemd a copy goes to its fd store: the socket outlives this
        // process and its workers, whatever kills them.
        let stored: Vec<_> = borrowed
            .iter()
            .map(|fd| (crate::sys::socket_cookie(*fd).unwrap_or(0), *fd))
            .collect();
        crate::fdstore::store(&stored);
        let array = dataplane.install_generation(number, slot, &borrowed, settings)?;
        generation.listeners.push(GenerationListener {
            name: listener.name.clone(),
            address: listener.address,
            balance: listener.balance.0,
            settings,
            flow_idle: listener.flow_idle,
            sockets: Arc::new(fds),
            sockets_per_worker: listener.sockets_per_worker,
            array,
        });
    }
    progress.emit(format!(
        "generation {number}: {} sockets bound, socket arrays pinned as gen-{number} (slot {slot})",
        generation
            .listeners
            .iter()
            .map(|l| l.sockets.len())
            .sum::<usize>()
    ));
    for index in 0..config.service.workers {
        generation.workers.push(WorkerSlot::start(
            number,
            index,
            spec.clone(),
            slot_sockets(&generation.listeners, number, index),
            state.workers.clone(),
        ));
    }
    // On disk before any worker holds a socket of it (the slots' tasks fork only
    // once this returns and the lock is released): a supervisor that dies from
    // here on leaves a generation the next one knows to tear down.
    state.workers.journal.write_now(state);
    Ok(())
}

/// Worker `index`'s sockets: its `sockets_per_worker` consecutive sockets of each
/// listener, in listener order, with their names and cookies.
pub fn slot_sockets(listeners: &[GenerationListener], generation: u32, index: u32) -> SlotSockets {
    let mut sockets = SlotSockets {
        fds: Vec::new(),
        names: Vec::new(),
        addresses: Vec::new(),
        cookies: Vec::new(),
        owner: Vec::new(),
    };
    for listener in listeners {
        let per = listener.sockets_per_worker as usize;
        let first = index as usize * per;
        for (offset, socket) in listener.sockets[first..first + per].iter().enumerate() {
            sockets.fds.push(socket.as_raw_fd());
            sockets.names.push(listener.name.clone());
            sockets.addresses.push(listener.address);
            sockets
                .cookies
                .push(cookie(generation, (first + offset) as u32));
        }
        sockets.owner.push(listener.sockets.clone());
    }
    sockets
}
