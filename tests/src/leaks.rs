//! Counting what a process holds, to find leaks: its open fds by kind, the BPF maps
//! and programs behind them (from `/proc/<pid>/fdinfo`), and, through the `bpf()`
//! syscall, pinned maps, the slots of a pinned map-in-map and whether a map id
//! still exists anywhere in the kernel.
//!
//! Per-process and per-pin counts rather than system-wide ones: other tests create
//! maps with the same names in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` is at most a few hundred bytes; the kernel accepts a shorter size as
/// long as the bytes it does not know are zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr for `cmd`; pointers inside it point
    // at memory the caller keeps alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Opens a pinned BPF object.
pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// The kernel's description of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub map_type: u32,
    pub max_entries: u32,
    pub name: String,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map fd.
pub fn map_info(fd: &OwnedFd) -> io::Result<MapInfo> {
    use std::os::fd::AsRawFd;
    // struct bpf_map_info starts: type, id, key_size, value_size, max_entries,
    // map_flags (u32 each), name[16].
    let mut info = [0u8; 88];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    let name = &info[24..40];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(MapInfo {
        map_type: u32_at(0),
        id: u32_at(4),
        max_entries: u32_at(16),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
    })
}

/// The info of a pinned map.
pub fn pinned_map_info(pin: &Path) -> io::Result<MapInfo> {
    map_info(&obj_get(pin)?)
}

/// Whether a map with this id still exists anywhere in the kernel (ids are not reused
/// until the id space wraps, so a freed map's id stays unknown).
pub fn map_id_exists(id: u32) -> io::Result<bool> {
    let mut attr = Attr::new();
    attr.put_u32(0, id);
    match bpf(BPF_MAP_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            drop(owned(fd));
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The occupied slots of a pinned array of maps (`BPF_MAP_TYPE_ARRAY_OF_MAPS` with u32
/// keys): `(slot, id of the inner map)`. A lookup from user space returns the inner
/// map's id.
pub fn map_in_map_slots(pin: &Path) -> io::Result<Vec<(u32, u32)>> {
    use std::os::fd::AsRawFd;
    let fd = obj_get(pin)?;
    let info = map_info(&fd)?;
    let mut slots = Vec::new();
    for slot in 0..info.max_entries {
        let key = slot;
        let mut value = 0u32;
        let mut attr = Attr::new();
        attr.put_u32(0, fd.as_raw_fd() as u32)
            .put_u64(8, &key as *const u32 as u64)
            .put_u64(16, &mut value as *mut u32 as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => slots.push((slot, value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(slots)
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
