//! A new build's selector taking over a reuseport group that an older build's
//! selector steers (on re-exec, or when a supervisor adopts pins it finds).
//!
//! The pinned program is compared with this build's by the kernel's program tag
//! (a hash of the instructions with map references masked out). When they
//! differ, or a pinned map's definition is not this build's:
//!
//! 1. this build's program is loaded against the pinned maps whose definition
//!    (type, key and value size, entries, flags) is unchanged; a map whose
//!    definition changed is created new and filled from the pinned one first:
//!    the control words, the generation slots (the same socket arrays, stored in
//!    the new `GENERATIONS`), the flow table and the readiness probes where the
//!    entry layout is the same; counters start at 0;
//! 2. the program is attached to the group with `SO_ATTACH_REUSEPORT_EBPF` on one
//!    of its sockets, which replaces the group's program in one step: every
//!    datagram runs either the old program or the new one, and both steer to the
//!    same sockets;
//! 3. the new maps, then the program, are pinned under `<pin>.new` and renamed
//!    over the old pins, so whoever opens the pins next gets the new set.
//!
//! A change of the socket arrays' own definition (`GENERATIONS`' inner map) is
//! not migrated: the serving generation's arrays are the kernel's only record of
//! draining sockets. Such a build is refused here, and the old selector keeps
//! running until the service is restarted.
use std::{
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, Map, MapData},
    programs::{ProgramInfo, SkReuseport},
};
use supervisor_common::{FlowEntry, FlowKey, ProbeTarget, map_names, pin_names, program_names};

use crate::{
    ebpf::SELECTOR_OBJECT,
    maps::ListenerDataplane,
    selector_layout::{MapDefinition, PINNED_MAPS, SelectorLayout},
};

/// What [`take_effect`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Swap {
    /// The pinned selector is this build's: nothing to do.
    Unchanged,
    Replaced {
        old_tag: u64,
        new_tag: u64,
        /// The maps created new and filled from the pinned ones (empty: all reused).
        migrated: Vec<String>,
    },
}

impl std::fmt::Display for Swap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Swap::Unchanged => f.write_str("selector unchanged"),
            Swap::Replaced {
                old_tag,
                new_tag,
                migrated,
            } if migrated.is_empty() => write!(
                f,
                "selector replaced: tag {old_tag:016x} -> {new_tag:016x}, maps reused"
            ),
            Swap::Replaced {
                old_tag,
                new_tag,
                migrated,
            } => write!(
                f,
                "selector replaced: tag {old_tag:016x} -> {new_tag:016x}, maps migrated ({}; counters start at 0)",
                migrated.join(", ")
            ),
        }
    }
}

