//! `flotilla runner …`: the commands that run inside a runner pod (ARCHITECTURE §8), started by
//! the pod spec the cell agent's Kubernetes backend renders. Not meant to be typed by people.
//!
//! They write JSON records on stdout (the pod log the backend reads back) and nothing else,
//! so no logging is set up here: in a pod, stderr lands in the same log.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use flotilla_cell_agent::runner::checkout::{self, CheckoutOptions};
use flotilla_cell_agent::runner::exec::{self, ExecOptions};
use flotilla_cell_agent::runner::standby::{self, HandoffOptions, StandbyOptions};
use flotilla_cell_agent::runner::{install, record};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job's steps in its workspace (the job container's command).
    ///
    /// Reads the job spec, runs each step with `bash -eo pipefail -c` (`sh -e -c` when the
    /// image has no bash) in the workspace, and writes JSON records on stdout: `started`, one
    /// `line` per output line, and `finished` last. The outcome also goes to the termination
    /// log. SIGTERM or SIGINT kills the running step and ends the job as cancelled.
    ///
    /// Runs inside runner pods; not meant to be typed by people.
    ///
    /// Exit status: 0 on success, the failing step's exit code, 124 on timeout, 130 when
    /// cancelled, 125 when the job could not be run at all (unreadable spec, protocol
    /// mismatch, no shell).
    Exec(ExecArgs),
    /// Check a job's commit out into its workspace (an init container's command).
    ///
    /// `git init`, then `git fetch --depth 1 URL SHA` (falling back to fetching the ref),
    /// then `git checkout --detach SHA`, never prompting for credentials and never printing
    /// them. Writes JSON system-line records on stdout and the outcome to the termination
    /// log. A job without a repository leaves the workspace alone.
    ///
    /// Runs inside runner pods; not meant to be typed by people.
    ///
    /// Exit status: 0 on success, 125 on failure (a malformed commit, ref or URL, or git
    /// failing), 130 when cancelled by SIGTERM or SIGINT.
    Checkout(CheckoutArgs),
    /// Copy this flotilla binary to DEST (an init container's command).
    ///
    /// Puts the wrapper into a volume shared with the job's container. The copy is atomic
    /// (a temporary file next to DEST, flushed, made executable with mode 0755, renamed);
    /// DEST's directory is created when missing. Writes one JSON record saying what it did.
    ///
    /// Runs inside runner pods; not meant to be typed by people.
    ///
    /// Exit status: 0 on success, 125 on failure.
    Install(InstallArgs),
    /// Wait for a job over HTTP, then check it out (a warm pod's `checkout` container).
    ///
    /// Serves `GET /healthz` (the readiness probe) and `POST /v1/assign`, which takes the
    /// job's assignment as JSON from a caller presenting `Authorization: Bearer TOKEN` (the
    /// token file's contents): 202 for the first job and for the same job and fence again,
    /// 409 for any other, 401 without the token, 400 for a body that is not an assignment,
    /// 413 above 1 MiB. Then checks the job's commit out into the workspace like `runner
    /// checkout` and leaves the job, without its clone URL, in HANDOFF/job.json for `runner
    /// handoff`, or why there is no job in HANDOFF/abort.json. Writes JSON system-line
    /// records on stdout and the outcome to the termination log; never prints the token.
    ///
    /// Runs inside runner pods; not meant to be typed by people.
    ///
    /// Exit status: 0 once the job is handed over, 125 when the checkout failed or the
    /// standby could not start (an empty or unreadable token file, an address in use), 130
    /// when cancelled by SIGTERM or SIGINT.
    Standby(StandbyArgs),
    /// Wait for the job `runner standby` hands over, then run it (a warm pod's job container).
    ///
    /// Polls HANDOFF for job.json, then runs it exactly as `runner exec --spec
    /// HANDOFF/job.json` does, records and all; or for abort.json, whose termination
    /// message (the failed checkout's) it copies to its own termination log, without
    /// running anything. A `--protocol` other than this binary's is refused at once, before
    /// any job arrives.
    ///
    /// Runs inside runner pods; not meant to be typed by people.
    ///
    /// Exit status: as `runner exec` once the job runs; for a failed checkout 125 (130 when
    /// it was cancelled); 125 for a protocol mismatch or an unreadable abort.json; 130 when
    /// cancelled by SIGTERM or SIGINT while waiting.
    Handoff(HandoffArgs),
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// The job spec: the JSON assignment the cell agent mounted into the pod.
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The directory the steps run in (created when missing).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Where to write the termination message (the container's terminationMessagePath).
    /// Without it none is written; a file that cannot be written is reported in the log.
    #[arg(long, value_name = "FILE")]
    termination_log: Option<PathBuf>,
    /// The record protocol version the cell agent reads. Must be this binary's own
    /// version, so that a wrapper and an agent that disagree fail loudly.
    #[arg(long, value_name = "VERSION")]
    protocol: u32,
}

