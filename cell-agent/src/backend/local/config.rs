//! [`LocalConfig`]: where the local backend keeps its files, how it sandboxes jobs and which
//! resource limits it applies.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whether job steps run inside a `bwrap` (bubblewrap) sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Use `bwrap` when it is installed and works here; otherwise run unsandboxed and say so
    /// loudly (one warning per backend).
    #[default]
    Auto,
    /// Use `bwrap`; when it is missing or broken, every attempt fails as
    /// `Infra{RunnerCrash}` with a line saying why, rather than running unisolated.
    Required,
    /// Never sandbox (trusted jobs, development machines).
    Off,
}

/// Per-process resource limits, applied with the shell's `ulimit` before each step's script.
///
/// A limit is only ever lowered: when the current hard limit is already below the requested
/// value (the sandbox drops the capability needed to raise it), the stricter current limit
/// stays and the step runs normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU seconds per process (`ulimit -t`). `None` by default: the limit counts every thread
    /// of a process, so a parallel compiler reaches an hour of CPU in minutes, and the job's
    /// own `timeout` already bounds wall-clock time.
    pub cpu_secs: Option<u64>,
    /// Open file descriptors per process (`ulimit -n`); 65 536 by default.
    pub open_files: Option<u64>,
    /// Processes (`ulimit -u`); 16 384 by default. The kernel counts every process and thread
    /// of the agent's user, across all jobs, and does not enforce it at all for root, so it
    /// only stops fork bombs when the agent runs as a dedicated unprivileged user.
    pub processes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_secs: None,
            open_files: Some(default_open_files()),
            processes: Some(default_processes()),
        }
    }
}

fn default_open_files() -> u64 {
    65_536
}

fn default_processes() -> u64 {
    16_384
}

fn default_checkout_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// How the local backend runs attempts. Build one with [`LocalConfig::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// Parent of the per-attempt workspaces (`<work_dir>/<job>-<fence>`); by default
    /// `<data_dir>/workspaces`.
    pub work_dir: PathBuf,
    /// Cache of bare git mirrors, one per repository URL; by default `<data_dir>/mirrors`.
    pub mirror_dir: PathBuf,
    /// Directories the sandbox replaces with an empty tmpfs so jobs cannot read them; by
    /// default the agent's data directory (which holds every workspace and mirror).
    /// `work_dir` and `mirror_dir` are added when no entry covers them. Each job still sees
    /// its own workspace and, read-only, the mirror its checkout came from.
    /// Add anything else on the host a job must not read (credentials, `/run` when it holds
    /// sockets such as `docker.sock`: a read-only mount does not stop `connect()`).
    pub hidden_dirs: Vec<PathBuf>,
    /// Whether to sandbox steps with `bwrap`.
    pub sandbox: SandboxMode,
    /// The `bwrap` executable; `None` searches `PATH`.
    pub bwrap_path: Option<PathBuf>,
    /// Per-process resource limits.
    pub limits: Limits,
    /// Keep each attempt's workspace after it finishes (for debugging); `false` by default.
    pub keep_workspaces: bool,
    /// Longest the checkout (mirror clone or fetch plus workspace clone) may take. The job's
    /// own timeout only starts with its first step, so a hung fetch needs its own bound;
    /// 15 minutes by default. Exceeding it fails the attempt as `Infra{RunnerCrash}`.
    pub checkout_timeout: Duration,
}

impl LocalConfig {
    /// The defaults, with every directory under `data_dir`.
    pub fn new(data_dir: impl AsRef<Path>) -> Self {
        let data_dir = data_dir.as_ref();
        Self {
            work_dir: data_dir.join("workspaces"),
            mirror_dir: data_dir.join("mirrors"),
            hidden_dirs: vec![data_dir.to_path_buf()],
            sandbox: SandboxMode::default(),
            bwrap_path: None,
            limits: Limits::default(),
            keep_workspaces: false,
            checkout_timeout: default_checkout_timeout(),
        }
    }

    /// Checks what can be checked without touching the file system.
    pub fn validate(&self) -> Result<(), LocalConfigError> {
        for (field, path) in [
            ("work_dir", &self.work_dir),
            ("mirror_dir", &self.mirror_dir),
        ]
        .into_iter()
        .chain(self.hidden_dirs.iter().map(|p| ("hidden_dirs", p)))
        {
            if !path.is_absolute() {
                return Err(LocalConfigError::RelativePath {
                    field,
                    path: path.clone(),
                });
            }
        }
        for (which, value) in [
            ("cpu_secs", self.limits.cpu_secs),
            ("open_files", self.limits.open_files),
            ("processes", self.limits.processes),
        ] {
            if value == Some(0) {
                return Err(LocalConfigError::ZeroLimit { which });
            }
        }
        if self.checkout_timeout.is_zero() {
            return Err(LocalConfigError::ZeroCheckoutTimeout);
        }
        Ok(())
    }
}

/// Why a [`LocalConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalConfigError {
    /// Paths are bind-mounted into the sandbox by name, so they must not depend on the
    /// agent's working directory.
    #[error("{field} must be an absolute path, not {}", path.display())]
    RelativePath {
        /// The field.
        field: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A limit of zero would kill or refuse every step.
    #[error("limits.{which} must be at least 1 (leave it unset for no limit)")]
    ZeroLimit {
        /// The limit.
        which: &'static str,
    },
    /// A zero checkout timeout would fail every checkout.
    #[error("checkout_timeout must be longer than zero")]
    ZeroCheckoutTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_put_everything_under_the_data_dir_and_hide_it() {
        let config = LocalConfig::new("/var/lib/flotilla");
        assert_eq!(config.work_dir, Path::new("/var/lib/flotilla/workspaces"));
        assert_eq!(config.mirror_dir, Path::new("/var/lib/flotilla/mirrors"));
        assert_eq!(config.hidden_dirs, vec![PathBuf::from("/var/lib/flotilla")]);
        assert_eq!(config.sandbox, SandboxMode::Auto);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn relative_paths_and_zero_limits_are_refused() {
        let mut config = LocalConfig::new("data");
        assert!(matches!(
            config.validate(),
            Err(LocalConfigError::RelativePath {
                field: "work_dir",
                ..
            })
        ));
        config = LocalConfig::new("/data");
        config.limits.processes = Some(0);
        assert_eq!(
            config.validate(),
            Err(LocalConfigError::ZeroLimit { which: "processes" })
        );
    }
}
