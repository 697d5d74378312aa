//! A private bpffs directory per test, so pins of parallel tests never collide and a
//! test can check that the supervisor unpinned everything it pinned.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

/// Where bpffs is expected; the supervisor's default `bpffs` lives under it too.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure a bpffs is mounted at /sys/fs/bpf (machines of this kind boot without it).
/// Serialized so parallel tests do not stack two mounts.
pub fn ensure_bpffs() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let is_bpf = |p: &str| statfs(p).map(|s| s.filesystem_type() == BPF_FS_MAGIC);
    match is_bpf(BPFFS_ROOT) {
        Ok(true) => {}
        Ok(false) => {
            mount(
                Some("bpf"),
                BPFFS_ROOT,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("mount -t bpf bpf {BPFFS_ROOT}: {e}"));
            assert!(
                is_bpf(BPFFS_ROOT).unwrap_or(false),
                "{BPFFS_ROOT} is still not a bpffs after mounting one"
            );
        }
        Err(e) => panic!("statfs {BPFFS_ROOT}: {e}"),
    }
}

/// `/sys/fs/bpf/sup-test-<unique>`, removed recursively on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        crate::require_root();
        ensure_bpffs();
        let path = Path::new(BPFFS_ROOT).join(format!("sup-test-{}", crate::unique_suffix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        PinDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything under the directory (pins and subdirectories), depth first.
    pub fn entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = fs::read_dir(dir) else { return };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&p, out);
                }
                out.push(p);
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out.sort();
        out
    }

    /// After a clean `supervisor stop`, nothing the supervisor pinned may remain: no
    /// program, map or link pin, and no `<service>/` directory.
    pub fn assert_empty_after_stop(&self) {
        let left = self.entries();
        assert!(
            left.is_empty(),
            "pins left under {} after the supervisor stopped:\n{}",
            self.path.display(),
            left.iter()
                .map(|p| format!("  {}", p.display()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir::new()
    }
}

impl Drop for PinDir {
    /// Cleans up unconditionally (also after a failed test); whether the supervisor
    /// cleaned up itself is checked by [`PinDir::assert_empty_after_stop`], not here, so
    /// drop never panics while a test is already unwinding.
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("remove {}: {e}", self.path.display());
        }
    }
}
