//! Generation slots: which number the next generation gets, and what happens
//! when every slot is taken.
//!
//! The selector has `GENERATION_SLOTS` (4) slots, and generation `N` lives in slot
//! `N % 4`: the selector derives the slot from a cookie's generation byte, so the
//! mapping is fixed (4 divides 256). One slot holds the serving generation and a
//! new one needs a free slot, so at most 3 generations drain at once after a flip,
//! and 2 while the next one is built. Generation numbers whose slot is still taken
//! are skipped, so a failed upgrade (which frees its slot at once) never blocks
//! the next one.
//!
//! With no slot free, `on_no_free_slot` decides:
//! - `retire-oldest` (default): the oldest draining generation gives its slot up
//!   at once. The slot is emptied, so the selector finds its flows stale and sends
//!   them to the working generation as new flows (the count is reported); its
//!   workers still read what is already queued on their sockets, then drain.
//! - `refuse`: the upgrade is refused (exit 2), nothing changes.
use supervisor_common::GENERATION_SLOTS;

use super::{Progress, State};
use crate::{config::NoFreeSlot, error::InputError};

/// The number for the next generation: the first from `next_generation` on whose
/// slot is free, making room first if the policy allows.
pub(super) fn reserve(
    state: &mut State,
    policy: NoFreeSlot,
    progress: &Progress,
) -> Result<u32, InputError> {
    if let Some(number) = free_number(state) {
        return Ok(number);
    }
    let draining = state.draining();
    match policy {
        NoFreeSlot::Refuse => Err(InputError::new(format!(
            "every generation slot is taken: generation {} serves and generations {} are still draining; \
             with on_no_free_slot = \"refuse\" the upgrade waits until one has drained (or set on_no_free_slot = \"retire-oldest\")",
            state.serving(),
            draining
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        NoFreeSlot::RetireOldest => {
            let (oldest, moved) = release_oldest(state).ok_or_else(|| {
                InputError::new("every generation slot is taken and none of them drains")
            })?;
            progress.emit(format!(
                "generation {oldest}: retired early to free its slot (on_no_free_slot = \"retire-oldest\"); \
                 its {moved} flows move to the working generation"
            ));
            Ok(free_number(state).expect("a slot was just released"))
        }
    }
}

fn free_number(state: &State) -> Option<u32> {
    (state.next_generation..state.next_generation + GENERATION_SLOTS).find(|number| {
        let slot = number % GENERATION_SLOTS;
        !state
            .generations
            .iter()
            .any(|g| g.slot == slot && g.holds_slot())
    })
}

/// Empties the slot of the oldest draining generation that still holds one;
/// returns it and how many live flows it held.
fn release_oldest(state: &mut State) -> Option<(u32, u64)> {
    let State {
        generations,
        dataplanes,
        ..
    } = state;
    let oldest = generations
        .iter_mut()
        .filter(|g| g.state == super::GenerationState::Draining && g.holds_slot())
        .min_by_key(|g| g.number)?;
    let moved = dataplanes
        .iter()
        .map(|d| d.live_flows().get(&oldest.number).copied().unwrap_or(0))
        .sum();
    for dataplane in dataplanes.iter().take(oldest.listeners.len()) {
        dataplane.clear_slot(oldest.slot);
    }
    oldest.slot_released = true;
    let number = oldest.number;
    state.workers.journal.mark();
    Some((number, moved))
}