/// Makes this build's selector the one in `dir` and in the group `group` belongs
/// to, then opens the listener's dataplane from the pins. A swap that cannot be
/// made is logged and the pinned selector kept: it still steers correctly.
pub fn adopt_current(
    listener: &str,
    dir: &Path,
    group: &[BorrowedFd<'_>],
) -> Result<ListenerDataplane> {
    match take_effect(dir, group) {
        Ok(Swap::Unchanged) => {}
        Ok(swap) => tracing::info!("listener {listener}: {swap}"),
        Err(e) => tracing::warn!(
            "listener {listener}: keeping the pinned selector of the previous build: {e:#}"
        ),
    }
    ListenerDataplane::adopt(listener, dir)
}

/// Replaces the pinned selector in `dir` (and the program of the reuseport group
/// `group`'s sockets belong to) with this build's, if it is not this build's.
/// `group` may be empty: the pins are replaced and the next generation's attach
/// uses the new program.
pub fn take_effect(dir: &Path, group: &[BorrowedFd<'_>]) -> Result<Swap> {
    let layout = SelectorLayout::of_this_build()?;
    let old_tag = ProgramInfo::from_pin(dir.join(pin_names::SELECTOR))
        .with_context(|| format!("opening the selector pinned in {}", dir.display()))?
        .tag();
    let pinned = PINNED_MAPS
        .iter()
        .map(|(map, pin)| Ok((*map, MapDefinition::of_pin(&dir.join(pin))?)))
        .collect::<Result<Vec<_>>>()?;
    let changed = changed_maps(&layout, &pinned)?;
    check_generation_arrays(dir, &layout.generation_array)?;
    let flows_size = pinned
        .iter()
        .find(|(map, _)| *map == map_names::FLOWS)
        .map(|(_, def)| def.max_entries)
        .context("no FLOWS pin")?;

    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_names::FLOWS, flows_size);
    loader.override_global(map_names::FLOW_TABLE_SIZE_GLOBAL, &flows_size, true);
    let pin_paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .filter(|(map, _)| !changed.contains(map))
        .map(|(map, pin)| (*map, dir.join(pin)))
        .collect();
    for (map, path) in &pin_paths {
        loader.map_pin_path(map, path.as_path());
    }
    let mut ebpf = loader
        .load(SELECTOR_OBJECT)
        .context("loading this build's selector against the pinned maps")?;
    let program: &mut SkReuseport = ebpf
        .program_mut(program_names::SELECTOR)
        .context("the eBPF object has no selector program")?
        .try_into()?;
    program
        .load()
        .context("the kernel refused this build's selector")?;
    let new_tag = program.info()?.tag();
    if new_tag == old_tag && changed.is_empty() {
        return Ok(Swap::Unchanged);
    }

    for map in &changed {
        let pin = pin_of(map);
        let new = ebpf
            .map_mut(map)
            .with_context(|| format!("the eBPF object has no map {map}"))?;
        migrate(map, &dir.join(pin), new).with_context(|| format!("filling the new {map}"))?;
    }
    // Pinned beside the old pins first: a failure here leaves the group and the
    // pins as they were.
    let mut staged = Staged::new(dir);
    for map in &changed {
        let new = ebpf.map(map).expect("filled above");
        staged.pin(pin_of(map), |path| Ok(map_data(new)?.pin(path)?))?;
    }
    let program: &mut SkReuseport = ebpf
        .program_mut(program_names::SELECTOR)
        .expect("loaded above")
        .try_into()?;
    staged.pin(pin_names::SELECTOR, |path| Ok(program.pin(path)?))?;
    if let Some(socket) = group.first() {
        program
            .attach(socket)
            .context("attaching the new selector to the group (SO_ATTACH_REUSEPORT_EBPF)")?;
    }
    // From here on the group runs the new program. The pins follow, maps first:
    // a program pin always names a program whose maps are pinned beside it.
    staged.commit()?;
    Ok(Swap::Replaced {
        old_tag,
        new_tag,
        migrated: changed.iter().map(|m| m.to_string()).collect(),
    })
}

/// The maps whose pinned definition is not the one this build expects.
pub fn changed_maps(
    layout: &SelectorLayout,
    pinned: &[(&'static str, MapDefinition)],
) -> Result<Vec<&'static str>> {
    let mut changed = Vec::new();
    for (map, def) in pinned {
        if layout.expected(map, def)? != *def {
            changed.push(*map);
        }
    }
    Ok(changed)
}

/// Every pinned generation socket array has the inner definition this build's
/// `GENERATIONS` expects: else the new program cannot use them.
fn check_generation_arrays(dir: &Path, expected: &MapDefinition) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name
            .to_string_lossy()
            .starts_with(pin_names::GENERATION_PREFIX)
        {
            continue;
        }
        let pinned = MapDefinition::of_pin(&entry.path())?;
        if pinned != *expected {
            bail!(
                "{} ({pinned}) is not the socket array this build uses ({expected}); restart the service to change to this build's selector",
                entry.path().display()
            );
        }
    }
    Ok(())
}

fn pin_of(map: &str) -> &'static str {
    PINNED_MAPS
        .iter()
        .find(|(name, _)| *name == map)
        .map(|(_, pin)| *pin)
        .expect("only maps of PINNED_MAPS are migrated")
}

/// New objects pinned as `<pin>_new` (bpffs refuses names with a dot), renamed
/// over `<pin>` by [`Staged::commit`]: a pin name never goes missing, and names
/// the old or the new object. Dropped uncommitted, the staged pins are removed.
struct Staged<'a> {
    dir: &'a Path,
    pins: Vec<&'static str>,
}

impl<'a> Staged<'a> {
    fn new(dir: &'a Path) -> Self {
        Staged {
            dir,
            pins: Vec::new(),
        }
    }

    fn temporary(&self, pin: &str) -> PathBuf {
        self.dir.join(format!("{pin}{STAGED_SUFFIX}"))
    }

    fn pin(&mut self, pin: &'static str, pin_at: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let temporary = self.temporary(pin);
        // Left by a swap that died half-way: not referenced by anything.
        let _ = std::fs::remove_file(&temporary);
        pin_at(&temporary).with_context(|| format!("pinning {}", temporary.display()))?;
        self.pins.push(pin);
        Ok(())
    }

    fn commit(mut self) -> Result<()> {
        while !self.pins.is_empty() {
            let pin = self.pins.remove(0);
            let (temporary, path) = (self.temporary(pin), self.dir.join(pin));
            std::fs::rename(&temporary, &path).with_context(|| {
                format!("renaming {} over {}", temporary.display(), path.display())
            })?;
        }
        Ok(())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for pin in &self.pins {
            let _ = std::fs::remove_file(self.temporary(pin));
        }
    }
}

