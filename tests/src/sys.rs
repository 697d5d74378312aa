//! Every `unsafe` block of the test harness, the benchmark and the demo, behind safe
//! functions. The crate root denies `unsafe_code` and allows it on this module only;
//! every binary and end-to-end test denies it too, so they use only these.
//!
//! What is here, and why neither std, nix nor aya does it for us:
//!
//! - [`exec_in_netns`]: joining a network namespace between fork and exec. std's only
//!   hook there is `CommandExt::pre_exec`, which is `unsafe` because the closure runs in
//!   a forked copy of a multi-threaded process; nix has `setns` but no safe way to run
//!   it in the child.
//! - [`load_floor_program`]: `bpf(BPF_PROG_LOAD)` of two raw instructions, the empty
//!   `SK_REUSEPORT` program the benchmark compares the selector with. aya only loads
//!   programs from an ELF object, and a second eBPF build for two instructions is not
//!   worth it.
//! - [`test_run_xdp`]: `bpf(BPF_PROG_TEST_RUN)` of an XDP program on one frame, many
//!   times, for the benchmark's program-alone cost rows; aya runs tests only on
//!   programs it loaded itself (its `TestRun` trait), and these are the supervisor's
//!   pinned filter and the benchmark's raw empty program.
//! - [`set_thread_credentials`]: `setgroups`/`setresgid`/`setresuid` for the calling
//!   thread only, through the raw syscalls: libc's and nix's wrappers apply them to
//!   every thread of the process (glibc's setxid broadcast), and the harness must
//!   stay root while one thread acts as another user.
//! - [`attach_reuseport_program`] and [`detach_reuseport_program`]:
//!   `SO_ATTACH_REUSEPORT_EBPF` / `SO_DETACH_REUSEPORT_BPF`. nix has no such socket
//!   option, its `SetSockOpt` trait cannot be implemented without `unsafe` either, and
//!   aya attaches `SK_REUSEPORT` programs only through its own program types.
//!
//! Everything else that used to be raw is a safe call: the load generator's
//! `sendmmsg`/`recvmmsg` batches and the XDP tests' `AF_PACKET` sender (nix), the leak
//! checks' `bpf()` lookups (aya), `sysconf` (nix).
//!
//! Each `unsafe` block states the invariant that makes it sound.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

