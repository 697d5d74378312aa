//! Who else is there: the UDP sockets bound in this network namespace, the
//! processes that hold a socket or a lock, and what those processes are.
//!
//! Read from `/proc` as text rather than asked over `NETLINK_SOCK_DIAG`: the
//! tables are small and read only when the supervisor is about to bind (start and
//! upgrade), `/proc/net/udp{,6}` carries all that is needed (local address, uid,
//! inode), and the part sock_diag cannot do either, mapping a socket to the
//! processes holding it, is a walk over `/proc/<pid>/fd` whichever way the socket
//! was found. No raw netlink code, and no `unsafe`.
use std::{
    collections::HashSet,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

/// One line of `/proc/net/udp` or `/proc/net/udp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSocket {
    pub local: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

/// The UDP sockets of one family in the calling process's network namespace.
pub fn udp_sockets(ipv6: bool) -> io::Result<Vec<UdpSocket>> {
    let path = if ipv6 {
        "/proc/self/net/udp6"
    } else {
        "/proc/self/net/udp"
    };
    Ok(parse_udp_table(&fs::read_to_string(path)?, ipv6))
}

/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`;
/// addresses as the kernel's in-memory words in hex (so byte-swapped on
/// little-endian hosts), the port in host order. Lines that do not parse are
/// skipped.
fn parse_udp_table(text: &str, ipv6: bool) -> Vec<UdpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (address, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if ipv6 {
                if address.len() != 32 {
                    return None;
                }
                let mut octets = [0u8; 16];
                for (word, chunk) in octets.chunks_exact_mut(4).enumerate() {
                    let hex = address.get(word * 8..word * 8 + 8)?;
                    chunk.copy_from_slice(&u32::from_str_radix(hex, 16).ok()?.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                let word = u32::from_str_radix(address, 16).ok()?;
                IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
            };
            Some(UdpSocket {
                local: SocketAddr::new(ip, port),
                uid: fields.get(7)?.parse().ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Socket inodes behind the open fds of `pid` (`"self"` for this process).
pub fn socket_inodes(pid: &str) -> HashSet<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|entry| fs::read_link(entry.path()).ok())
        .filter_map(|target| socket_inode(&target))
        .collect()
}

/// `socket:[1234]` -> 1234.
fn socket_inode(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Pids of the processes (that this process can see) holding socket `inode`.
pub fn socket_holders(inode: u64) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| socket_inodes(&pid.to_string()).contains(&inode))
        .collect();
    pids.sort_unstable();
    pids
}

/// The fd numbers of `pid` that are sockets, with their inodes.
pub fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut fds: Vec<(i32, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            Some((fd, socket_inode(&fs::read_link(entry.path()).ok()?)?))
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat`
/// field 22). With the pid it names one process for the whole boot: a pid can be
/// reused, the pair cannot.
/// None for a zombie: it has exited, holds no fd, and only waits for its parent
/// (a dead supervisor's workers are reaped by whoever inherits them).
pub fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/<pid>/stat` line, unless field 3 (the state) says
/// zombie. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses: fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    // Field 22 is 19 fields after the state.
    fields.nth(18)?.parse().ok()
}

/// Pids holding a `flock` on the file with device `dev` and inode `inode`, from
/// `/proc/locks`.
pub fn flock_holders(dev: u64, inode: u64) -> Vec<i32> {
    let text = fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_locks(
        &text,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        inode,
    )
}

/// `1: FLOCK  ADVISORY  WRITE 1234 fe:00:5538084 0 EOF` (device numbers in hex);
/// waiters (`1: -> FLOCK ...`) hold nothing and are left out.
/// Whether anyone holds an flock on the file `dev`/`inode` in `/proc/locks`'s
/// `text` (`None`: nobody), and who (pids as this process sees them; a holder in
/// another pid namespace may show as 0, and is still a holder).
pub fn flock_holders_in(text: &str, dev: u64, inode: u64) -> Option<Vec<i32>> {
    let pids = parse_locks(
        text,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        inode,
    );
    (!pids.is_empty()).then_some(pids)
}

fn parse_locks(text: &str, major: u64, minor: u64, inode: u64) -> Vec<i32> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // A blocked waiter's line has "->" after the number: not a holder.
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid: i32 = fields.get(4)?.parse().ok()?;
            let mut id = fields.get(5)?.split(':');
            let (ma, mi, ino) = (id.next()?, id.next()?, id.next()?);
            let matches = u64::from_str_radix(ma, 16).ok()? == major
                && u64::from_str_radix(mi, 16).ok()? == minor
                && ino.parse::<u64>().ok()? == inode;
            matches.then_some(pid)
        })
        .collect()
}

/// `pid 1234 (/usr/bin/echo-worker --flag)`: a process as messages name it.
/// Whether this process has capability bit `cap` in its effective set (`CapEff`
/// in `/proc/self/status`); false when that cannot be read.
pub fn has_effective_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| parse_cap_eff(&text))
        .is_some_and(|set| cap < 64 && set & (1u64 << cap) != 0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

pub fn describe(pid: i32) -> String {
    let command = fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|c| !c.is_empty())
        .or_else(|| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_string())
        });
    match command {
        Some(mut command) => {
            if command.chars().count() > 80 {
                command = command.chars().take(77).collect::<String>() + "...";
            }
            // One line, whatever the command line holds.
            let command: String = command
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("pid {pid} ({command})")
        }
        None => format!("pid {pid}"),
    }
}

/// The value of `key` in the environment `pid` was started with, if readable.
pub fn environment_value(pid: i32, key: &str) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|&b| b == 0).find_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        let (k, v) = entry.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn parses_the_udp_tables() {
        let v4 = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                  1234: 0100007F:14B4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 403613 2 0000000000000000 0\n\
                  5: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 77 2 0000000000000000 0\n";
        let sockets = parse_udp_table(v4, false);
        assert_eq!(
            sockets,
            vec![
                UdpSocket {
                    local: "127.0.0.1:5300".parse().unwrap(),
                    uid: 0,
                    inode: 403613
                },
                UdpSocket {
                    local: "0.0.0.0:53".parse().unwrap(),
                    uid: 101,
                    inode: 77
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                  1: 00000000000000000000000001000000:14B4 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0\n";
        assert_eq!(
            parse_udp_table(v6, true),
            vec![UdpSocket {
                local: "[::1]:5300".parse().unwrap(),
                uid: 0,
                inode: 99
            }]
        );
        assert!(parse_udp_table("header\ngarbage line\n", false).is_empty());
    }

    #[test]
    fn parses_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 26355 fe:00:15892483 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 27418 00:27:403613 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 30000 00:27:403613 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 27377 00:27:403613 0 EOF\n";
        assert_eq!(parse_locks(text, 0, 0x27, 403613), vec![27418]);
        assert_eq!(parse_locks(text, 0xfe, 0, 15892483), vec![26355]);
        assert!(parse_locks(text, 0, 0x27, 1).is_empty());
    }

    #[test]
    fn start_time_is_counted_from_the_last_parenthesis() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time(&stat.replace(" S ", " Z ")), None);
        let this = std::process::id() as i32;
        assert!(start_time(this).is_some());
        assert_eq!(start_time(this), start_time(this));
    }

    #[test]
    fn this_process_is_described() {
        let me = std::process::id() as i32;
        assert!(describe(me).starts_with(&format!("pid {me} (")));
    }
}

/// The parent pid of `pid`, from `/proc/PID/stat` (the field after the command
/// name, which may itself hold spaces and parentheses: parsed from the last `)`).
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_parent_pid(&stat)
}

fn parse_parent_pid(stat: &str) -> Option<i32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // " S 1234 ...": the state, then the parent pid.
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The `flags:` of fd `fd` of process `pid` (`/proc/PID/fdinfo/FD`, octal: the
/// open file's status flags and `O_CLOEXEC` for the fd).
pub fn fd_flags(pid: i32, fd: i32) -> Option<i32> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let octal = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(octal.trim(), 8).ok()
}

#[cfg(test)]
mod parent_tests {
    use super::*;

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parse_parent_pid("42 (a) b (c)) S 17 42 42 0"), Some(17));
        assert_eq!(parse_parent_pid("garbage"), None);
        assert!(parent_pid(std::process::id() as i32).is_some());
    }
}

/// The thread group (process) that thread `tid` belongs to (`Tgid:` in
/// `/proc/TID/status`; a seccomp notification names the calling thread).
pub fn thread_group(tid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}
