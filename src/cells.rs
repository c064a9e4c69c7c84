//! `flotilla cells list|show|cordon|uncordon|drain`: the operator's view of the cells and the
//! levers ARCHITECTURE §7 gives them.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Api, ApiArgs};

/// See and steer the cells jobs run in.
///
/// Examples:
///   flotilla cells list
///   flotilla cells cordon eu-west-1a
///   flotilla cells drain eu-west-1a --deadline 30m     # waits, showing progress
///   flotilla cells uncordon eu-west-1a
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: CellsCommand,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, clap::Subcommand)]
enum CellsCommand {
    /// Every cell: state, runners busy/total per pool, jobs, workload, home projects.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One cell in full (JSON).
    Show {
        /// The cell id.
        cell: String,
    },
    /// Send no new work to the cell; its running jobs carry on.
    Cordon {
        /// The cell id.
        cell: String,
    },
    /// Let the cell take new work again (after cordon or drain).
    Uncordon {
        /// The cell id.
        cell: String,
    },
    /// Send no new work to the cell, let its jobs finish until the deadline, then place the
    /// rest elsewhere (as `Infra{Drained}`: retried, ahead of other work). Waits and shows
    /// progress until the cell is empty or the deadline has passed.
    Drain {
        /// The cell id.
        cell: String,
        /// How long running jobs may go on, such as `30m` (`0s`: move them now).
        #[arg(long, default_value = "1h")]
        deadline: String,
        /// Return once the drain has started instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
}

/// The fields of a cell this command shows (the API has more).
#[derive(Debug, Deserialize)]
struct Cell {
    id: String,
    state: String,
    region: String,
    connected: bool,
    jobs: usize,
    #[serde(default)]
    capacity: std::collections::BTreeMap<String, Pool>,
    pools: std::collections::BTreeMap<String, u32>,
    home_projects: usize,
    last_heartbeat_ms_ago: Option<u64>,
    drain_deadline: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Pool {
    total: u32,
    busy: u32,
    workload: Option<f64>,
}

pub(crate) fn run(args: &Args) -> std::process::ExitCode {
    crate::block_on(false, serve(args))
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let api = args.api.connect()?;
    let mut out = std::io::stdout().lock();
    match &args.command {
        CellsCommand::List { json } => {
            let cells: Value = api.get("/cells").await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&cells)?)?;
            } else {
                let cells: Vec<Cell> =
                    serde_json::from_value(cells).context("reading the cell list")?;
                write!(out, "{}", table(&cells))?;
            }
        }
        CellsCommand::Show { cell } => {
            let v: Value = api.get(&format!("/cells/{cell}")).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        CellsCommand::Cordon { cell } => {
            let c: Cell = api
                .post(&format!("/cells/{cell}/cordon"), &json!({}))
                .await?;
            writeln!(out, "{}: cordoned; {} job(s) carry on there", c.id, c.jobs)?;
        }
        CellsCommand::Uncordon { cell } => {
            let c: Cell = api
                .post(&format!("/cells/{cell}/uncordon"), &json!({}))
                .await?;
            writeln!(out, "{}: {}, taking new work", c.id, c.state)?;
        }
        CellsCommand::Drain {
            cell,
            deadline,
            no_wait,
        } => {
            let c: Cell = api
                .post(
                    &format!("/cells/{cell}/drain"),
                    &json!({ "deadline": deadline }),
                )
                .await?;
            writeln!(
                out,
                "{}: draining until {}; {} job(s) there",
                c.id,
                c.drain_deadline.as_deref().unwrap_or("now"),
                c.jobs
            )?;
            drop(out);
            if !no_wait {
                follow_drain(&api, cell).await?;
            }
        }
    }
    Ok(())
}

/// Shows a drain's progress until the cell is empty or the deadline handed the rest back.
async fn follow_drain(api: &Api, cell: &str) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<(usize, String)> = None;
    let mut failures = 0;
    loop {
        let c: Cell = match api.get(&format!("/cells/{cell}")).await {
            Ok(c) => {
                failures = 0;
                c
            }
            // The drain goes on without us: ride out a blip (a replica restarting, say).
            Err(e) if failures < 30 => {
                failures += 1;
                if failures == 1 {
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n(cannot read the cell, retrying: {e:#})"
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.context("the drain goes on, but its progress cannot be read")),
        };
        let now = (c.jobs, c.state.clone());
        let mut out = std::io::stdout().lock();
        if last.as_ref() != Some(&now) {
            if tty {
                write!(out, "\r\x1b[K{}: {}, {} job(s) left", c.id, c.state, c.jobs)?;
                out.flush()?;
            } else {
                writeln!(out, "{}: {}, {} job(s) left", c.id, c.state, c.jobs)?;
            }
            last = Some(now);
        }
        let done = match c.state.as_str() {
            "draining" if c.jobs == 0 => Some(Ok("every job finished before the deadline")),
            "draining" => None,
            "cordoned" => Some(Ok(
                "the deadline passed; what was left is placed on other cells",
            )),
            "lost" => Some(Err("the cell was lost; its jobs are placed on other cells")),
            _ => Some(Err("the drain was cancelled: the cell takes work again")),
        };
        if let Some(done) = done {
            if tty {
                writeln!(out)?;
            }
            return match done {
                Ok(how) => {
                    writeln!(out, "{}: drained ({how})", c.id)?;
                    Ok(())
                }
                Err(why) => anyhow::bail!("{}: {why}", c.id),
            };
        }
        drop(out);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn table(cells: &[Cell]) -> String {
    let header = [
        "CELL",
        "STATE",
        "REGION",
        "RUNNERS",
        "JOBS",
        "WORKLOAD",
        "HOME",
        "HEARTBEAT",
    ];
    let rows: Vec<[String; 8]> = cells
        .iter()
        .map(|c| {
            let runners = if c.capacity.is_empty() {
                c.pools
                    .iter()
                    .map(|(name, size)| format!("{name} -/{size}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                c.capacity
                    .iter()
                    .map(|(name, p)| format!("{name} {}/{}", p.busy, p.total))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let workload = c
                .capacity
                .values()
                .filter_map(|p| p.workload)
                .fold(None, |max: Option<f64>, w| {
                    Some(max.map_or(w, |m| m.max(w)))
                })
                .map_or_else(|| "-".to_owned(), |w| format!("{:.0}%", w * 100.0));
            let heartbeat = match (c.connected, c.last_heartbeat_ms_ago) {
                (true, Some(ms)) => format!("{:.1}s ago", ms as f64 / 1000.0),
                (true, None) => "connected".to_owned(),
                (false, _) => "disconnected".to_owned(),
            };
            let state = match &c.drain_deadline {
                Some(d) => format!("{} (until {d})", c.state),
                None => c.state.clone(),
            };
            [
                c.id.clone(),
                state,
                c.region.clone(),
                runners,
                c.jobs.to_string(),
                workload,
                c.home_projects.to_string(),
                heartbeat,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cols: &[String]| {
        let mut text = String::new();
        for (i, (col, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                text.push_str(col);
            } else {
                let _ = write!(text, "{col:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &header.map(str::to_owned));
    for row in &rows {
        line(&mut out, row);
    }
    if cells.is_empty() {
        out.push_str("(no cells have registered yet: start a cell agent)\n");
    }
    out
}
