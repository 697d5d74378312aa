//! Per-program cost from the kernel's BPF statistics, and a "no program" baseline on
//! the very same sockets.
//!
//! With statistics enabled the kernel adds the run time of every program invocation to
//! the program's `run_time_ns` and counts it in `run_cnt`; the delta of both over a
//! measured burst of traffic is the honest per-datagram cost of the selector (no
//! sampling, no instrumentation inside the program).
//!
//! The floor every selector pays (the cost of running any `SK_REUSEPORT` program at all)
//! comes from an empty program the benchmark loads itself
//! ([`crate::sys::load_floor_program`]), attached to a plain reuseport group with
//! [`attach_floor`] and measured the same way.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::{ProgramInfo, loaded_programs};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

use crate::sys;
pub use crate::sys::XdpClock;

/// The selector's program name (`supervisor_common::program_names::SELECTOR`).
pub const SELECTOR_NAME: &str = "select_socket";
/// The selector's pin inside `<bpffs>/<service>/<listener>/`
/// (`supervisor_common::pin_names::SELECTOR`).
pub const SELECTOR_PIN: &str = "selector";

/// A program's cumulative statistics at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgStats {
    /// What happened between `before` and `self`: (runs, ns per run).
    pub fn since(&self, before: &ProgStats) -> (u64, Option<f64>) {
        let runs = self.run_cnt.saturating_sub(before.run_cnt);
        let ns = self.run_time_ns.saturating_sub(before.run_time_ns);
        (runs, (runs > 0).then(|| ns as f64 / runs as f64))
    }
}

/// Turns the kernel's BPF run-time statistics on for as long as the returned fd is open
/// (`BPF_ENABLE_STATS`).
///
/// Used instead of writing `kernel.bpf_stats_enabled`: the kernel counts the holders and
/// turns statistics off by itself when the last fd closes, even if this process is
/// killed, so there is no sysctl to restore and a concurrent user of the sysctl is not
/// disturbed. While the fd is open the sysctl reads 1.
pub fn enable_stats() -> io::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(io::Error::other)
}

/// `kernel.bpf_stats_enabled` as it reads now.
pub fn stats_sysctl() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The id of the selector program of one listener of a running supervisor.
///
/// First by its pin (`<pins>/<service>/<listener>/selector`), which names exactly this
/// run's program; failing that (a changed pin layout), by the `prog_id:` lines of the
/// supervisor's own fds in `/proc/<pid>/fdinfo`, keeping programs named
/// [`SELECTOR_NAME`].
pub fn find_selector(
    pins: &Path,
    service: &str,
    listener: &str,
    supervisor_pid: u32,
) -> Result<u32, String> {
    let pin: PathBuf = pins.join(service).join(listener).join(SELECTOR_PIN);
    if let Ok(info) = ProgramInfo::from_pin(&pin)
        && info.name_as_str() == Some(SELECTOR_NAME)
    {
        return Ok(info.id());
    }
    let mut ids = Vec::new();
    let dir = format!("/proc/{supervisor_pid}/fdinfo");
    for e in fs::read_dir(&dir)
        .map_err(|e| format!("read {dir}: {e}"))?
        .flatten()
    {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = fdinfo_field(&text, "prog_id") {
            ids.push(id as u32);
        }
    }
    let found: Vec<u32> = loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()) && p.name_as_str() == Some(SELECTOR_NAME))
        .map(|p| p.id())
        .collect();
    match found.as_slice() {
        [id] => Ok(*id),
        [] => Err(format!(
            "no program named {SELECTOR_NAME} at {} nor among the fds of pid {supervisor_pid}",
            pin.display()
        )),
        many => Err(format!(
            "{} programs named {SELECTOR_NAME} held by pid {supervisor_pid}: {many:?}",
            many.len()
        )),
    }
}

/// Statistics of the loaded program with this id.
pub fn prog_stats(id: u32) -> Result<ProgStats, String> {
    loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| ProgStats {
            run_time_ns: p.run_time().as_nanos() as u64,
            run_cnt: p.run_count(),
        })
        .ok_or_else(|| format!("program {id} is no longer loaded"))
}

fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// A throw-away member of the `SO_REUSEPORT` group bound to `addr` (in the calling
/// thread's network namespace). Closing it leaves the group, and whatever program it
/// attached or detached stays as it is: the program belongs to the group.
fn group_member(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(fd)
}