/// What a staged pin's name ends with.
pub const STAGED_SUFFIX: &str = "_new";

/// Copies into `new` what carries over from the map pinned at `old_pin`.
fn migrate(map: &str, old_pin: &Path, new: &mut Map) -> Result<()> {
    let old_def = MapDefinition::of_pin(old_pin)?;
    let new_def = MapDefinition::of_info(&map_data(new)?.info()?)?;
    let old = Map::from_map_data(
        MapData::from_pin(old_pin).with_context(|| format!("opening {}", old_pin.display()))?,
    )?;
    if !old_def.same_entries(&new_def) {
        tracing::warn!("{map}: the entry layout changed ({old_def} -> {new_def}); it starts empty");
        return Ok(());
    }
    match map {
        map_names::CONTROL => {
            let old = Array::<_, u64>::try_from(&old)?;
            let mut new = Array::<_, u64>::try_from(new)?;
            for index in 0..old_def.max_entries.min(new_def.max_entries) {
                new.set(index, old.get(&index, 0)?, 0)?;
            }
        }
        map_names::GENERATIONS => {
            let old = ArrayOfMaps::<_, MapData>::try_from(&old)?;
            let mut new = ArrayOfMaps::<_, MapData>::try_from(new)?;
            for slot in 0..old_def.max_entries.min(new_def.max_entries) {
                match old.get(&slot, 0) {
                    Ok(array) => new.set(slot, &array, 0)?,
                    Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        map_names::FLOWS => {
            let old = HashMap::<_, FlowKey, FlowEntry>::try_from(&old)?;
            let mut new = HashMap::<_, FlowKey, FlowEntry>::try_from(new)?;
            // Entries the old program adds until the switch are not copied: those
            // flows start again on the working generation, as after an idle time.
            for (key, value) in old.iter().flatten() {
                new.insert(key, value, 0)?;
            }
        }
        map_names::PROBES => {
            let old = HashMap::<_, u16, ProbeTarget>::try_from(&old)?;
            let mut new = HashMap::<_, u16, ProbeTarget>::try_from(new)?;
            for (key, value) in old.iter().flatten() {
                new.insert(key, value, 0)?;
            }
        }
        // COUNTERS, FLOW_COUNTERS: statistics, which start at 0 with the new maps.
        _ => {}
    }
    Ok(())
}

fn map_data(map: &Map) -> Result<&MapData> {
    match map {
        Map::Array(m)
        | Map::LruHashMap(m)
        | Map::HashMap(m)
        | Map::ArrayOfMaps(m)
        | Map::PerCpuArray(m)
        | Map::ReusePortSockArray(m) => Ok(m),
        other => bail!("unexpected map kind {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned_as_built(layout: &SelectorLayout) -> Vec<(&'static str, MapDefinition)> {
        PINNED_MAPS
            .iter()
            .map(|(map, _)| (*map, layout.maps[*map]))
            .collect()
    }

    #[test]
    fn the_same_definitions_reuse_every_map() {
        let layout = SelectorLayout::of_this_build().unwrap();
        let mut pinned = pinned_as_built(&layout);
        // The flow table's size is the config's, not a layout change.
        pinned[3].1.max_entries = 4096;
        assert_eq!(pinned[3].0, map_names::FLOWS);
        assert!(changed_maps(&layout, &pinned).unwrap().is_empty());
    }

    #[test]
    fn any_changed_definition_field_means_a_new_map() {
        let layout = SelectorLayout::of_this_build().unwrap();
        let edits: [fn(&mut MapDefinition); 5] = [
            |d| d.map_type += 1,
            |d| d.key_size += 4,
            |d| d.value_size += 8,
            |d| d.max_entries += 1,
            |d| d.flags ^= 1,
        ];
        for edit in edits {
            let mut pinned = pinned_as_built(&layout);
            edit(&mut pinned[2].1);
            assert_eq!(
                changed_maps(&layout, &pinned).unwrap(),
                vec![map_names::COUNTERS]
            );
        }
    }

    #[test]
    fn entries_copy_only_with_the_same_layout() {
        let layout = SelectorLayout::of_this_build().unwrap();
        let flows = layout.maps[map_names::FLOWS];
        let mut bigger = flows;
        bigger.max_entries *= 2;
        assert!(flows.same_entries(&bigger));
        let mut wider = flows;
        wider.value_size += 8;
        assert!(!flows.same_entries(&wider));
    }
}