/// Makes the child of `cmd` join the network namespace `netns` between fork and exec,
/// like `nsenter --net`. If that fails, spawning `cmd` fails with the error.
///
/// `netns` (an open `/run/netns/NAME`) moves into the command, so it stays open for as
/// long as the command can be spawned; it is close-on-exec, so the program never sees it.
pub fn exec_in_netns(cmd: &mut Command, netns: OwnedFd) {
    let hook = move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
    // SAFETY: the hook runs in the forked child, where only async-signal-safe work is
    // allowed (another thread of the parent may have held a lock, e.g. malloc's, at the
    // fork). It does one setns(2) system call on an fd the closure owns (and so is open),
    // and on failure builds an `io::Error` from the errno, which is a plain integer
    // (`Repr::Os`), so it neither allocates nor locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `bpf(2)` command numbers and constants from the kernel's uapi `linux/bpf.h`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// The attach type a plain `#[sk_reuseport]` program is loaded with (aya does the
/// same); the kernel refuses an `SK_REUSEPORT` program without one of its two.
const BPF_SK_REUSEPORT_SELECT: u32 = 39;
/// `SK_PASS` from `enum sk_action`: "no selection, let the kernel pick".
const SK_PASS: i32 = 1;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP` from `enum bpf_attach_type`: the load-time attach type of an XDP program
/// meant for an interface, and the link's attach type.
const BPF_XDP: u32 = 37;
/// `XDP_DROP` from `enum xdp_action`.
const XDP_DROP: i32 = 1;

/// One eBPF instruction (`struct bpf_insn`). Both register fields of the two
/// instructions below are r0, so the nibble order within `regs` does not matter.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`, up to
/// `expected_attach_type`. The kernel accepts a shorter attribute than its own and
/// treats the fields it does not get as zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The benchmark's floor: an `SK_REUSEPORT` program that returns without selecting a
/// socket, so the kernel picks by its own hash, as with no program at all. Its cost is
/// what running any program costs (the call, and the statistics' two clock reads), and
/// the selector's own work is its cost minus this one.
///
/// It is two instructions, `r0 = SK_PASS; exit`: exactly what the compiler makes of
/// an aya `#[sk_reuseport]` function that returns `SK_PASS`. Loading them here
/// directly keeps the supervisor binary free of a program only the benchmark uses,
/// and needs no second eBPF build.
pub fn load_floor_program() -> io::Result<OwnedFd> {
    load_return_program(
        BPF_PROG_TYPE_SK_REUSEPORT,
        BPF_SK_REUSEPORT_SELECT,
        SK_PASS,
        b"select_nothing",
    )
}

/// The XDP floor: `r0 = XDP_DROP; exit`, what any XDP program that drops a packet pays
/// at least (the driver's call, and the statistics' clock reads).
pub fn load_xdp_drop_program() -> io::Result<OwnedFd> {
    load_return_program(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_DROP, b"xdp_drop_all")
}

/// The selection floor: an `SK_REUSEPORT` program that makes one
/// `bpf_sk_select_reuseport` call for socket 0 of `sockarray` (a
/// `REUSEPORT_SOCKARRAY`) and returns `SK_PASS`: the least any program that selects
/// a socket does.
pub fn load_select_first_program(sockarray: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const MOV64_X: u8 = 0x07 | 0xb0 | 0x08;
    const MOV64_K: u8 = 0x07 | 0xb0;
    const ADD64_K: u8 = 0x07;
    const ST_MEM_W: u8 = 0x02 | 0x60;
    // BPF_LD | BPF_DW | BPF_IMM: the 16-byte 64-bit immediate load.
    const LD_IMM64: u8 = 0x18;
    const CALL: u8 = 0x05 | 0x80;
    const EXIT: u8 = 0x05 | 0x90;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
    // `regs`: destination register in the low nibble, source in the high one.
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    };
    let insns = [
        insn(MOV64_X, 6, 1, 0, 0),                                      // r6 = ctx
        insn(ST_MEM_W, 10, 0, -4, 0),                                   // key = 0
        insn(MOV64_X, 1, 6, 0, 0),                                      // r1 = ctx
        insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, sockarray.as_raw_fd()), // r2 = map
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 3, 10, 0, 0), // r3 = &key
        insn(ADD64_K, 3, 0, 0, -4),
        insn(MOV64_K, 4, 0, 0, 0), // flags
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_SELECT_REUSEPORT),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ];
    load_program(
        BPF_PROG_TYPE_SK_REUSEPORT,
        BPF_SK_REUSEPORT_SELECT,
        &insns,
        b"select_first",
    )
}

/// A clock helper an XDP floor may call (the value is the helper's number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpClock {
    /// `bpf_ktime_get_ns`: the monotonic clock, read from the clocksource.
    Ktime = 5,
    /// `bpf_ktime_get_coarse_ns`: the monotonic clock as of the last tick.
    Coarse = 160,
    /// `bpf_jiffies64`: the tick counter (inlined by the verifier on 64-bit JITs).
    Jiffies = 118,
}

/// An XDP floor that looks `key` up in `map` if given (one `bpf_map_lookup_elem`,
/// which the verifier turns into a direct call to the map type's lookup, as for the
/// filter's own maps), after a call of `clock` when given, and drops
/// the packet. `key` is stored on the stack in 4-byte words, so its length must be a
/// multiple of 4 (at most 64 bytes). With an LRU hash of 20-byte keys and the clock it
/// is the least a per-source rate limit pays; with an LPM trie, one prefix lookup.
pub fn load_xdp_lookup_program(
    map: Option<BorrowedFd<'_>>,
    key: &[u8],
    clock: Option<XdpClock>,
    name: &[u8],
) -> io::Result<OwnedFd> {
    const MOV64_X: u8 = 0x07 | 0xb0 | 0x08;
    const MOV64_K: u8 = 0x07 | 0xb0;
    const ADD64_K: u8 = 0x07;
    const ST_MEM_W: u8 = 0x02 | 0x60;
    const LD_IMM64: u8 = 0x18;
    const CALL: u8 = 0x05 | 0x80;
    const EXIT: u8 = 0x05 | 0x90;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    if !key.len().is_multiple_of(4) || key.is_empty() || key.len() > 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "key length must be a multiple of 4 from 4 to 64",
        ));
    }
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    };
    let base = -(key.len() as i16);
    let mut insns = Vec::new();
    for (i, word) in key.chunks(4).enumerate() {
        let value = i32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        insns.push(insn(ST_MEM_W, 10, 0, base + 4 * i as i16, value));
    }
    if let Some(clock) = clock {
        insns.push(insn(CALL, 0, 0, 0, clock as i32));
    }
    if let Some(map) = map {
        insns.extend([
            insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()), // r1 = map
            insn(0, 0, 0, 0, 0),
            insn(MOV64_X, 2, 10, 0, 0), // r2 = &key
            insn(ADD64_K, 2, 0, 0, i32::from(base)),
            insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        ]);
    }
    insns.extend([insn(MOV64_K, 0, 0, 0, XDP_DROP), insn(EXIT, 0, 0, 0, 0)]);
    load_program(BPF_PROG_TYPE_XDP, BPF_XDP, &insns, name)
}

