//! `supervisor-package-assets OUT_DIR`: the Debian package's generated files, from the
//! very clap definition `supervisor` parses its command line with (src/main.rs is
//! compiled in here as a module, so a new subcommand or option shows up without
//! touching this file):
//!
//! - `OUT_DIR/man/supervisor.1` and one page per subcommand (`supervisor-run.1`, ...),
//!   with `clap_mangen`;
//! - `OUT_DIR/completions/supervisor.bash`, `_supervisor` (zsh), `supervisor.fish`,
//!   with `clap_complete`.
//!
//! `scripts/package.sh` runs it before `cargo deb --no-build`; it is not packaged.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

// The binary's own source: its `Cli` is the command line documented here. Only the
// definition is used (its `main` and the command implementations are not).
#[allow(dead_code)]
#[path = "../main.rs"]
mod supervisor_main;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: supervisor-package-assets OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page and completion file under `out`; returns their paths.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut cmd = supervisor_main::Cli::command().name("supervisor");
    // `supervisor help` is clap's own; it gets no page.
    cmd = cmd.disable_help_subcommand(true);
    let mut files = Vec::new();

    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    files.extend(pages);

    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        files.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "supervisor",
            &completions,
        )?);
    }
    Ok(files)
}