#[derive(Debug, clap::Args)]
struct CheckoutArgs {
    /// The job spec: the JSON assignment the cell agent mounted into the pod.
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The directory to check the code out into (created when missing).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Where to write the termination message (the container's terminationMessagePath).
    /// Without it none is written; a file that cannot be written is reported in the log.
    #[arg(long, value_name = "FILE")]
    termination_log: Option<PathBuf>,
    /// Longest the whole checkout may take: seconds, or a number with `s`, `m` or `h`
    /// (`600`, `600s`, `10m`).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct StandbyArgs {
    /// The address to listen on for the job.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7171")]
    listen: SocketAddr,
    /// The file holding the token the cell agent presents (surrounding whitespace ignored;
    /// an empty file is refused).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The directory shared with the job container, where the job (or why there is none)
    /// is left (created when missing).
    #[arg(long, value_name = "DIR")]
    handoff: PathBuf,
    /// The directory to check the code out into (created when missing).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Where to write the termination message (the container's terminationMessagePath).
    /// Without it none is written; a file that cannot be written is reported in the log.
    #[arg(long, value_name = "FILE")]
    termination_log: Option<PathBuf>,
    /// Longest the checkout may take once the job arrives: seconds, or a number with `s`,
    /// `m` or `h` (`600`, `600s`, `10m`).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    checkout_timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct HandoffArgs {
    /// The directory `runner standby` leaves the job in.
    #[arg(long, value_name = "DIR")]
    handoff: PathBuf,
    /// The directory the steps run in (created when missing).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Where to write the termination message (the container's terminationMessagePath).
    /// Without it none is written; a file that cannot be written is reported in the log.
    #[arg(long, value_name = "FILE")]
    termination_log: Option<PathBuf>,
    /// The record protocol version the cell agent reads. Must be this binary's own
    /// version, so that a wrapper and an agent that disagree fail loudly.
    #[arg(long, value_name = "VERSION")]
    protocol: u32,
}

/// `600`, `600s`, `10m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?} is not a duration like 600s, 10m or 1h")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration like 600s, 10m or 1h"))
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// Where to put the binary, e.g. /flotilla/bin/flotilla.
    #[arg(value_name = "DEST")]
    dest: PathBuf,
}

/// Runs one `flotilla runner` command and returns its exit status.
pub(crate) fn run(args: &Args) -> ExitCode {
    let code = match &args.command {
        Command::Exec(a) => {
            let opts = ExecOptions {
                spec: a.spec.clone(),
                workspace: a.workspace.clone(),
                termination_log: a.termination_log.clone(),
                protocol: a.protocol,
            };
            on_runtime(|| exec::exec(&opts, std::io::stdout()))
        }
        Command::Checkout(a) => {
            let opts = CheckoutOptions {
                spec: a.spec.clone(),
                workspace: a.workspace.clone(),
                termination_log: a.termination_log.clone(),
                timeout: a.timeout,
            };
            on_runtime(|| checkout::checkout(&opts, std::io::stdout()))
        }
        Command::Install(a) => install::install(&a.dest, std::io::stdout()),
        Command::Standby(a) => {
            let opts = StandbyOptions {
                listen: a.listen,
                token_file: a.token_file.clone(),
                handoff: a.handoff.clone(),
                workspace: a.workspace.clone(),
                termination_log: a.termination_log.clone(),
                checkout_timeout: a.checkout_timeout,
            };
            on_runtime(|| standby::standby(&opts, std::io::stdout()))
        }
        Command::Handoff(a) => {
            let opts = HandoffOptions {
                handoff: a.handoff.clone(),
                workspace: a.workspace.clone(),
                termination_log: a.termination_log.clone(),
                protocol: a.protocol,
            };
            on_runtime(|| standby::handoff(&opts, std::io::stdout()))
        }
    };
    ExitCode::from(code)
}

/// Runs `command` on a small multi-threaded runtime (a step's output is written to stdout
/// from a worker, so a slow log reader never holds up the signal listener). Not
/// `crate::block_on`: these commands return their own exit statuses.
fn on_runtime<F: Future<Output = u8>>(command: impl FnOnce() -> F) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command()),
        Err(e) => {
            // A plain line: the log reader keeps it as a system line.
            let _ = writeln!(std::io::stdout(), "cannot start the runtime: {e}");
            record::EXIT_NOT_RUN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_timeouts_read_as_seconds_minutes_or_hours() {
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10 m", "-5s", "1d", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn a_standby_listens_on_port_7171_and_gives_a_checkout_ten_minutes_unless_told_otherwise() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "runner",
            "standby",
            "--token-file",
            "/flotilla/standby/token",
            "--handoff",
            "/flotilla/handoff",
            "--workspace",
            "/workspace",
        ])
        .expect("parses");
        let Command::Standby(a) = cli.args.command else {
            panic!("not standby: {cli:?}");
        };
        assert_eq!(a.listen, "0.0.0.0:7171".parse().unwrap());
        assert_eq!(a.checkout_timeout, Duration::from_secs(600));
        assert_eq!(a.termination_log, None);

        let cli = Cli::try_parse_from([
            "runner",
            "handoff",
            "--handoff",
            "/flotilla/handoff",
            "--workspace",
            "/workspace",
            "--protocol",
            "1",
            "--termination-log",
            "/dev/termination-log",
        ])
        .expect("parses");
        assert!(matches!(
            cli.args.command,
            Command::Handoff(HandoffArgs { protocol: 1, .. })
        ));
    }
}
