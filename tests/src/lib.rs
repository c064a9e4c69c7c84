//! `flotilla-tests`: multi-process integration tests of Flotilla (ARCHITECTURE §2).
//!
//! The tests in `tests/` run the real `flotilla` binary as users and operators do. This library
//! holds what they share: finding (and if needed building) that binary, and the workspace root
//! that example files are named relative to. Later issues add clusters of real processes on
//! loopback here (federators, cell agents) and the real servers they talk to.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root: where `examples/` lives and where commands are run from.
///
/// Read from `CARGO_MANIFEST_DIR` at run time (cargo and nextest set it for test binaries)
/// rather than baked in at compile time: clones that share one target directory can reuse
/// each other's test binaries, and a baked-in path would point into the other clone.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    Path::new(&manifest_dir)
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The path of an up-to-date `flotilla` binary.
///
/// `CARGO_BIN_EXE_*` only exists for tests inside the binary's own package, so this asks
/// cargo (the same one running the tests, with the same target directory) to build it and
/// report where it put it. When nothing changed that is a fraction of a second. Set
/// `FLOTILLA_BIN` to test a binary built elsewhere.
pub fn flotilla_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FLOTILLA_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--package",
                "flotilla",
                "--bin",
                "flotilla",
            ])
            .arg("--message-format=json")
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building flotilla failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-artifact")
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the flotilla executable")
    })
}

/// A `flotilla` command run from the workspace root.
pub fn flotilla() -> Command {
    let mut cmd = Command::new(flotilla_bin());
    cmd.current_dir(workspace_root());
    cmd
}
