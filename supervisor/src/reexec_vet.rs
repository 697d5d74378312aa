//! The running supervisor's side of the re-exec check: before it execs a binary
//! it runs it as `<binary> handoff-check`, and execs only if the answer proves a
//! compatible supervisor (see `handoff_check` for the candidate's side).
//!
//! The candidate runs as a plain child: same uid, stdin from /dev/null, in a
//! process group of its own (killed whole on timeout), without the daemon's
//! handoff or systemd variables, and it inherits none of the daemon's fds (they
//! are all close-on-exec until `reexec::prepare`, which runs only after this).
//! Its stdout is read up to [`MAX_ANSWER`] bytes: a binary that prints endlessly
//! is refused like one that prints garbage.
use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{
    handoff_check::{PROGRAM, Proof},
    reexec::{HANDOFF_ENV, HANDOFF_FORMAT},
};

/// How long the candidate may take to answer. The event loop waits for it (the
/// dataplane and the workers do not).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of the candidate's stdout read (a proof is a few hundred bytes).
pub const MAX_ANSWER: u64 = 64 * 1024;
/// The most of its stderr kept for the refusal message.
const MAX_STDERR: u64 = 2048;

/// Runs `binary handoff-check` on `config_path`; `Err` says, naming the binary,
/// why it must not be exec'd.
pub fn vet(binary: &Path, config_path: &Path) -> Result<Proof, String> {
    vet_within(binary, config_path, CHECK_TIMEOUT)
}

pub fn vet_within(binary: &Path, config_path: &Path, timeout: Duration) -> Result<Proof, String> {
    let refuse = |why: String| format!("{} failed the handoff check: {why}", binary.display());
    let mut child = Command::new(binary)
        .arg("handoff-check")
        .arg("--config")
        .arg(config_path)
        .arg("--format")
        .arg(HANDOFF_FORMAT.to_string())
        .env_remove(HANDOFF_ENV)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| refuse(format!("cannot run it: {e}")))?;
    let stdout = read_limited(child.stdout.take(), MAX_ANSWER + 1);
    let stderr = read_limited(child.stderr.take(), MAX_STDERR);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(refuse(format!("no answer within {timeout:?} (killed)")));
            }
            Err(e) => return Err(refuse(format!("waiting for it: {e}"))),
        }
    };
    // Whatever it left running in its group must not hold the pipes open.
    kill_group(child.id());
    let answer = stdout
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let errors = stderr
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    if answer.len() as u64 > MAX_ANSWER {
        return Err(refuse(format!(
            "its answer is longer than {MAX_ANSWER} bytes: not a supervisor's handoff proof"
        )));
    }
    let text = String::from_utf8_lossy(&answer);
    let proof: Proof = match serde_json::from_str(text.trim()) {
        Ok(proof) => proof,
        Err(_) => {
            let said = first_line(&text).or_else(|| first_line(&String::from_utf8_lossy(&errors)));
            return Err(refuse(format!(
                "it is not a supervisor with `handoff-check` (exit {}, {})",
                status
                    .code()
                    .map_or_else(|| "killed by a signal".to_string(), |c| c.to_string()),
                said.map_or_else(
                    || "no answer".to_string(),
                    |line| format!("it said: {line:?}")
                )
            )));
        }
    };
    let proof = judge(proof).map_err(refuse)?;
    tracing::info!(
        "{} passed the handoff check: supervisor {}, reads handoff format {HANDOFF_FORMAT}, pins as it expects",
        binary.display(),
        proof.version
    );
    Ok(proof)
}

/// Whether a proof allows the handoff this supervisor would write.
pub fn judge(proof: Proof) -> Result<Proof, String> {
    if proof.program != PROGRAM {
        return Err(format!("it is {:?}, not a supervisor", proof.program));
    }
    if !proof.reads(HANDOFF_FORMAT) {
        return Err(format!(
            "it is supervisor {} and reads handoff format {}; this supervisor writes format {HANDOFF_FORMAT} (stop and start the service to change to that build)",
            proof.version, proof.handoff_format
        ));
    }
    if let Some(error) = &proof.config_error {
        return Err(format!("it refuses the config: {error}"));
    }
    if !proof.pin_problems.is_empty() {
        return Err(format!(
            "the service's pins are not as it expects: {} (the running supervisor keeps serving; restart the service to recreate its pins)",
            proof.pin_problems.join("; ")
        ));
    }
    Ok(proof)
}

/// Reads at most `limit` bytes of `pipe` on a thread of its own; the result
/// arrives on the channel once the pipe closes or the limit is reached.
fn read_limited(pipe: Option<impl Read + Send + 'static>, limit: u64) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.take(limit).read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
    }
    rx
}

fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn first_line(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(120).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof() -> Proof {
        Proof {
            program: PROGRAM.into(),
            version: "9.9.9".into(),
            handoff_format: HANDOFF_FORMAT,
            reads_formats: vec![HANDOFF_FORMAT],
            config_error: None,
            pin_problems: Vec::new(),
        }
    }

    #[test]
    fn a_matching_proof_passes() {
        assert!(judge(proof()).is_ok());
    }

    #[test]
    fn another_program_format_or_missing_pins_are_refused() {
        let mut other = proof();
        other.program = "impostor".into();
        assert!(judge(other).unwrap_err().contains("not a supervisor"));
        let mut other = proof();
        other.handoff_format = HANDOFF_FORMAT + 1;
        other.reads_formats = vec![HANDOFF_FORMAT + 1];
        assert!(judge(other).unwrap_err().contains("handoff format"));
        // A newer build that still reads this format is fine.
        let mut newer = proof();
        newer.handoff_format = HANDOFF_FORMAT + 1;
        newer.reads_formats = vec![HANDOFF_FORMAT, HANDOFF_FORMAT + 1];
        assert!(judge(newer).is_ok());
        let mut other = proof();
        other.pin_problems = vec!["/sys/fs/bpf/x/l/flows is missing".into()];
        assert!(judge(other).unwrap_err().contains("flows is missing"));
    }

    #[test]
    fn a_binary_that_is_not_a_supervisor_is_refused() {
        let why = vet_within(
            Path::new("/bin/true"),
            Path::new("/nonexistent"),
            CHECK_TIMEOUT,
        )
        .unwrap_err();
        assert!(
            why.contains("/bin/true") && why.contains("not a supervisor"),
            "{why}"
        );
    }

    #[test]
    fn a_binary_that_hangs_is_killed_with_its_children() {
        use std::os::unix::fs::PermissionsExt;
        let script = std::env::temp_dir().join(format!("hang-{}.sh", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\nsleep 300\necho never\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let why = vet_within(
            &script,
            Path::new("/nonexistent"),
            Duration::from_millis(300),
        );
        let _ = std::fs::remove_file(&script);
        let why = why.unwrap_err();
        assert!(why.contains("no answer within"), "{why}");
    }
}
