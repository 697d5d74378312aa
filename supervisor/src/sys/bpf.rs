//! The bpf() and membarrier() calls aya does not make for us.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// Waits for an RCU grace period: returns only after every CPU has left the RCU
/// read-side section it was in at the call, which includes every eBPF program run
/// (XDP and socket programs run inside one, with bottom halves disabled).
///
/// The XDP filter's ruleset switch uses it: after it returns, no packet can still be
/// using a ruleset slot the control word stopped pointing at before the call, so the
/// slot may be refilled. `membarrier(MEMBARRIER_CMD_GLOBAL)` is exactly
/// `synchronize_rcu()` in the kernel. It is refused on `nohz_full` kernels; the
/// caller then falls back to waiting (see `crate::xdp`).
pub fn synchronize_rcu() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: plain syscall with integer arguments and no memory effects on us.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(BPF_MAP_DELETE_ELEM)` with a `u32` key: empties a slot of the selector's
/// `GENERATIONS` array-of-maps when its generation is retired, so the kernel frees
/// that generation's socket array at once. aya 0.14 has no delete for
/// `ArrayOfMaps`. A missing entry (ENOENT) is not an error.
pub fn bpf_map_delete_u32(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    // The prefix of `union bpf_attr` used by the map element commands.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix whose key pointer
    // refers to a live u32 for the duration of the call; the kernel only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}
