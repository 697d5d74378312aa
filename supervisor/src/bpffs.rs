//! Making sure the configured `bpffs` directory is on a BPF filesystem.
//!
//! bpffs is mounted only where nothing is: on an empty directory (the configured
//! one, or one created for it), or at the standard `/sys/fs/bpf` when that is not
//! mounted yet and the configured path is below it. A directory that holds files
//! and is not on bpffs is refused: mounting over it would hide them.
use std::path::{Path, PathBuf};

use anyhow::Result;
use nix::{
    mount::{MsFlags, mount, umount},
    sys::statfs::statfs,
};

use crate::error::InputError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// capabilities(7) bit numbers.
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// Where every tool expects bpffs.
const STANDARD: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// A bpffs with nothing pinned in it: empty but for the files the kernel's
/// `bpf_preload` puts in every new mount.
fn is_unused_bpffs(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|entries| {
        entries.flatten().all(|entry| {
            matches!(
                entry.file_name().to_str(),
                Some("maps.debug" | "progs.debug")
            )
        })
    })
}

/// What [`prepare`] changed on the host, so that a start that fails later can undo
/// it: a bpffs mount it made and the directories it created.
#[must_use = "a failed start must undo what prepare did"]
#[derive(Debug, Default)]
pub struct Prepared {
    mounted: Option<PathBuf>,
    /// Created directories, outermost first.
    created: Vec<PathBuf>,
    /// [`check`]: decide as [`prepare`] would, change nothing.
    dry_run: bool,
}

impl Prepared {
    /// Undoes [`prepare`]: unmounts what it mounted (only while nothing is pinned
    /// in it any more: another service may have pinned there meanwhile) and removes
    /// the directories it created (only while they are empty).
    pub fn undo(self) {
        if let Some(mount_point) = &self.mounted
            && is_unused_bpffs(mount_point)
            && let Err(e) = umount(mount_point)
        {
            tracing::warn!("cannot unmount bpffs at {}: {e}", mount_point.display());
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Mounts bpffs where needed and creates `dir` on it: for the service's pin root
/// (`service.bpffs`), whose refusals name `key` (`<file>: service.bpffs`).
pub fn prepare(dir: &Path, key: &str) -> Result<Prepared> {
    let mut prepared = Prepared::default();
    match prepare_into(dir, key, &mut prepared) {
        Ok(()) => Ok(prepared),
        Err(e) => {
            prepared.undo();
            Err(e)
        }
    }
}

/// What [`prepare`] refuses, decided without creating or mounting anything
/// (`supervisor check`), with the same messages. A mount it would need is refused
/// here when this process lacks CAP_SYS_ADMIN, as the mount itself would be.
pub fn check(dir: &Path, key: &str) -> Result<()> {
    let mut prepared = Prepared {
        dry_run: true,
        ..Prepared::default()
    };
    prepare_into(dir, key, &mut prepared)
}

fn prepare_into(dir: &Path, key: &str, prepared: &mut Prepared) -> Result<()> {
    let refuse = |why: String| -> anyhow::Error { InputError::new(format!("{key}: {why}")).into() };
    if let Ok(meta) = std::fs::metadata(dir) {
        if !meta.is_dir() {
            return Err(refuse(format!("{} is not a directory", dir.display())));
        }
        if is_bpffs(dir) {
            return Ok(());
        }
        if !is_empty_dir(dir) {
            return Err(refuse(format!(
                "{} is not on a BPF filesystem and is not empty: mounting bpffs there would hide its files. \
                 Use a directory on bpffs (the default is /sys/fs/bpf/supervisor), or an empty one",
                dir.display()
            )));
        }
        return mount_bpffs(dir, key, prepared);
    }
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(refuse(format!("{} is not a directory", existing.display())));
    }
    let standard = Path::new(STANDARD);
    if !is_bpffs(existing) {
        if dir.starts_with(standard) {
            // The standard place, not mounted yet (a machine that booted without it).
            if standard.exists() && !is_empty_dir(standard) {
                return Err(refuse(format!(
                    "{STANDARD} is not a BPF filesystem and is not empty; mount bpffs there first (mount -t bpf bpf {STANDARD})"
                )));
            }
            create_dirs(standard, key, prepared)?;
            mount_bpffs(standard, key, prepared)?;
        } else {
            create_dirs(dir, key, prepared)?;
            return mount_bpffs(dir, key, prepared);
        }
    }
    create_dirs(dir, key, prepared)?;
    if prepared.dry_run && !dir.exists() {
        // Would be created on the bpffs found or mounted above.
        return Ok(());
    }
    if !is_bpffs(dir) {
        return Err(refuse(format!(
            "{} is not on a BPF filesystem",
            dir.display()
        )));
    }
    Ok(())
}

/// Creates `dir` and its missing parents, recording each one created.
fn create_dirs(dir: &Path, key: &str, prepared: &mut Prepared) -> Result<()> {
    if prepared.dry_run {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    for path in missing.into_iter().rev() {
        std::fs::create_dir(path).map_err(|e| {
            InputError::new(format!("{key}: cannot create {}: {e}", path.display()))
        })?;
        prepared.created.push(path.to_path_buf());
    }
    Ok(())
}

fn mount_bpffs(mount_point: &Path, key: &str, prepared: &mut Prepared) -> Result<()> {
    let failed = |e: nix::errno::Errno| {
        InputError::new(format!(
            "{key}: bpffs is not mounted at {} and mounting it failed: {e} (needs CAP_SYS_ADMIN, or mount it first: mount -t bpf bpf {})",
            mount_point.display(),
            mount_point.display()
        ))
    };
    if prepared.dry_run {
        // mount(2) without CAP_SYS_ADMIN fails with EPERM.
        return match crate::procfs::has_effective_capability(CAP_SYS_ADMIN) {
            true => Ok(()),
            false => Err(failed(nix::errno::Errno::EPERM).into()),
        };
    }
    // Root only, as systemd mounts /sys/fs/bpf (a new bpffs is 1777 otherwise).
    mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(failed)?;
    prepared.mounted = Some(mount_point.to_path_buf());
    tracing::info!("mounted bpffs at {}", mount_point.display());
    Ok(())
}

/// Creates `dir` (the XDP filter's pin directory, below the service's) on the bpffs
/// [`prepare`] made sure of, mounting one the same way if it is not there.
pub fn ensure(dir: &Path) -> Result<()> {
    let prepared = prepare(dir, "bpffs")?;
    // Kept: whoever called this owns what it pins there from now on.
    drop(prepared);
    Ok(())
}
