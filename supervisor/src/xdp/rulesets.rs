//! Rulesets: built in fresh maps, stored in the slot the program does not use,
//! switched in with one store of the control word.

use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{Array, ArrayOfMaps, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use supervisor_common::xdp::{
    ListenerKey, ListenerRule, MAX_V6_CHUNKS, MAX_V6_SKIPS, RATE_SEED_INDEX, RATE_TICK_NS_INDEX,
    RULESET_SLOTS, RulesetControl, XdpCounter, counter,
};

use super::{XdpConfig, XdpCounters, layout::InnerDefinitions, rules};
use crate::sys::ControlWord;

/// The filter's maps, open: what installing a ruleset and reading counters need.
pub(super) struct FilterMaps {
    pub(super) layout: u16,
    pub(super) control: ControlWord,
    pub(super) listener_ports: ArrayOfMaps<MapData, MapData>,
    /// Written in place: the slot's entry, before the switch to that slot.
    pub(super) rules: Array<MapData, ListenerRule>,
    pub(super) listeners: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v4: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v4_chunks: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v6: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v6_chunks: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v6_skips: ArrayOfMaps<MapData, MapData>,
    pub(super) prefixes_v6_trie: ArrayOfMaps<MapData, MapData>,
    pub(super) counters: PerCpuArray<MapData, XdpCounter>,
    /// The inner map definitions from the object, for building rulesets that the
    /// outer maps accept.
    pub(super) inner: InnerDefinitions,
    /// The rate table; pinned, kept open only so the filter owns all its maps.
    pub(super) _rate: Map,
}

/// A ruleset built in fresh maps by [`XdpFilter::prepare`], not yet in use.
/// Dropping it discards the maps.
pub struct PreparedRuleset {
    pub(super) config: XdpConfig,
    pub(super) rule: ListenerRule,
    pub(super) listener_ports: MapData,
    pub(super) listeners: MapData,
    pub(super) prefixes_v4: MapData,
    pub(super) prefixes_v4_chunks: MapData,
    pub(super) prefixes_v6: MapData,
    pub(super) prefixes_v6_chunks: MapData,
    pub(super) prefixes_v6_skips: MapData,
    pub(super) prefixes_v6_trie: MapData,
    /// IPv4 prefixes, IPv6 prefixes, listener entries: for the log.
    pub(super) sizes: (usize, usize, usize),
    /// Whether some IPv6 lookups go to the trie (the table was full): for the log.
    pub(super) v6_asks_trie: bool,
}

impl FilterMaps {
    /// Builds a ruleset in fresh maps. Changes nothing the program sees.
    pub(super) fn build(
        &self,
        ruleset: &rules::Ruleset,
        config: &XdpConfig,
    ) -> Result<PreparedRuleset> {
        // Only names the maps (for bpftool): the generation is fixed at the switch.
        let next = RulesetControl::from_word(self.control.load(0))
            .generation
            .wrapping_add(1);
        Ok(PreparedRuleset {
            config: config.clone(),
            rule: ruleset.rule,
            listener_ports: build_array(
                &self.inner.listener_ports,
                &format!("lpt_g{next}"),
                ruleset
                    .ports
                    .iter()
                    .map(|(port, entry)| (u32::from(*port), *entry)),
            )
            .context("building the XDP listener port table")?,
            listeners: build_listeners(&self.inner.listeners, next, &ruleset.listeners)?,
            prefixes_v4: build_array(
                &self.inner.prefixes_v4,
                &format!("v4_g{next}"),
                ruleset.v4_table.first.iter().copied(),
            )
            .context("building the XDP IPv4 prefix table")?,
            prefixes_v4_chunks: build_array(
                &self.inner.prefixes_v4_chunks,
                &format!("v4c_g{next}"),
                ruleset.v4_table.chunk_entries(),
            )
            .context("building the XDP IPv4 prefix chunks")?,
            prefixes_v6: build_array(
                &self.inner.prefixes_v6,
                &format!("v6_g{next}"),
                ruleset.v6_table.first.iter().copied(),
            )
            .context("building the XDP IPv6 prefix table")?,
            prefixes_v6_chunks: build_array(
                &self.inner.prefixes_v6_chunks,
                &format!("v6c_g{next}"),
                ruleset.v6_table.chunk_entries(),
            )
            .context("building the XDP IPv6 prefix chunks")?,
            prefixes_v6_skips: build_array(
                &self.inner.prefixes_v6_skips,
                &format!("v6s_g{next}"),
                (0u32..).zip(ruleset.v6_table.skips.iter().copied()),
            )
            .context("building the XDP IPv6 prefix skips")?,
            // The trie is asked only under the table's ASK_TRIE entries; without
            // any it stays empty.
            prefixes_v6_trie: build_v6_trie(
                &self.inner.prefixes_v6_trie,
                &format!("v6t_g{next}"),
                if ruleset.v6_table.asks_trie {
                    &ruleset.v6
                } else {
                    &[]
                },
            )?,
            sizes: (ruleset.v4.len(), ruleset.v6.len(), ruleset.listeners.len()),
            v6_asks_trie: ruleset.v6_table.asks_trie,
        })
    }

    /// Stores a built ruleset in the slot the program does not use, then switches
    /// to it with one store of the control word. Returns the new generation.
    pub(super) fn switch(
        &mut self,
        prepared: &PreparedRuleset,
        readers: ReadersGone,
    ) -> Result<u32> {
        let current = RulesetControl::from_word(self.control.load(0));
        let slot = if current.armed != 0 {
            (u32::from(current.slot) + 1) % RULESET_SLOTS
        } else {
            0
        };
        let generation = current.generation.wrapping_add(1).max(1);
        if current.armed != 0 && readers.after_generation != Some(current.generation) {
            // Packets that read the word before the previous switch may still be
            // reading this slot; after a grace period none can be. The caller's
            // wait was for an earlier switch: wait here (this blocks the thread).
            ReadersGone::wait_blocking(current.generation);
        }
        self.rules
            .set(slot, prepared.rule, 0)
            .context("storing the listener rule in its ruleset slot")?;
        // Each store into an outer map returns only after an RCU grace period (the
        // kernel waits for running programs after every map-in-map update, about
        // 10-20 ms here). Made one after the other, the eight would add up to most
        // of a second-long upgrade's budget; made at once, they share the grace
        // periods. All are done before the switch below.
        let stores = [
            (
                &mut self.listener_ports,
                &prepared.listener_ports,
                "listener port table",
            ),
            (&mut self.listeners, &prepared.listeners, "listener table"),
            (
                &mut self.prefixes_v4,
                &prepared.prefixes_v4,
                "IPv4 prefix table",
            ),
            (
                &mut self.prefixes_v4_chunks,
                &prepared.prefixes_v4_chunks,
                "IPv4 prefix chunks",
            ),
            (
                &mut self.prefixes_v6,
                &prepared.prefixes_v6,
                "IPv6 prefix table",
            ),
            (
                &mut self.prefixes_v6_chunks,
                &prepared.prefixes_v6_chunks,
                "IPv6 prefix chunks",
            ),
            (
                &mut self.prefixes_v6_skips,
                &prepared.prefixes_v6_skips,
                "IPv6 prefix skips",
            ),
            (
                &mut self.prefixes_v6_trie,
                &prepared.prefixes_v6_trie,
                "IPv6 prefix trie",
            ),
        ];
        std::thread::scope(|scope| {
            let running: Vec<_> = stores
                .into_iter()
                .map(|(outer, inner, what)| {
                    scope.spawn(move || {
                        outer
                            .set(slot, inner, 0)
                            .with_context(|| format!("storing the XDP {what} in its ruleset slot"))
                    })
                })
                .collect();
            running
                .into_iter()
                .try_for_each(|store| store.join().expect("a map store thread panicked"))
        })?;
        // The switch: from the next packet on, the program reads the new slot.
        self.control.store(
            0,
            RulesetControl {
                slot: slot as u8,
                armed: 1,
                layout: self.layout,
                generation,
            }
            .to_word(),
        );
        let (v4, v6, listeners) = prepared.sizes;
        tracing::info!(
            "xdp: ruleset {generation} active on {} ({v4} IPv4 and {v6} IPv6 prefixes, {listeners} listener entries)",
            prepared.config.interface,
        );
        if prepared.v6_asks_trie {
            tracing::warn!(
                "xdp: the IPv6 prefixes need more than the filter's table holds ({MAX_V6_CHUNKS} chunks, {MAX_V6_SKIPS} skips); sources below the entries it could not refine are matched by a trie lookup, which costs more per datagram (docs/config.md)"
            );
        }
        Ok(generation)
    }

    pub(super) fn counters(&self) -> XdpCounters {
        let read = |index: u32| -> XdpCounter {
            match self.counters.get(&index, 0) {
                Ok(values) => values
                    .iter()
                    .fold(XdpCounter::default(), |sum, c| XdpCounter {
                        packets: sum.packets + c.packets,
                        bytes: sum.bytes + c.bytes,
                    }),
                Err(e) => {
                    tracing::warn!("xdp: reading counter {index}: {e}");
                    XdpCounter::default()
                }
            }
        };
        let all: Vec<XdpCounter> = (0..counter::COUNT).map(read).collect();
        let dropped = [
            counter::DENIED,
            counter::NOT_ALLOWED,
            counter::RATE_LIMITED,
            counter::MALFORMED,
        ];
        XdpCounters {
            passed: all[counter::PASSED as usize].packets,
            denied: all[counter::DENIED as usize].packets,
            not_allowed: all[counter::NOT_ALLOWED as usize].packets,
            rate_limited: all[counter::RATE_LIMITED as usize].packets,
            malformed: all[counter::MALFORMED as usize].packets,
            not_ours: all[counter::NOT_OURS as usize].packets,
            fragments: all[counter::FRAGMENT as usize].packets,
            dropped_bytes: dropped.iter().map(|&i| all[i as usize].bytes).sum(),
        }
    }
}

fn build_listeners(
    definition: &aya_obj::Map,
    generation: u32,
    entries: &[(ListenerKey, ListenerRule)],
) -> Result<MapData> {
    // Kernel map names: at most 15 characters of [A-Za-z0-9_.].
    let data = MapData::create(definition.clone(), &format!("lst_g{generation}"), None)
        .context("creating a listener table for the XDP filter")?;
    let mut map = Map::HashMap(data);
    {
        let mut table = aya::maps::HashMap::<_, ListenerKey, ListenerRule>::try_from(&mut map)?;
        for (key, rule) in entries {
            table
                .insert(key, rule, 0)
                .context("filling the XDP listener table")?;
        }
    }
    let Map::HashMap(data) = map else {
        unreachable!("constructed as a HashMap above")
    };
    Ok(data)
}

/// Stores the kernel's tick length (`RATE_TICK_NS_INDEX`, the program's clock
/// unit) and gives a fresh rate table its random hash seed (`RATE_SEED_INDEX`); a
/// pinned table keeps its seed, so its sources stay in their buckets across restarts.
pub(super) fn seed_rate_buckets(rate: &mut Map) -> Result<()> {
    let mut table = Array::<_, u64>::try_from(rate).context("opening the XDP rate table")?;
    // The coarse clocks advance once per tick; their resolution is the tick length.
    let tick = nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .context("reading the kernel's tick length (clock_getres)")?;
    let tick_ns = (tick.tv_sec() as u64) * 1_000_000_000 + tick.tv_nsec() as u64;
    anyhow::ensure!(
        tick_ns > 0,
        "the kernel reports a tick of 0 ns for CLOCK_MONOTONIC_COARSE"
    );
    table
        .set(RATE_TICK_NS_INDEX, tick_ns, 0)
        .context("storing the kernel's tick length for the XDP rate limit")?;
    if table.get(&RATE_SEED_INDEX, 0)? != 0 {
        return Ok(());
    }
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    table
        .set(RATE_SEED_INDEX, u64::from_ne_bytes(bytes).max(1), 0)
        .context("storing the XDP rate table's hash seed")?;
    Ok(())
}

/// A fresh inner array with these (index, value) entries; the rest stays zero.
fn build_array<T: aya::Pod>(
    definition: &aya_obj::Map,
    name: &str,
    entries: impl Iterator<Item = (u32, T)>,
) -> Result<MapData> {
    let data = MapData::create(definition.clone(), name, None).context("creating the map")?;
    let mut map = Map::Array(data);
    {
        let mut array = Array::<_, T>::try_from(&mut map)?;
        for (index, value) in entries {
            array
                .set(index, value, 0)
                .with_context(|| format!("filling entry {index}"))?;
        }
    }
    let Map::Array(data) = map else {
        unreachable!("constructed as an Array above")
    };
    Ok(data)
}

fn build_v6_trie(
    definition: &aya_obj::Map,
    name: &str,
    entries: &[(u32, [u8; 16], u32)],
) -> Result<MapData> {
    let data = MapData::create(definition.clone(), name, None)
        .context("creating an IPv6 prefix trie for the XDP filter")?;
    let mut map = Map::LpmTrie(data);
    {
        let mut trie = LpmTrie::<_, [u8; 16], u32>::try_from(&mut map)?;
        for (len, addr, verdict) in entries {
            trie.insert(&Key::new(*len, *addr), verdict, 0)
                .context("filling the XDP IPv6 prefix trie")?;
        }
    }
    let Map::LpmTrie(data) = map else {
        unreachable!("constructed as an LpmTrie above")
    };
    Ok(data)
}

/// Proof that an RCU grace period has passed since ruleset `after_generation` was
/// switched in: every packet that read the control word before that switch has
/// finished (XDP runs inside an RCU read-side section), so the slot the switch left
/// may be refilled.
pub struct ReadersGone {
    after_generation: Option<u32>,
}

impl ReadersGone {
    /// No wait done: the switch waits itself (blocking) if the slot needs it.
    /// For start-up, where the maps are usually fresh and nothing needs a wait.
    pub const NOT_WAITED: ReadersGone = ReadersGone {
        after_generation: None,
    };

    /// Waits for the grace period without blocking the event loop (the daemon's
    /// runtime has one thread; membarrier takes milliseconds, the fallback 50 ms).
    pub async fn wait(after_generation: u32) -> ReadersGone {
        match tokio::task::spawn_blocking(crate::sys::synchronize_rcu).await {
            Ok(Ok(())) => {}
            outcome => {
                tracing::debug!("xdp: membarrier: {outcome:?}; waiting instead");
                tokio::time::sleep(RCU_FALLBACK).await;
            }
        }
        ReadersGone {
            after_generation: Some(after_generation),
        }
    }

    /// The same, blocking the calling thread: for start-up and the library's
    /// one-call [`XdpFilter::apply`](super::XdpFilter::apply).
    pub fn wait_blocking(after_generation: u32) -> ReadersGone {
        if let Err(e) = crate::sys::synchronize_rcu() {
            tracing::debug!("xdp: membarrier: {e}; waiting instead");
            std::thread::sleep(RCU_FALLBACK);
        }
        ReadersGone {
            after_generation: Some(after_generation),
        }
    }
}

/// membarrier(GLOBAL) is refused on nohz_full kernels. A packet's pass through the
/// program takes microseconds; this is thousands of times that.
const RCU_FALLBACK: Duration = Duration::from_millis(50);
