//! `flotilla`: one binary for every Flotilla process and command (ARCHITECTURE §1).
//!
//! This file only parses the command line and dispatches; each command lives in its own module.

mod cell_agent;
mod cells;
mod client;
mod dev;
mod federator;
mod raft_admin;
mod runner;
mod simulate;
mod tls_args;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: under load the federator allocates from many threads at
/// once, and glibc's arena locks cost a fifth of the CPU in the consensus benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flotilla — a CI/CD control plane that places builds across many Kubernetes clusters.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check pipeline files (`.ci.yaml`) and show the jobs they expand to, stage by stage.
    ///
    /// PATH may be a pipeline file, or a directory: a directory with a `.ci.yaml` is checked
    /// through that file, any other directory through every `*.yaml`/`*.yml` file directly in
    /// it. Problems are printed as `file:line:col: message`, one per line.
    ///
    /// Exit status: 0 when every file is valid, 1 when any is not, 2 when a file cannot be read.
    Validate(validate::Args),
    /// Run the whole product on one machine with embedded defaults.
    ///
    /// A one-member federator and `--cells` local cells in one process, every piece of state
    /// under `--data-dir` (restart on the same directory to keep projects and builds). Jobs
    /// run as processes sandboxed with bubblewrap when it is installed. Prints the API URL
    /// and an admin token (also written to `<data-dir>/admin-token`). Ctrl-C stops it.
    Dev(dev::Args),
    /// Run one federator replica: today the Raft-replicated log and its admin service.
    ///
    /// First start of a new cluster: `--bootstrap` (one replica) or the same
    /// `--initial-members 1=host:port,2=…,3=…` on every replica. A replica added later:
    /// `--join ADDR` of any existing replica. Restarts need none of these: the data directory
    /// remembers the cluster. Logs go to stderr (`RUST_LOG` filters them).
    Federator(federator::Args),
    /// Inspect or change a federator cluster's membership through a replica's admin service.
    Raft(raft_admin::Args),
    /// Run the agent of one cell: dials the federator, runs the jobs it is assigned.
    ///
    /// `--config FILE` (YAML) configures everything, including the kubernetes backend (one
    /// pod per attempt; see docs/kubernetes.md); flags run the local backend (sandboxed
    /// processes). Authenticate with a client certificate naming the cell (--tls-*) or the
    /// federator's cell bootstrap token (--token-file). `render-pod` prints the pod a job
    /// would get.
    CellAgent(cell_agent::Args),
    /// See and steer cells: list them, cordon, uncordon, drain (with progress).
    ///
    /// Talks to the REST API at --server / FLOTILLA_ADDR with an admin token
    /// (FLOTILLA_TOKEN, --token-file, or .flotilla/admin-token from `flotilla dev`).
    Cells(cells::Args),
    /// Commands that run inside a runner pod: `exec`, `checkout`, `install`.
    ///
    /// The pod the cell agent's Kubernetes backend renders for a job runs these: `install`
    /// copies this binary into a volume, `checkout` puts the job's commit into the workspace,
    /// and `exec` runs the job's steps in the job's own image, writing JSON records on stdout.
    /// Not meant to be typed by people.
    Runner(runner::Args),
    /// Simulate days of CI load in virtual time through the real scheduler and autoscaler.
    ///
    /// A built-in profile (busy, sparse, spiky) or a CSV trace is played through the core
    /// scheduler and each cell pool's autoscaler, with runner start-up, one-shot runners and
    /// two-phase scale-down; the last day is reported: queue wait percentiles, idle runner
    /// time, runner-hours, scale events, and busy runners killed by scale-down. `--compare
    /// static:auto` sizes the static pool that matches the autoscaled p95. Deterministic: the
    /// same seed gives the same report.
    Simulate(simulate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Dev(args) => {
            init_logging();
            dev::run(&args)
        }
        Command::Federator(args) => {
            init_logging();
            federator::run(&args)
        }
        Command::Raft(args) => raft_admin::run(&args),
        Command::Cells(args) => cells::run(&args),
        Command::CellAgent(args) => {
            init_logging();
            cell_agent::run(&args)
        }
        // No logging: stdout carries the records, and in a pod stderr joins the same log.
        Command::Runner(args) => runner::run(&args),
        Command::Simulate(args) => simulate::run(&args),
    }
}

/// Structured logs on stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs an async command on a fresh runtime (multi-threaded for servers, single-threaded for
/// clients) and turns its error into the failure status.
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    multi_thread: bool,
    command: F,
) -> ExitCode {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match builder.enable_all().build() {
        Err(e) => fail(&anyhow::anyhow!("cannot start the runtime: {e}")),
        Ok(runtime) => match runtime.block_on(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

/// Prints an error the way every command does, and returns the failure status.
fn fail(e: &anyhow::Error) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "error: {e:#}");
    ExitCode::from(1)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
