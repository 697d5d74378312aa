//! The kernel side of one listener, as the upgrade state machine sees it.
//!
//! [`Dataplane`] is the seam between the state machine ([`crate::upgrade`]) and the
//! eBPF maps and sockets it drives. The daemon uses [`crate::maps::ListenerDataplane`]
//! (the pinned selector and its maps); unit tests use stand-ins built on ordinary
//! unprivileged UDP sockets, so every failure path of an upgrade can be tested
//! without root.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{BorrowedFd, OwnedFd},
};

use anyhow::Result;
use supervisor_common::{Control, FlowCounters, Settings, SocketCounters};

use crate::config::ListenerConfig;

/// A generation's socket array, installed in a slot and pinned. Dropping it
/// removes the pin; the slot itself is emptied with [`Dataplane::clear_slot`].
pub trait InstalledArray: Send {}

/// One listener's reuseport group, selector and maps.
pub trait Dataplane: Send {
    /// The listener's name (`[[listen]] name`).
    fn listener(&self) -> &str;

    /// A new socket of this listener's group: UDP, `SO_REUSEPORT`, bound to the
    /// listener's address, `FD_CLOEXEC`.
    fn bind_socket(&self, listener: &ListenerConfig) -> Result<OwnedFd>;

    /// Attaches the selector to the group `socket` is in (idempotent).
    fn attach(&self, socket: BorrowedFd<'_>) -> Result<()>;

    /// Puts generation `generation`'s sockets, in this order, into slot `slot`
    /// with its `settings`. The selector does not use the slot before [`Self::flip`].
    fn install_generation(
        &mut self,
        generation: u32,
        slot: u32,
        sockets: &[BorrowedFd<'_>],
        settings: Settings,
    ) -> Result<Box<dyn InstalledArray>>;

    /// Empties a slot whose generation is gone (never the working one).
    fn clear_slot(&self, slot: u32);

    /// The switch: one store of the control word.
    fn flip(&self, control: Control);

    /// The control word the selector reads now.
    fn working(&self) -> Control;

    /// The selector's counters for socket `socket` of `slot`.
    fn counters(&self, slot: u32, socket: u32) -> SocketCounters;

    /// Flow-table entries per generation that are not idle yet (`flow` mode).
    fn live_flows(&self) -> BTreeMap<u32, u64>;

    /// The flow and cookie stages' counters.
    fn flow_counters(&self) -> FlowCounters;

    /// Entries in the flow table, and its capacity.
    fn flow_table_usage(&self) -> (u64, u32);

    /// Steers datagrams from the probe socket bound to `source` to socket `socket`
    /// of `slot` (`ready = "probe"`).
    fn add_probe(&mut self, source: SocketAddr, slot: u32, socket: u32) -> Result<()>;

    fn remove_probe(&mut self, source: SocketAddr);

    /// Turns the selector's probe lookup on or off.
    fn set_probing(&self, active: bool);

    /// Advances the selector's flow clock, or stops it (`running == false`).
    fn tick_clock(&self, running: bool);

    /// Removes every pin of this listener (on shutdown).
    fn unpin_all(&self);
}