/// Loads the empty `SK_REUSEPORT` program ([`crate::sys::load_floor_program`]: it
/// selects nothing, so the kernel picks by its own hash, as with no program) and
/// attaches it to the `SO_REUSEPORT` group bound to `addr` in the calling thread's
/// network namespace, through a throw-away member that leaves again at once. Returns
/// the program's fd, to keep until it has been measured, and its id for [`prog_stats`].
///
/// As with [`detach_group_program`], do it before traffic starts.
pub fn attach_floor(addr: SocketAddr) -> Result<(OwnedFd, u32), String> {
    let program = sys::load_floor_program().map_err(|e| format!("load the floor program: {e}"))?;
    let id = program_id(&program)?;
    let member = group_member(addr).map_err(|e| format!("join the group at {addr}: {e}"))?;
    sys::attach_reuseport_program(member.as_fd(), program.as_fd())
        .map_err(|e| format!("attach the floor program to the group at {addr}: {e}"))?;
    drop(member);
    Ok((program, id))
}

/// Loads the selection floor ([`crate::sys::load_select_first_program`]: one
/// `bpf_sk_select_reuseport` for socket 0 of the `REUSEPORT_SOCKARRAY` pinned at
/// `sockarray`, nothing else) and attaches it to the group bound to `addr`, like
/// [`attach_floor`]. Returns the program's fd and id.
pub fn attach_select_first(addr: SocketAddr, sockarray: &Path) -> Result<(OwnedFd, u32), String> {
    let map = aya::maps::MapData::from_pin(sockarray)
        .map_err(|e| format!("open {}: {e}", sockarray.display()))?;
    let program = sys::load_select_first_program(map.fd().as_fd())
        .map_err(|e| format!("load the select-first program: {e}"))?;
    let id = program_id(&program)?;
    let member = group_member(addr).map_err(|e| format!("join the group at {addr}: {e}"))?;
    sys::attach_reuseport_program(member.as_fd(), program.as_fd())
        .map_err(|e| format!("attach the select-first program to the group at {addr}: {e}"))?;
    drop(member);
    Ok((program, id))
}

/// Loads the empty XDP program ([`crate::sys::load_xdp_drop_program`]: it drops every
/// packet) and attaches it to interface `ifindex` of the calling thread's network
/// namespace, natively or in generic mode. Returns the program's and the link's fds
/// (closing the link detaches it) and the program's id for [`prog_stats`].
pub fn attach_xdp_floor(ifindex: u32, native: bool) -> Result<(OwnedFd, OwnedFd, u32), String> {
    let program =
        sys::load_xdp_drop_program().map_err(|e| format!("load the empty XDP program: {e}"))?;
    let id = program_id(&program)?;
    let link = sys::attach_xdp_link(program.as_fd(), ifindex, native).map_err(|e| {
        format!(
            "attach the empty XDP program ({} mode): {e}",
            if native { "native" } else { "generic" }
        )
    })?;
    Ok((program, link, id))
}

/// A floor for part of the XDP filter's work, loaded next to the empty program.
pub enum XdpLookupFloor<'a> {
    /// A clock helper (when `clock`) and one lookup of a `key_len`-byte source
    /// key (when not 0) that hits in an `LRU_HASH` with `u64` values, like the
    /// filter's `RATE` (20-byte keys): with both, the least a per-source rate limit
    /// pays.
    RateEntry {
        clock: Option<XdpClock>,
        key_len: u32,
    },
    /// One lookup of `source` in an `LPM_TRIE` holding these IPv4 prefixes
    /// (prefix length, address): what one trie walk costs.
    PrefixTrie {
        prefixes: &'a [(u32, [u8; 4])],
        source: [u8; 4],
    },
}

