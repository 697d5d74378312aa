//! One end-to-end test's private world for the bad-input, hardening and `check`
//! tests: a network namespace, a pin directory, a runtime directory and a directory
//! for config files, and the supervisor run in them to completion.
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::supervisor::supervisor_command;
use crate::{PinDir, ServiceConfig, TempDir, TestNet, output_with_timeout, require_root};

/// The address of [`World::config`]'s listener.
pub const WORLD_ADDR: &str = "127.0.0.1:5300";
/// How long one `supervisor` command may take before the test fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

pub struct World {
    pub net: TestNet,
    pub pins: PinDir,
    pub runtime: TempDir,
    /// Config files, and the commands' working directory.
    pub work: TempDir,
}

impl World {
    pub fn new() -> World {
        require_root();
        World {
            net: TestNet::new(),
            pins: PinDir::new(),
            runtime: TempDir::new("sup-run"),
            work: TempDir::new("sup-work"),
        }
    }

    pub fn addr() -> SocketAddr {
        WORLD_ADDR.parse().expect("a socket address")
    }

    /// A valid echo service (2 workers on [`WORLD_ADDR`]).
    pub fn config(&self) -> ServiceConfig {
        ServiceConfig::echo(2, Self::addr(), &self.pins, self.runtime.path())
    }

    /// Writes `text` as `<work>/<file>` and returns the path.
    pub fn write_text(&self, file: &str, text: &str) -> PathBuf {
        let path = self.work.path().join(file);
        fs::write(&path, text).unwrap();
        path
    }

    /// `[wrapper...] supervisor ARGS --config CONFIG` in the namespace, from the
    /// work directory, to completion.
    pub fn supervisor(&self, wrapper: &[&str], args: &[&str], config: &Path) -> Output {
        let mut cmd = supervisor_command(&self.net, wrapper, args, config);
        cmd.current_dir(self.work.path());
        output_with_timeout(&mut cmd, RUN_TIMEOUT)
    }

    /// No pins, no control socket or lock file of `service`, no process in the
    /// namespace.
    pub fn assert_nothing_left(&self, service: &str) {
        let pins = self.pins.entries();
        assert!(pins.is_empty(), "pins left behind: {pins:?}");
        for file in [format!("{service}.sock"), format!("{service}.lock")] {
            let path = self.runtime.path().join(file);
            assert!(
                fs::symlink_metadata(&path).is_err(),
                "{} left behind",
                path.display()
            );
        }
        let procs = self.net.cmdlines();
        assert!(
            procs.is_empty(),
            "processes left in the namespace: {procs:?}"
        );
    }
}

impl Default for World {
    fn default() -> World {
        World::new()
    }
}
