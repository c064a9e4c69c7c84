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

/// What a finished `flotilla` command left: its exit code and its output.
#[derive(Debug)]
pub struct Run {
    /// The exit code.
    pub code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `flotilla ARGS` from the workspace root to the end.
pub fn run(args: &[&str]) -> Run {
    let out = flotilla().args(args).output().expect("run flotilla");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A real `flotilla dev` process for tests (see `tests/dev.rs`).
pub mod dev {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::time::Instant;

    use super::flotilla_bin;

    /// A running `flotilla dev`, stopped with SIGINT.
    #[derive(Debug)]
    pub struct Dev {
        child: tokio::process::Child,
        /// The base URL (no `/api/v1`).
        pub url: String,
        /// The admin token it printed.
        pub token: String,
    }

    impl Dev {
        /// Starts `flotilla dev --http 127.0.0.1:0 --data-dir DATA EXTRA…` and waits for the URL
        /// and token it prints.
        pub async fn start(data: &Path, extra: &[&str]) -> Dev {
            let mut child = tokio::process::Command::new(flotilla_bin())
                .args(["dev", "--http", "127.0.0.1:0", "--data-dir"])
                .arg(data)
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let (mut url, mut token) = (None, None);
            let deadline = Instant::now() + Duration::from_secs(60);
            while url.is_none() || token.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "flotilla dev printed no URL and token"
                );
                let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                    .await
                    .unwrap()
                    .unwrap()
                    .expect("flotilla dev exited early");
                if let Some(rest) = line.trim().strip_prefix("API:") {
                    url = Some(
                        rest.split_whitespace()
                            .next()
                            .unwrap()
                            .trim_end_matches("/api/v1")
                            .to_owned(),
                    );
                }
                if let Some(rest) = line.trim().strip_prefix("Admin token:") {
                    token = Some(rest.trim().to_owned());
                }
            }
            // Keep draining stdout so the process never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Dev {
                child,
                url: url.unwrap(),
                token: token.unwrap(),
            }
        }

        /// Stops it with Ctrl-C (SIGINT) and checks it exits cleanly.
        pub async fn stop(mut self) {
            let pid = self.child.id().unwrap();
            Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap();
            let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .expect("flotilla dev did not stop on Ctrl-C")
                .unwrap();
            assert!(status.success(), "flotilla dev exited with {status}");
        }
    }
}