/// Loads a lookup floor ([`crate::sys::load_xdp_lookup_program`] over a map built
/// here) and attaches it to interface `ifindex` like [`attach_xdp_floor`]. Returns
/// the map (to keep until measured), the program's and the link's fds, and the
/// program's id.
pub fn attach_xdp_lookup_floor(
    ifindex: u32,
    native: bool,
    floor: XdpLookupFloor<'_>,
) -> Result<(aya::maps::Map, OwnedFd, OwnedFd, u32), String> {
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH};
    const BPF_F_NO_PREALLOC: u32 = 1;
    let (map, key, clock, name): (Map, Vec<u8>, Option<XdpClock>, &[u8]) = match floor {
        XdpLookupFloor::RateEntry { clock, key_len: 0 } => {
            let program = sys::load_xdp_lookup_program(None, &[0; 4], clock, b"xdp_clock")
                .map_err(|e| format!("load the clock floor: {e}"))?;
            let id = program_id(&program)?;
            let link = sys::attach_xdp_link(program.as_fd(), ifindex, native)
                .map_err(|e| format!("attach the clock floor: {e}"))?;
            // An unused map, so every floor returns the same shape.
            let def = aya_obj::Map::new_from_params(BPF_MAP_TYPE_LRU_HASH as u32, 4, 8, 16, 0);
            let data = MapData::create(def, "floor_none", None)
                .map_err(|e| format!("create the floor's map: {e}"))?;
            return Ok((Map::LruHashMap(data), program, link, id));
        }
        XdpLookupFloor::RateEntry { clock, key_len } => {
            let def = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_LRU_HASH as u32,
                key_len,
                8,
                64 * 1024,
                0,
            );
            let data = MapData::create(def, "floor_rate", None)
                .map_err(|e| format!("create the floor's LRU hash: {e}"))?;
            let mut map = Map::LruHashMap(data);
            let key = vec![0u8; key_len as usize];
            match key_len {
                20 => HashMap::<_, [u8; 20], u64>::try_from(&mut map)
                    .and_then(|mut m| m.insert([0; 20], 0, 0)),
                8 => HashMap::<_, [u8; 8], u64>::try_from(&mut map)
                    .and_then(|mut m| m.insert([0; 8], 0, 0)),
                _ => HashMap::<_, [u8; 4], u64>::try_from(&mut map)
                    .and_then(|mut m| m.insert([0; 4], 0, 0)),
            }
            .map_err(|e| format!("fill the floor's LRU hash: {e}"))?;
            (map, key, clock, b"xdp_rate_entry")
        }
        XdpLookupFloor::PrefixTrie { prefixes, source } => {
            let def = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_LPM_TRIE as u32,
                8,
                4,
                16 * 1024,
                BPF_F_NO_PREALLOC,
            );
            let data = MapData::create(def, "floor_trie", None)
                .map_err(|e| format!("create the floor's LPM trie: {e}"))?;
            let mut map = Map::LpmTrie(data);
            {
                let mut trie = LpmTrie::<_, [u8; 4], u32>::try_from(&mut map)
                    .map_err(|e| format!("open the floor's LPM trie: {e}"))?;
                for (len, addr) in prefixes {
                    trie.insert(&Key::new(*len, *addr), 1, 0)
                        .map_err(|e| format!("fill the floor's LPM trie: {e}"))?;
                }
            }
            let mut key = 32u32.to_ne_bytes().to_vec();
            key.extend_from_slice(&source);
            (map, key, None, b"xdp_one_trie")
        }
    };
    let fd = match &map {
        Map::LruHashMap(d) | Map::LpmTrie(d) => d.fd().as_fd(),
        _ => unreachable!("built above as one of these"),
    };
    let program = sys::load_xdp_lookup_program(Some(fd), &key, clock, name)
        .map_err(|e| format!("load the lookup floor: {e}"))?;
    let id = program_id(&program)?;
    let link = sys::attach_xdp_link(program.as_fd(), ifindex, native)
        .map_err(|e| format!("attach the lookup floor: {e}"))?;
    Ok((map, program, link, id))
}

/// The kernel's id of the program behind `program` (the `prog_id:` line of its fdinfo).
fn program_id(program: &OwnedFd) -> Result<u32, String> {
    let path = format!("/proc/self/fdinfo/{}", program.as_raw_fd());
    let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    fdinfo_field(&text, "prog_id")
        .map(|id| id as u32)
        .ok_or_else(|| format!("no prog_id in {path}"))
}

/// Detaches the program of the `SO_REUSEPORT` group bound to `addr` (in the calling
/// thread's network namespace): from then on the kernel picks sockets by its own 4-tuple
/// hash, as if no program had ever been attached.
///
/// The program belongs to the group, not to a socket, so any member may detach it: a
/// throw-away socket joins the group, detaches it, and leaves again. This lets the
/// benchmark compare the very same supervisor sockets and workers with and without the
/// selector. Do it before traffic starts: while it is a member, the kernel may hand the
/// throw-away socket a datagram, which would then be lost.
pub fn detach_group_program(addr: SocketAddr) -> io::Result<()> {
    let fd = group_member(addr)?;
    sys::detach_reuseport_program(fd.as_fd())?;
    drop(fd);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields_parse() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t21\nprog_id:\t42\nrun_time_ns:\t1234\nrun_cnt:\t10\n";
        assert_eq!(fdinfo_field(text, "prog_id"), Some(42));
        assert_eq!(fdinfo_field(text, "run_time_ns"), Some(1234));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(text, "map_id"), None);
        let a = ProgStats {
            run_time_ns: 1000,
            run_cnt: 10,
        };
        let b = ProgStats {
            run_time_ns: 3000,
            run_cnt: 30,
        };
        assert_eq!(b.since(&a), (20, Some(100.0)));
        assert_eq!(a.since(&a), (0, None));
    }
}
