//! Making sure the configured `bpffs` directory is on a BPF filesystem.
use std::path::{Path, PathBuf};

use anyhow::Result;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::statfs,
};

use crate::error::InputError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts bpffs where needed and creates `dir` on it.
///
/// If `dir` is below `/sys/fs/bpf` and that is not mounted, bpffs is mounted at
/// `/sys/fs/bpf` (where every tool expects it); otherwise at `dir` itself.
pub fn ensure(dir: &Path) -> Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        let standard = Path::new("/sys/fs/bpf");
        let mount_point: PathBuf = if dir.starts_with(standard) {
            standard.into()
        } else {
            dir.into()
        };
        std::fs::create_dir_all(&mount_point).map_err(|e| {
            InputError::new(format!(
                "bpffs: cannot create {}: {e}",
                mount_point.display()
            ))
        })?;
        tracing::info!("mounting bpffs at {}", mount_point.display());
        mount(Some("bpf"), &mount_point, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|e| {
            InputError::new(format!(
                "bpffs is not mounted at {} and mounting it failed: {e} (needs CAP_SYS_ADMIN, or mount it first: mount -t bpf bpf {})",
                mount_point.display(),
                mount_point.display()
            ))
        })?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| InputError::new(format!("bpffs: cannot create {}: {e}", dir.display())))?;
    if !is_bpffs(dir) {
        return Err(
            InputError::new(format!("{} is not on a BPF filesystem", dir.display())).into(),
        );
    }
    Ok(())
}