/// Loads the two-instruction program `r0 = ret; exit` of type `prog_type`.
fn load_return_program(
    prog_type: u32,
    expected_attach_type: u32,
    ret: i32,
    name: &[u8],
) -> io::Result<OwnedFd> {
    const BPF_ALU64_MOV_K: u8 = 0x07 | 0xb0;
    const BPF_JMP_EXIT: u8 = 0x05 | 0x90;
    let insns = [
        Insn {
            code: BPF_ALU64_MOV_K,
            regs: 0,
            off: 0,
            imm: ret,
        },
        Insn {
            code: BPF_JMP_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    load_program(prog_type, expected_attach_type, &insns, name)
}

/// Loads `insns` as a program of type `prog_type` named `name`.
fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
    name: &[u8],
) -> io::Result<OwnedFd> {
    let license = c"MIT";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name[..len]);
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_PROG_LOAD and its
    // size is passed with it; the pointers in it (`insns`, `license`) point to live
    // memory for the duration of the call, and the kernel only reads through them
    // (no log buffer is given, so it writes nothing back). A map fd in `insns` is
    // only read, and must be open, which the caller's borrow guarantees.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_PROG_LOAD returned a new fd for the program, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The fields of `union bpf_attr` for `BPF_PROG_TEST_RUN` up to `ctx_out`.
#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
}

/// Runs the XDP `program` on `frame` `repeat` times in the kernel
/// (`BPF_PROG_TEST_RUN`) and returns (its return value, the mean run time in ns as
/// the kernel measured it). The frame is copied in each time; nothing is sent.
pub fn test_run_xdp(program: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: 0,
        data_in: frame.as_ptr() as u64,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_PROG_TEST_RUN,
    // passed with its size; `data_in` points to `frame`, alive and of
    // `data_size_in` bytes for the call, which the kernel only reads; no output
    // buffers are given (0 sizes, null pointers), so the kernel writes only `attr`'s
    // own `retval`, `duration` and size fields, which are ours for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches an XDP `program` to interface `ifindex` of the calling thread's network
/// namespace through a BPF link (native mode with `native`, else generic). The
/// program stays attached as long as the returned link fd is open.
pub fn attach_xdp_link(program: BorrowedFd<'_>, ifindex: u32, native: bool) -> io::Result<OwnedFd> {
    const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: if native {
            XDP_FLAGS_DRV_MODE
        } else {
            XDP_FLAGS_SKB_MODE
        },
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_LINK_CREATE, passed
    // with its size; it holds no pointers, and `program` is an open fd for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_LINK_CREATE returned a new fd for the link, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `program` to the `SO_REUSEPORT` group `socket` belongs to. The group
/// keeps its own reference to the program, which stays attached when `socket`
/// leaves the group.
pub fn attach_reuseport_program(socket: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(socket, libc::SO_ATTACH_REUSEPORT_EBPF, program.as_raw_fd())
}

/// Detaches the program of the `SO_REUSEPORT` group `socket` belongs to.
pub fn detach_reuseport_program(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(socket, libc::SO_DETACH_REUSEPORT_BPF, 0)
}

fn set_int_option(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a SOL_SOCKET option whose argument is one int, passed by pointer to a
    // live local with its exact size; `socket` is an open fd for the whole call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the calling thread's (and only its) credentials to `uid`/`gid`, with no
/// supplementary groups, for good. The kernel keeps credentials per thread, so
/// sockets this thread binds or listens on carry `uid`.
pub fn set_thread_credentials(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscalls with integer arguments (and a null list for setgroups
    // with size 0); they change only the calling thread's credentials.
    let results = unsafe {
        [
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        ]
    };
    if results.iter().all(|&r| r == 0) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
