//! User space's half of the maps contract (the other half is `supervisor-ebpf`,
//! the shared layouts are in `supervisor-common`).
//!
//! One [`ListenerDataplane`] per `[[listen]]`: the selector program and its maps,
//! pinned under `<bpffs>/<service>/<listener>/`, plus the operations the upgrade
//! state machine needs: build a generation's socket array, put it in a slot, flip
//! the control word, read the counters, retire a generation.
use std::{
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuValues, ReusePortSockArray},
    programs::{SkReuseport, sk_reuseport::SkReuseportAttachType},
    util::nr_cpus,
};
use supervisor_common::{
    COUNTER_ENTRIES, Control, FlowCounters, FlowEntry, FlowKey, GENERATION_SLOTS, MAX_SOCKETS,
    ProbeTarget, Settings, SocketCounters, control_index, counter_index, map_names, pin_names,
    program_names,
};

use crate::{dataplane::Dataplane, ebpf::SELECTOR_OBJECT, error::InputError, sys::ControlWord};

/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` from the kernel's uapi.
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

pub struct ListenerDataplane {
    pub listener: String,
    pub dir: PathBuf,
    /// The selector, opened from its pin.
    program: SkReuseport,
    generations: ArrayOfMaps<MapData, MapData>,
    /// A second fd on `GENERATIONS`, for deleting slots (see `sys::bpf_map_delete_u32`).
    generations_fd: std::os::fd::OwnedFd,
    counters: PerCpuArray<MapData, SocketCounters>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flow_counters: PerCpuArray<MapData, FlowCounters>,
    flow_capacity: u32,
    probes: HashMap<MapData, u16, ProbeTarget>,
    control: ControlWord,
    /// How far the flow clock runs behind `CLOCK_MONOTONIC_COARSE`: the time the
    /// clock word stood still because no supervisor ran (see `tick_clock`).
    flow_clock_lag_ms: u64,
}

/// One generation's `REUSEPORT_SOCKARRAY` for one listener, pinned as `gen-<N>`.
pub struct GenerationArray {
    pub generation: u32,
    pub slot: u32,
    pub pin: PathBuf,
    _map: MapData,
}

impl Drop for GenerationArray {
    fn drop(&mut self) {
        self.unpin();
    }
}

impl GenerationArray {
    /// Opens generation `generation`'s pinned socket array (after a re-exec).
    pub fn adopt(dir: &Path, generation: u32, slot: u32) -> Result<GenerationArray> {
        let pin = dir.join(format!("{}{generation}", pin_names::GENERATION_PREFIX));
        let map = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        Ok(GenerationArray {
            generation,
            slot,
            pin,
            _map: map,
        })
    }

    /// Removes the `gen-<N>` pin. The map itself lives on while the `GENERATIONS`
    /// slot still refers to it (until a later generation takes the slot); its
    /// sockets leave it by themselves when they close.
    fn unpin(&self) {
        if let Err(e) = std::fs::remove_file(&self.pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove pin {}: {e}", self.pin.display());
        }
    }
}

impl ListenerDataplane {
    /// Loads the selector for one listener and pins it with its maps in `dir`.
    ///
    /// Pins left by a supervisor that died are replaced: the caller holds the
    /// service's lock, so nothing else uses them, and its workers (and with them
    /// the sockets those pins referred to) died with it.
    pub fn load(listener: &str, dir: &Path, flow_table_size: u32) -> Result<ListenerDataplane> {
        if dir.exists() {
            tracing::info!("removing stale pins in {}", dir.display());
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove stale pins in {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create pin directory {}", dir.display()))?;
        let result = Self::load_into(listener, dir, flow_table_size);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        result
    }

    fn load_into(listener: &str, dir: &Path, flow_table_size: u32) -> Result<ListenerDataplane> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, flow_table_size)
            .override_global(map_names::FLOW_TABLE_SIZE_GLOBAL, &flow_table_size, true)
            .load(SELECTOR_OBJECT)
            .map_err(|e| {
            if is_permission_error(&e) {
                anyhow::Error::new(InputError::new(format!(
                    "missing privileges for bpf(): loading the selector failed ({e}); run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
                )))
            } else {
                anyhow::Error::new(e).context("loading the selector's eBPF object")
            }
        })?;
        let program: &mut SkReuseport = ebpf
            .program_mut(program_names::SELECTOR)
            .context("the eBPF object has no selector program")?
            .try_into()?;
        program
            .load()
            .context("the kernel refused the selector program")?;
        program
            .pin(dir.join(pin_names::SELECTOR))
            .context("pinning the selector program")?;

        let take = |ebpf: &mut Ebpf, name: &str, pin: &str| -> Result<Map> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))?;
            let path = dir.join(pin);
            map_data(&map)
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            Ok(map)
        };
        for (name, pin) in [
            (map_names::CONTROL, pin_names::CONTROL),
            (map_names::GENERATIONS, pin_names::GENERATIONS),
            (map_names::COUNTERS, pin_names::COUNTERS),
            (map_names::FLOWS, pin_names::FLOWS),
            (map_names::FLOW_COUNTERS, pin_names::FLOW_COUNTERS),
        ] {
            take(&mut ebpf, name, pin)?;
        }
        take(&mut ebpf, map_names::PROBES, pin_names::PROBES)?;
        // Everything is pinned: from here on this run holds the same handles a
        // re-exec'd supervisor adopts.
        drop(ebpf);
        let mut dataplane = Self::adopt(listener, dir)?;
        dataplane
            .control
            .store(control_index::WORD, Control::NONE.to_word());
        dataplane.flow_clock_lag_ms = 0;
        dataplane
            .control
            .store(control_index::CLOCK_MS, monotonic_coarse_ms());
        Ok(dataplane)
    }

    /// Opens a listener's selector and maps from their pins in `dir`, as they are:
    /// traffic keeps flowing through them while a supervisor re-execs.
    pub fn adopt(listener: &str, dir: &Path) -> Result<ListenerDataplane> {
        let open = |pin: &str| -> Result<Map> {
            let path = dir.join(pin);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Map::from_map_data(data)
                .with_context(|| format!("{} is not a map this build knows", path.display()))
        };
        let program =
            SkReuseport::from_pin(dir.join(pin_names::SELECTOR), SkReuseportAttachType::Select)
                .with_context(|| format!("opening the selector pinned in {}", dir.display()))?;
        let control = open(pin_names::CONTROL)?;
        let generations = open(pin_names::GENERATIONS)?;
        let flows = open(pin_names::FLOWS)?;
        let generations_fd = map_data(&generations)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the GENERATIONS fd")?;
        let flow_capacity = map_data(&flows)
            .info()
            .map(|info| info.max_entries())
            .unwrap_or(0);
        let control = ControlWord::map(
            map_data(&control).fd().as_fd(),
            control_index::ENTRIES as usize,
        )
        .context("mapping the selector's control word")?;
        // A clock word that is not 0 stood still from the moment the supervisor
        // that ticked it died (or exec'd) until now: resume it from there.
        let flow_clock_lag_ms = match control.load(control_index::CLOCK_MS) {
            0 => 0,
            stopped_at => monotonic_coarse_ms().saturating_sub(stopped_at),
        };
        Ok(ListenerDataplane {
            listener: listener.to_string(),
            dir: dir.to_path_buf(),
            program,
            generations: ArrayOfMaps::try_from(generations)?,
            generations_fd,
            counters: PerCpuArray::try_from(open(pin_names::COUNTERS)?)?,
            flows: HashMap::try_from(flows)?,
            flow_counters: PerCpuArray::try_from(open(pin_names::FLOW_COUNTERS)?)?,
            flow_capacity,
            probes: HashMap::try_from(open(pin_names::PROBES)?)?,
            control,
            flow_clock_lag_ms,
        })
    }

    /// The settings the selector uses now: those of the working slot.
    pub fn settings(&self) -> Settings {
        self.slot_settings(self.working().working_slot.into())
    }

    /// The settings stored with the generation in `slot`.
    pub fn slot_settings(&self, slot: u32) -> Settings {
        Settings::from_word(self.control.load(control_index::SLOT_SETTINGS + slot))
    }

    /// The selector's idea of now for flow ages: the clock word, or the same
    /// clock read here when the word is not ticking.
    fn flow_clock_ms(&self) -> u64 {
        match self.control.load(control_index::CLOCK_MS) {
            0 => monotonic_coarse_ms().saturating_sub(self.flow_clock_lag_ms),
            now => now,
        }
    }

    fn zero_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        for socket in 0..MAX_SOCKETS {
            let zeros = PerCpuValues::try_from(vec![SocketCounters::default(); cpus])?;
            self.counters
                .set(counter_index(slot, socket), zeros, 0)
                .context("zeroing counters")?;
        }
        Ok(())
    }
}

/// The clock the selector's flow table runs on, in milliseconds. Never 0 (0 means
/// "not ticking" to the selector).
fn monotonic_coarse_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
        .max(1)
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(m)
        | Map::LruHashMap(m)
        | Map::HashMap(m)
        | Map::ArrayOfMaps(m)
        | Map::PerCpuArray(m)
        | Map::ReusePortSockArray(m) => m,
        other => panic!("unexpected map kind {other:?}"),
    }
}

fn is_permission_error(error: &aya::EbpfError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl crate::dataplane::InstalledArray for GenerationArray {}

/// The real dataplane: the pinned selector, its maps, and real sockets.
impl crate::dataplane::Dataplane for ListenerDataplane {
    fn listener(&self) -> &str {
        &self.listener
    }

    fn bind_socket(
        &self,
        listener: &crate::config::ListenerConfig,
    ) -> Result<std::os::fd::OwnedFd> {
        crate::sockets::bind_reuseport(listener.address, listener.receive_buffer, &listener.name)
    }

    /// Attaches the selector to the reuseport group `socket` belongs to. Idempotent:
    /// the group keeps one program, and every socket that joins it later uses it.
    fn attach(&self, socket: BorrowedFd<'_>) -> Result<()> {
        self.program
            .attach(socket)
            .context("attaching the selector to the socket group (SO_ATTACH_REUSEPORT_EBPF)")
    }

    /// Creates generation `generation`'s fresh socket array holding `sockets` at
    /// indices 0.., pins it as `gen-<N>`, zeroes the slot's counters and stores it,
    /// with the generation's `settings`, in the slot. The selector does not look at
    /// the slot until [`Self::flip`] names it.
    fn install_generation(
        &mut self,
        generation: u32,
        slot: u32,
        sockets: &[BorrowedFd<'_>],
        settings: Settings,
    ) -> Result<Box<dyn crate::dataplane::InstalledArray>> {
        anyhow::ensure!(slot < GENERATION_SLOTS, "slot {slot} out of range");
        anyhow::ensure!(sockets.len() as u32 <= MAX_SOCKETS, "too many sockets");
        let name = format!("{}{generation}", pin_names::GENERATION_PREFIX);
        let obj =
            aya_obj::Map::new_from_params(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 4, MAX_SOCKETS, 0);
        // Kernel map names allow [A-Za-z0-9_.] only; the pin keeps the dash.
        let map_data = MapData::create(obj, &format!("gen_{generation}"), None)
            .with_context(|| format!("creating the socket array for generation {generation}"))?;
        let mut map = Map::ReusePortSockArray(map_data);
        {
            let mut array = ReusePortSockArray::try_from(&mut map)?;
            for (index, socket) in sockets.iter().enumerate() {
                array.set(index as u32, socket, 0).with_context(|| {
                    format!("adding socket {index} to generation {generation}'s socket array")
                })?;
            }
        }
        let Map::ReusePortSockArray(map_data) = map else {
            unreachable!("constructed as a ReusePortSockArray above")
        };
        let pin = self.dir.join(&name);
        map_data
            .pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        let array = GenerationArray {
            generation,
            slot,
            pin,
            _map: map_data,
        };
        self.zero_counters(slot)?;
        // Before the slot is filled: from here on flow entries and cookies that
        // name an older generation in this slot are stale.
        self.control
            .store(control_index::SLOT_GENERATION + slot, u64::from(generation));
        self.control
            .store(control_index::SLOT_SETTINGS + slot, settings.to_word());
        self.generations
            .set(slot, &array._map, 0)
            .with_context(|| format!("storing generation {generation} in slot {slot}"))?;
        Ok(Box::new(array))
    }

    /// Empties a slot once its generation is gone, so the kernel frees its socket array.
    fn clear_slot(&self, slot: u32) {
        self.control.store(control_index::SLOT_GENERATION + slot, 0);
        if let Err(e) = crate::sys::bpf_map_delete_u32(self.generations_fd.as_fd(), slot) {
            tracing::warn!("clearing generation slot {slot}: {e}");
        }
    }

    /// The atomic switch: from the next datagram on, the selector reads `control`,
    /// and with it the settings of the slot it names (stored by
    /// [`Self::install_generation`]).
    fn flip(&self, control: Control) {
        self.control.store(control_index::WORD, control.to_word());
    }

    fn working(&self) -> Control {
        Control::from_word(self.control.load(control_index::WORD))
    }

    /// Steers datagrams from the probe socket bound to `source` to socket `socket`
    /// of `slot` (see `ProbeTarget`).
    fn add_probe(&mut self, source: std::net::SocketAddr, slot: u32, socket: u32) -> Result<()> {
        let mut addr = [0u32; 4];
        let family = match source.ip() {
            std::net::IpAddr::V4(ip) => {
                addr[0] = u32::from_ne_bytes(ip.octets());
                4
            }
            std::net::IpAddr::V6(ip) => {
                for (word, chunk) in addr.iter_mut().zip(ip.octets().chunks_exact(4)) {
                    *word = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
                }
                6
            }
        };
        let target = ProbeTarget {
            addr,
            family,
            slot: slot as u8,
            socket: socket as u16,
        };
        // The key is the port as it stands in the packet (network byte order).
        self.probes
            .insert(source.port().to_be(), target, 0)
            .context("registering a readiness probe")?;
        Ok(())
    }

    fn remove_probe(&mut self, source: std::net::SocketAddr) {
        let _ = self.probes.remove(&source.port().to_be());
    }

    /// Turns the selector's probe lookup on or off.
    fn set_probing(&self, active: bool) {
        self.control
            .store(control_index::PROBE_ACTIVE, u64::from(active));
    }

    /// Advances the selector's clock word (see `control_index::CLOCK_MS`), or with
    /// `running == false` stops it (0: the selector reads the kernel's clock,
    /// the same CLOCK_MONOTONIC_COARSE, so entries stamped either way compare).
    ///
    /// While no supervisor runs nobody advances the word and flows do not age: a
    /// supervisor that takes over resumes the clock where it stood (`adopt`) rather
    /// than jumping it to the real time, which would age every flow by the time the
    /// supervisor was gone and expire them all at once if that was longer than
    /// `flow_idle`, busy ones too. The flow clock then runs that far behind the
    /// kernel's, so it is never stopped to 0 (the kernel's own clock) again.
    fn tick_clock(&self, running: bool) {
        let now = if running || self.flow_clock_lag_ms != 0 {
            monotonic_coarse_ms().saturating_sub(self.flow_clock_lag_ms)
        } else {
            0
        };
        self.control.store(control_index::CLOCK_MS, now);
    }

    /// Flow-table entries per generation that are not idle yet.
    fn live_flows(&self) -> std::collections::BTreeMap<u32, u64> {
        let idle_ms = u64::from(self.settings().flow_idle_ms);
        let now = self.flow_clock_ms();
        let mut flows = std::collections::BTreeMap::new();
        for entry in self.flows.iter().flatten() {
            let (_, value) = entry;
            if now.saturating_sub(value.last_seen_ms) < idle_ms {
                *flows.entry(value.generation).or_insert(0) += 1;
            }
        }
        flows
    }

    /// The flow and cookie stages' counters, summed over CPUs.
    fn flow_counters(&self) -> FlowCounters {
        match self.flow_counters.get(&0, 0) {
            Ok(values) => values
                .iter()
                .fold(FlowCounters::default(), |sum, c| FlowCounters {
                    new_flows: sum.new_flows + c.new_flows,
                    first_seen: sum.first_seen + c.first_seen,
                    socket_gone: sum.socket_gone + c.socket_gone,
                    expired: sum.expired + c.expired,
                    cookie_invalid: sum.cookie_invalid + c.cookie_invalid,
                    insert_failed: sum.insert_failed + c.insert_failed,
                }),
            Err(_) => FlowCounters::default(),
        }
    }

    /// Entries in the flow table (live or idle) and its capacity.
    fn flow_table_usage(&self) -> (u64, u32) {
        let entries = self.flows.keys().flatten().count() as u64;
        let capacity = self.flow_capacity;
        (entries, capacity)
    }

    /// The selector's counters for one socket of a slot, summed over CPUs.
    fn counters(&self, slot: u32, socket: u32) -> SocketCounters {
        let index = counter_index(slot, socket);
        debug_assert!(index < COUNTER_ENTRIES);
        match self.counters.get(&index, 0) {
            Ok(values) => values
                .iter()
                .fold(SocketCounters::default(), |sum, c| SocketCounters {
                    selected: sum.selected + c.selected,
                    fallback: sum.fallback + c.fallback,
                    errors: sum.errors + c.errors,
                    affinity_hits: sum.affinity_hits + c.affinity_hits,
                }),
            Err(e) => {
                tracing::warn!("reading counters: {e}");
                SocketCounters::default()
            }
        }
    }

    /// Removes this listener's pins (on shutdown).
    fn unpin_all(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}
