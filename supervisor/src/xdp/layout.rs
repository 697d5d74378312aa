//! The layout of this build's XDP maps, and whether pinned maps match it.

use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, MapInfo};
use supervisor_common::xdp::{LAYOUT_VERSION, RulesetControl, map_names, pin_names};

use crate::ebpf::XDP_OBJECT;

#[derive(Clone)]
pub(super) struct InnerDefinitions {
    pub(super) listener_ports: aya_obj::Map,
    pub(super) listeners: aya_obj::Map,
    pub(super) prefixes_v4: aya_obj::Map,
    pub(super) prefixes_v4_chunks: aya_obj::Map,
    pub(super) prefixes_v6: aya_obj::Map,
    pub(super) prefixes_v6_chunks: aya_obj::Map,
    pub(super) prefixes_v6_skips: aya_obj::Map,
    pub(super) prefixes_v6_trie: aya_obj::Map,
}

/// The map definitions of the embedded object.
pub(super) struct ObjectLayout {
    pub(super) maps: HashMap<String, aya_obj::Map>,
    pub(super) inner: InnerDefinitions,
    /// Hash of every map definition and `LAYOUT_VERSION`, never 0.
    pub(super) fingerprint: u16,
}

impl ObjectLayout {
    pub(super) fn parse() -> Result<ObjectLayout> {
        let object =
            aya_obj::Object::parse(XDP_OBJECT).context("parsing the embedded XDP object")?;
        // The same parameters without the object's BTF type ids: rulesets are
        // created without the object's BTF, and the kernel compares outer and inner
        // maps by type, sizes and flags only.
        let inner = |name: &str| -> Result<aya_obj::Map> {
            let def = object
                .maps
                .get(name)
                .and_then(|m| m.inner())
                .with_context(|| format!("the XDP object's {name} has no inner map definition"))?;
            Ok(aya_obj::Map::new_from_params(
                def.map_type(),
                def.key_size(),
                def.value_size(),
                def.max_entries(),
                def.map_flags(),
            ))
        };
        let inner = InnerDefinitions {
            listener_ports: inner(map_names::LISTENER_PORTS)?,
            listeners: inner(map_names::LISTENERS)?,
            prefixes_v4: inner(map_names::PREFIXES_V4)?,
            prefixes_v4_chunks: inner(map_names::PREFIXES_V4_CHUNKS)?,
            prefixes_v6: inner(map_names::PREFIXES_V6)?,
            prefixes_v6_chunks: inner(map_names::PREFIXES_V6_CHUNKS)?,
            prefixes_v6_skips: inner(map_names::PREFIXES_V6_SKIPS)?,
            prefixes_v6_trie: inner(map_names::PREFIXES_V6_TRIE)?,
        };
        // FNV-1a: stable across builds and Rust versions (unlike std's hasher).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        feed(&[LAYOUT_VERSION]);
        let mut names: Vec<&String> = object.maps.keys().collect();
        names.sort();
        for name in names {
            let map = &object.maps[name];
            feed(name.as_bytes());
            for m in std::iter::once(map.clone()).chain(map.inner()) {
                for v in [
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                ] {
                    feed(&v.to_le_bytes());
                }
            }
        }
        let folded = (hash ^ (hash >> 16) ^ (hash >> 32) ^ (hash >> 48)) as u16;
        Ok(ObjectLayout {
            maps: object.maps,
            inner,
            fingerprint: folded.max(1),
        })
    }
}

/// Whether every pinned map has exactly the definition this build expects and the
/// control word was written by a build with the same layout fingerprint.
pub(super) fn pins_reusable(dir: &Path, object: &ObjectLayout) -> bool {
    for (name, pin) in map_names::ALL {
        let Some(expected) = object.maps.get(name) else {
            return false;
        };
        let Ok(info) = MapInfo::from_pin(dir.join(pin)) else {
            return false;
        };
        let same = info
            .map_type()
            .is_ok_and(|t| t as u32 == expected.map_type())
            && info.key_size() == expected.key_size()
            && info.value_size() == expected.value_size()
            && info.max_entries() == expected.max_entries()
            && info.map_flags() == expected.map_flags();
        if !same {
            tracing::info!(
                "xdp: pinned map {pin} has another layout than this build's; using fresh maps"
            );
            return false;
        }
    }
    match pinned_layout(dir) {
        Some(layout) if layout == object.fingerprint => true,
        _ => {
            tracing::info!(
                "xdp: pinned maps were written by a build with another layout; using fresh maps"
            );
            false
        }
    }
}

/// The layout fingerprint in the control word pinned in `dir` (that of the build
/// that last switched a ruleset in), if the pin is there and readable.
pub(super) fn pinned_layout(dir: &Path) -> Option<u16> {
    let data = MapData::from_pin(dir.join(pin_names::CONTROL)).ok()?;
    let word = Array::<MapData, u64>::try_from(Map::Array(data))
        .ok()?
        .get(&0, 0)
        .ok()?;
    Some(RulesetControl::from_word(word).layout)
}

/// Removes every pin in `dir` but the link: the program and the maps, this build's
/// and those of builds with other layouts (a newer build's extra maps, after a
/// downgrade, would otherwise stay pinned, holding their rulesets' memory).
pub(super) fn remove_map_pins(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_name() == pin_names::LINK {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}
