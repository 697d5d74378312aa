//! The maps contract between the kernel side (`supervisor-ebpf`) and user space
//! (`supervisor`).
//!
//! Everything the two sides exchange through eBPF maps is defined here, once: map
//! names, sizes, key layouts and the `#[repr(C)]` values. Both crates compile this
//! file, so a layout change is a compile-time change on both sides at once.
//!
//! Per listener, the selector program owns these maps (pinned under
//! `<bpffs>/<service>/<listener>/`):
//!
//! | map            | type                                   | key                         | value                 |
//! |----------------|----------------------------------------|-----------------------------|-----------------------|
//! | `CONTROL`      | `ARRAY` (1 entry, mmapable)            | `0`                         | [`Control`] as `u64`  |
//! | `GENERATIONS`  | `ARRAY_OF_MAPS` of `REUSEPORT_SOCKARRAY` | generation slot            | one generation's sockets |
//! | `COUNTERS`     | `PERCPU_ARRAY`                         | [`counter_index`]           | [`SocketCounters`]    |
//!
//! A generation's `REUSEPORT_SOCKARRAY` is created fresh by user space for every
//! generation, filled, pinned as `gen-<N>`, and stored in slot `N % GENERATION_SLOTS`
//! of `GENERATIONS` before the flip.
#![cfg_attr(not(test), no_std)]

/// Most sockets one generation of one listener can have (`workers * sockets_per_worker`).
pub const MAX_SOCKETS: u32 = 64;

/// Generation slots in `GENERATIONS`. At most three generations are alive at once
/// (the one draining, the one serving, the one being built), so four slots let a
/// slot be reused only after the generation that held it is gone.
pub const GENERATION_SLOTS: u32 = 4;

/// Map names, as the eBPF object declares them.
pub mod map_names {
    pub const CONTROL: &str = "CONTROL";
    pub const GENERATIONS: &str = "GENERATIONS";
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names, as the eBPF object declares them.
pub mod program_names {
    pub const SELECTOR: &str = "select_socket";
}

/// How the selector spreads datagrams over the working generation's sockets.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceMode {
    /// A fresh random socket for every datagram: even spread even when a single
    /// sender (one 4-tuple) sends everything.
    Random = 0,
    /// The kernel's 4-tuple hash modulo the socket count: one flow stays on one
    /// socket while the generation serves.
    Hash = 1,
}

impl BalanceMode {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Random),
            1 => Some(Self::Hash),
            _ => None,
        }
    }
}

/// The selector's view of which generation serves.
///
/// It travels as one little `u64` word ([`Control::to_word`]) so the flip from one
/// generation to the next is a single aligned 8-byte store on the user-space side
/// (through an mmap of the `CONTROL` map) and a single 8-byte load on the program
/// side: a datagram sees either the old generation whole or the new one whole,
/// never a slot of one with the socket count of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Slot in `GENERATIONS` whose socket array receives new datagrams.
    pub working_slot: u8,
    /// [`BalanceMode`] as its `u8`.
    pub balance_mode: u8,
    /// Sockets filled in that slot's array, indices `0..socket_count`. Zero means
    /// "no generation serves": the program leaves the choice to the kernel.
    pub socket_count: u16,
    /// Generation number, for counters and debugging only.
    pub generation: u32,
}

impl Control {
    /// No generation serves yet: every datagram gets the kernel's own choice.
    pub const NONE: Control = Control {
        working_slot: 0,
        balance_mode: BalanceMode::Random as u8,
        socket_count: 0,
        generation: 0,
    };

    /// Packs the fields with shifts, so the word means the same on either endianness.
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        (self.working_slot as u64)
            | ((self.balance_mode as u64) << 8)
            | ((self.socket_count as u64) << 16)
            | ((self.generation as u64) << 32)
    }

    #[inline(always)]
    pub const fn from_word(word: u64) -> Control {
        Control {
            working_slot: word as u8,
            balance_mode: (word >> 8) as u8,
            socket_count: (word >> 16) as u16,
            generation: (word >> 32) as u32,
        }
    }
}

/// Per-CPU counters for one socket of one generation slot.
///
/// `selected`: datagrams the selector steered to this socket.
/// `errors`: the selector chose this socket but the kernel refused it (the socket
/// had left the group); the datagram then got the kernel's own choice.
/// `fallback`: counted on socket 0 of a slot only: datagrams for which the slot had
/// no socket array, so the kernel chose.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    pub selected: u64,
    pub fallback: u64,
    pub errors: u64,
}

/// Index of (slot, socket) in `COUNTERS`.
#[inline(always)]
pub const fn counter_index(slot: u32, socket: u32) -> u32 {
    slot * MAX_SOCKETS + socket
}

/// Entries in `COUNTERS`.
pub const COUNTER_ENTRIES: u32 = GENERATION_SLOTS * MAX_SOCKETS;

/// Pin names inside `<bpffs>/<service>/<listener>/`.
pub mod pin_names {
    pub const SELECTOR: &str = "selector";
    pub const CONTROL: &str = "control";
    pub const GENERATIONS: &str = "generations";
    pub const COUNTERS: &str = "counters";
    /// Prefix of a generation's socket array: `gen-<N>`.
    pub const GENERATION_PREFIX: &str = "gen-";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: #[repr(C)], only u64 fields, no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::SocketCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_word_round_trips() {
        let control = Control {
            working_slot: 3,
            balance_mode: BalanceMode::Hash as u8,
            socket_count: 64,
            generation: 0xdead_beef,
        };
        assert_eq!(Control::from_word(control.to_word()), control);
        assert_eq!(Control::from_word(0), Control::NONE);
    }

    #[test]
    fn counter_indices_do_not_overlap() {
        assert_eq!(counter_index(1, 0), MAX_SOCKETS);
        assert_eq!(counter_index(GENERATION_SLOTS - 1, MAX_SOCKETS - 1), COUNTER_ENTRIES - 1);
    }
}

/// The XDP filter's maps contract.
pub mod xdp;
