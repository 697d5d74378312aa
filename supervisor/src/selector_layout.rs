//! This build's selector maps as its embedded object defines them, and what is
//! pinned: the kind of a pin (program or map) and a pinned map's definition.
//!
//! Shared by the re-exec check (`handoff_check`: are the pins there and of the
//! kind this build expects?) and the selector swap (`selector_swap`: can the new
//! program reuse the pinned maps, or does it need new ones?).
use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, MapInfo};
use supervisor_common::{map_names, pin_names};

use crate::ebpf::SELECTOR_OBJECT;

/// Every selector map with its pin name, as `<bpffs>/<service>/<listener>/` holds them.
pub const PINNED_MAPS: [(&str, &str); 6] = [
    (map_names::CONTROL, pin_names::CONTROL),
    (map_names::GENERATIONS, pin_names::GENERATIONS),
    (map_names::COUNTERS, pin_names::COUNTERS),
    (map_names::FLOWS, pin_names::FLOWS),
    (map_names::FLOW_COUNTERS, pin_names::FLOW_COUNTERS),
    (map_names::PROBES, pin_names::PROBES),
];

/// What the kernel compares when a program is loaded against a map, or an inner
/// map is stored in an outer one: a map's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDefinition {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapDefinition {
    pub fn of_object(map: &aya_obj::Map) -> MapDefinition {
        MapDefinition {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }

    pub fn of_pin(path: &Path) -> Result<MapDefinition> {
        let info =
            MapInfo::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
        Self::of_info(&info).with_context(|| format!("{}", path.display()))
    }

    pub fn of_info(info: &MapInfo) -> Result<MapDefinition> {
        Ok(MapDefinition {
            map_type: info
                .map_type()
                .map(|t| t as u32)
                .context("unknown map type")?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// Whether entries can be copied from one map to the other as they are.
    pub fn same_entries(&self, other: &MapDefinition) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }
}

impl std::fmt::Display for MapDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The selector object's map definitions (by map name) and `GENERATIONS`' inner one.
pub struct SelectorLayout {
    pub maps: HashMap<String, MapDefinition>,
    pub generation_array: MapDefinition,
}

impl SelectorLayout {
    pub fn of_this_build() -> Result<SelectorLayout> {
        let object =
            aya_obj::Object::parse(SELECTOR_OBJECT).context("parsing the embedded selector")?;
        let inner = object
            .maps
            .get(map_names::GENERATIONS)
            .and_then(|m| m.inner())
            .context("the selector's GENERATIONS has no inner map definition")?;
        Ok(SelectorLayout {
            maps: object
                .maps
                .iter()
                .map(|(name, map)| (name.clone(), MapDefinition::of_object(map)))
                .collect(),
            generation_array: MapDefinition::of_object(&inner),
        })
    }

    /// The definition a pinned map must have for this build to use it. `FLOWS` is
    /// sized by the config (`flow_table_size`), not by the object: its pinned size
    /// is taken as it is.
    pub fn expected(&self, map: &str, pinned: &MapDefinition) -> Result<MapDefinition> {
        let mut expected = *self
            .maps
            .get(map)
            .with_context(|| format!("the selector object has no map {map}"))?;
        if map == map_names::FLOWS {
            expected.max_entries = pinned.max_entries;
        }
        Ok(expected)
    }
}

/// What a bpffs pin holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinKind {
    Program,
    Map,
    Link,
}

impl std::fmt::Display for PinKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinKind::Program => "a program",
            PinKind::Map => "a map",
            PinKind::Link => "a link",
        })
    }
}

/// The kind of object pinned at `path`, from the anonymous inode the kernel
/// names its fd after (`anon_inode:bpf-map`, `bpf-prog`, `bpf_link`).
pub fn pin_kind(path: &Path) -> Result<PinKind> {
    if !path.exists() {
        bail!("{} is missing", path.display());
    }
    // BPF_OBJ_GET opens any kind of pinned object; only the fd is used here.
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("reading what {} holds", path.display()))?;
    let target = target.to_string_lossy();
    if target.contains("bpf-map") {
        Ok(PinKind::Map)
    } else if target.contains("bpf-prog") {
        Ok(PinKind::Program)
    } else if target.contains("bpf_link") || target.contains("bpf-link") {
        Ok(PinKind::Link)
    } else {
        bail!("{} holds {target}, not a BPF object", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_defines_every_pinned_map() {
        let layout = SelectorLayout::of_this_build().unwrap();
        for (map, _) in PINNED_MAPS {
            assert!(layout.maps.contains_key(map), "{map}");
        }
        // REUSEPORT_SOCKARRAY of MAX_SOCKETS u32 -> u32 entries.
        assert_eq!(layout.generation_array.map_type, 20);
        assert_eq!(
            layout.generation_array.max_entries,
            supervisor_common::MAX_SOCKETS
        );
    }

    #[test]
    fn flows_size_comes_from_the_pin() {
        let layout = SelectorLayout::of_this_build().unwrap();
        let mut pinned = layout.maps[map_names::FLOWS];
        pinned.max_entries = 12345;
        assert_eq!(layout.expected(map_names::FLOWS, &pinned).unwrap(), pinned);
        let mut control = layout.maps[map_names::CONTROL];
        control.max_entries += 1;
        assert_ne!(
            layout.expected(map_names::CONTROL, &control).unwrap(),
            control
        );
    }
}
