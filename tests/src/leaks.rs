//! Counting what a process holds, to find leaks: its open fds by kind, the BPF maps
//! and programs behind them (from `/proc/<pid>/fdinfo`), and, through aya's `bpf()`
//! calls, pinned maps, the slots of a pinned map-in-map and whether a map id still
//! exists anywhere in the kernel.
//!
//! Per-process and per-pin counts rather than system-wide ones: other tests create
//! maps with the same names in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use aya::maps::{ArrayOfMaps, Map, MapData, MapError};
use aya::sys::SyscallError;

/// What one process has open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdCensus {
    /// Open fds per kind: `socket`, `pipe`, `anon_inode:bpf-map`, `anon_inode:[pidfd]`,
    /// a file's path, ... (the `/proc/<pid>/fd` link target with inode numbers removed).
    pub kinds: BTreeMap<String, usize>,
    /// Ids of the BPF maps behind its fds.
    pub map_ids: BTreeSet<u32>,
    /// Ids of the BPF programs behind its fds.
    pub prog_ids: BTreeSet<u32>,
    /// Ids of the BPF links behind its fds.
    pub link_ids: BTreeSet<u32>,
}

impl FdCensus {
    /// Reads `/proc/<pid>/fd` and `/proc/<pid>/fdinfo`. Fds that close while this runs
    /// are skipped.
    pub fn of(pid: u32) -> io::Result<FdCensus> {
        let mut census = FdCensus::default();
        for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
            let entry = entry?;
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            *census.kinds.entry(fd_kind(&target)).or_default() += 1;
            let info = match fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            )) {
                Ok(info) => info,
                Err(_) => continue,
            };
            for line in info.lines() {
                let mut parts = line.splitn(2, ':');
                let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(id) = value.trim().parse::<u32>() else {
                    continue;
                };
                match key {
                    "map_id" => census.map_ids.insert(id),
                    "prog_id" => census.prog_ids.insert(id),
                    "link_id" => census.link_ids.insert(id),
                    _ => false,
                };
            }
        }
        Ok(census)
    }

    /// All open fds.
    pub fn total(&self) -> usize {
        self.kinds.values().sum()
    }
}

/// `socket:[1234]` -> `socket`, `anon_inode:bpf-map` stays, paths stay.
fn fd_kind(target: &str) -> String {
    match target.find(":[") {
        Some(i)
            if target.ends_with(']')
                && target[i + 2..target.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            target[..i].to_string()
        }
        _ => target.to_string(),
    }
}

/// The kernel's description of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub max_entries: u32,
    pub name: String,
}

impl From<&aya::maps::MapInfo> for MapInfo {
    fn from(info: &aya::maps::MapInfo) -> MapInfo {
        MapInfo {
            id: info.id(),
            max_entries: info.max_entries(),
            name: String::from_utf8_lossy(info.name()).into_owned(),
        }
    }
}

/// The info of a pinned map (`BPF_OBJ_GET`, then `BPF_OBJ_GET_INFO_BY_FD`).
pub fn pinned_map_info(pin: &Path) -> io::Result<MapInfo> {
    let map = MapData::from_pin(pin).map_err(io_error)?;
    Ok(MapInfo::from(&map.info().map_err(io_error)?))
}

/// Whether a map with this id still exists anywhere in the kernel (ids are not reused
/// until the id space wraps, so a freed map's id stays unknown).
pub fn map_id_exists(id: u32) -> io::Result<bool> {
    match aya::maps::MapInfo::from_id(id) {
        Ok(_) => Ok(true),
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(io_error(e)),
    }
}

/// The occupied slots of a pinned array of maps (`BPF_MAP_TYPE_ARRAY_OF_MAPS`):
/// `(slot, id of the inner map)`.
pub fn map_in_map_slots(pin: &Path) -> io::Result<Vec<(u32, u32)>> {
    let map = Map::from_map_data(MapData::from_pin(pin).map_err(io_error)?).map_err(io_error)?;
    let array: ArrayOfMaps<MapData, MapData> = ArrayOfMaps::try_from(map).map_err(io_error)?;
    let mut slots = Vec::new();
    for slot in 0..array.len() {
        match array.get(&slot, 0) {
            Ok(inner) => slots.push((slot, inner.info().map_err(io_error)?.id())),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(slots)
}

/// An aya error as an `io::Error`, keeping the errno of a failed system call.
fn io_error(e: MapError) -> io::Error {
    match e {
        MapError::SyscallError(SyscallError { call, io_error }) => {
            io::Error::new(io_error.kind(), format!("{call}: {io_error}"))
        }
        e => io::Error::other(e),
    }
}

/// Everything under `dir`, as paths relative to it, sorted (pins and directories).
pub fn relative_entries(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
            out.push(
                p.strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_kinds_drop_inode_numbers() {
        assert_eq!(fd_kind("socket:[12345]"), "socket");
        assert_eq!(fd_kind("pipe:[7]"), "pipe");
        assert_eq!(fd_kind("anon_inode:bpf-map"), "anon_inode:bpf-map");
        assert_eq!(fd_kind("anon_inode:[pidfd]"), "anon_inode:[pidfd]");
        assert_eq!(fd_kind("/dev/null"), "/dev/null");
    }

    #[test]
    fn census_of_self_sees_an_open_file() {
        let before = FdCensus::of(std::process::id()).unwrap();
        let f = fs::File::open("/dev/null").unwrap();
        let after = FdCensus::of(std::process::id()).unwrap();
        assert!(after.total() > before.total(), "{before:?} {after:?}");
        assert!(after.kinds.contains_key("/dev/null"), "{after:?}");
        drop(f);
    }
}
