//! `flotilla simulate`: a day (or days) of CI load in virtual time through the real scheduler
//! and the real autoscaler policy, reported as queue waits and idle runner time.
//!
//! The engine is `flotilla_core::simulate` (pure: no I/O, no clock); this file reads the
//! trace, prints the report (a table or JSON) and draws the plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use flotilla_core::autoscale::{FloorPolicy, Period, Policy};
use flotilla_core::simulate::{
    self, Config, DAY_MS, Plan, Profile, ProfileLoad, Report, Runners, Sample, StaticSizing,
    TraceJob, Waits, Workload,
};
use flotilla_core::{PoolName, ProjectId};
use serde::Serialize;

const EXAMPLES: &str = "\
Examples:
  # A day of the busy profile (100,000 builds, ~500,000 jobs, 20 cells), autoscaled:
  flotilla simulate --profile busy

  # Two days of spikes (the first teaches the time-of-day floor), against the smallest
  # static pool with the same p95 queue wait, as JSON:
  flotilla simulate --profile spiky --days 2 --compare static:auto --json

  # Replay a trace (submit_time,duration,pool,project) against 40 static runners per pool,
  # and draw the day:
  flotilla simulate --trace day.csv --compare static:40 --plot day.svg

  # What a slower runner start-up and a lazier scale-down cost:
  flotilla simulate --profile busy --startup 30s --scale-down-delay 10m

See docs/simulate.md for the model, every option and how to read the report.";

/// The floor's period on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorArg {
    /// No time-of-day floor: size from current demand alone.
    None,
    /// The same hour on earlier days.
    Day,
    /// The same hour of the week on earlier weeks.
    Week,
}

/// What to compare the autoscaled pools with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// This many runners in every cell's pool.
    Static(u32),
    /// The smallest static size with the autoscaled run's p95 queue wait.
    Auto,
}

fn parse_compare(s: &str) -> Result<Compare, String> {
    let bad = || format!("`{s}`: expected static:N (runners per cell pool) or static:auto");
    let rest = s.strip_prefix("static:").ok_or_else(bad)?;
    if rest == "auto" {
        return Ok(Compare::Auto);
    }
    match rest.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Compare::Static(n)),
        _ => Err(bad()),
    }
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    Profile::parse(s).ok_or_else(|| format!("`{s}`: the profiles are busy, sparse and spiky"))
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub(crate) struct Args {
    /// The built-in workload: busy (dense business hours), sparse (low background, a few
    /// short spikes) or spiky (busier background, frequent tall spikes). Default: busy.
    #[arg(long, value_parser = parse_profile, conflicts_with = "trace")]
    profile: Option<Profile>,
    /// Replay a CSV trace instead: header `submit_time,duration,pool,project`, one
    /// single-job build per row (submit_time in seconds from the start of the day, or an
    /// RFC 3339 time whose time of day is used; duration in seconds).
    #[arg(long, value_name = "FILE.csv")]
    trace: Option<PathBuf>,
    /// Builds per day of the profile (each ≈ 5 jobs: a setup job, then 2–6 that need it).
    #[arg(long, default_value_t = 100_000)]
    builds: u32,
    /// Projects (tenants) the profile's builds come from.
    #[arg(long, default_value_t = 200)]
    projects: u32,
    /// The share of the profile's jobs that run in the `large` pool (0 for one pool).
    #[arg(long, default_value_t = 0.2)]
    large_share: f64,
    /// Days to simulate back to back; the last is reported (earlier days teach the
    /// time-of-day floor).
    #[arg(long, default_value_t = 1)]
    days: u32,
    /// Cells, each with every pool of the workload.
    #[arg(long, default_value_t = 20)]
    cells: u32,
    /// The seed of every random draw: the same seed gives the same report.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long a runner takes from creation to ready.
    #[arg(long, default_value = "5s")]
    startup: humantime::Duration,
    /// The shortest time between two scheduler ticks.
    #[arg(long, default_value = "100ms")]
    tick: humantime::Duration,
    /// The longest time between two decisions of a pool's autoscaler (it also decides on
    /// every change of the pool).
    #[arg(long, default_value = "5s")]
    autoscale_interval: humantime::Duration,
    /// How long after fencing an idle runner scale-down checks it and deletes it.
    #[arg(long, default_value = "1s")]
    retire_check: humantime::Duration,
    /// Fewest runners per cell pool.
    #[arg(long, default_value_t = Policy::default().min)]
    min: u32,
    /// Most runners per cell pool, which is also the pool's placement capacity. The
    /// simulator's default is large so that the cap does not decide the results; set it to
    /// what a cell can run.
    #[arg(long, default_value_t = 1_000)]
    max: u32,
    /// The share of runners that should be busy, in (0, 1].
    #[arg(long, default_value_t = Policy::default().target_utilisation)]
    target_utilisation: f64,
    /// Most runners added by one decision.
    #[arg(long, default_value_t = Policy::default().scale_up_step)]
    scale_up_step: u32,
    /// After adding runners, how long before adding more.
    #[arg(long, default_value_t = ms(Policy::default().scale_up_cooldown_ms))]
    scale_up_cooldown: humantime::Duration,
    /// How long a pool must have been larger than needed before idle runners are retired.
    #[arg(long, default_value_t = ms(Policy::default().scale_down_delay_ms))]
    scale_down_delay: humantime::Duration,
    /// The time-of-day floor: the same hour on earlier days (day), of the week on earlier
    /// weeks (week), or none.
    #[arg(long, value_enum, default_value_t = FloorArg::Day)]
    floor: FloorArg,
    /// Which quantile of the hour's past mean demands the floor keeps warm (0–1).
    #[arg(long, default_value_t = FloorPolicy::default().quantile)]
    floor_quantile: f64,
    /// How far ahead the floor looks, so runners are up before the hour that needs them.
    #[arg(long, default_value_t = ms(FloorPolicy::default().lookahead_ms))]
    floor_lookahead: humantime::Duration,
    /// How many past periods the floor learns from.
    #[arg(long, default_value_t = FloorPolicy::default().periods)]
    floor_periods: u32,
    /// Also run the same workload on static pools: static:N (N runners in every cell's
    /// pool, always) or static:auto (the smallest N per pool whose p95 queue wait is at most
    /// the autoscaled run's).
    #[arg(long, value_name = "static:N|static:auto", value_parser = parse_compare)]
    compare: Option<Compare>,
    /// Print the report as JSON (the wall time goes to stderr).
    #[arg(long)]
    json: bool,
    /// Draw demand, runners and queue length over the reported day (per minute, summed over
    /// cells) to an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

fn ms(ms: u64) -> humantime::Duration {
    Duration::from_millis(ms).into()
}

fn millis(d: humantime::Duration) -> u64 {
    u64::try_from(Duration::from(d).as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn run(args: &Args) -> ExitCode {
    match simulate_and_print(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(&e),
    }
}

/// The autoscaler policy the flags describe.
fn policy(args: &Args) -> Policy {
    let period = match args.floor {
        FloorArg::None => None,
        FloorArg::Day => Some(Period::Day),
        FloorArg::Week => Some(Period::Week),
    };
    Policy {
        min: args.min,
        max: args.max,
        target_utilisation: args.target_utilisation,
        scale_up_step: args.scale_up_step,
        scale_up_cooldown_ms: millis(args.scale_up_cooldown),
        scale_down_delay_ms: millis(args.scale_down_delay),
        floor: period.map(|period| FloorPolicy {
            period,
            quantile: args.floor_quantile,
            periods: args.floor_periods,
            lookahead_ms: millis(args.floor_lookahead),
        }),
    }
}

/// The static side of a comparison.
struct StaticRun {
    report: Report,
    runners: BTreeMap<PoolName, u32>,
    /// For static:auto: whether every pool met the target, and the runs the search took.
    search: Option<(bool, u32)>,
}

fn simulate_and_print(args: &Args) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        check_plot_path(path)?;
    }
    let workload = match &args.trace {
        Some(path) => Workload::Trace(read_trace(path)?),
        None => Workload::Profile(ProfileLoad {
            profile: args.profile.unwrap_or(Profile::Busy),
            builds_per_day: args.builds,
            projects: args.projects,
            large_share: args.large_share,
        }),
    };
    let config = Config {
        seed: args.seed,
        cells: args.cells,
        startup_ms: millis(args.startup),
        tick_ms: millis(args.tick),
        autoscale_interval_ms: millis(args.autoscale_interval),
        retire_check_ms: millis(args.retire_check),
    };
    let policy = policy(args);
    policy.validate().context("the pool policy")?;

    #[allow(
        clippy::disallowed_methods,
        reason = "the report states how long the simulation took on this machine"
    )]
    let started = std::time::Instant::now();
    let plan = Plan::new(&workload, args.seed, args.days)?;
    let auto = simulate::run(&config, &plan, &Runners::Autoscaled(policy.clone()))?;
    let auto_wall = started.elapsed();
    let static_run = match args.compare {
        None => None,
        Some(Compare::Static(n)) => Some(StaticRun {
            report: simulate::run(&config, &plan, &Runners::static_all(&plan, n))?,
            runners: plan.pools().iter().map(|p| (p.clone(), n)).collect(),
            search: None,
        }),
        Some(Compare::Auto) => {
            let target = auto.queue_wait_s.p95_ms();
            let StaticSizing {
                runners,
                report,
                met,
                runs,
            } = simulate::size_static(&config, &plan, target, Some(&auto))?;
            Some(StaticRun {
                report,
                runners,
                search: Some((met, runs)),
            })
        }
    };
    let wall = started.elapsed();

    if let Some(path) = &args.plot {
        plot(path, &auto, static_run.as_ref())?;
    }
    let mut out = io::BufWriter::new(io::stdout().lock());
    if args.json {
        let json = Json::new(&auto, &policy, &config, static_run.as_ref());
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
        out.flush()?;
        let _ = writeln!(
            io::stderr(),
            "simulated in {:.2} s (autoscaled run {:.2} s)",
            wall.as_secs_f64(),
            auto_wall.as_secs_f64()
        );
    } else {
        let text = table(args, &plan, &auto, static_run.as_ref(), wall, auto_wall);
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

fn check_plot_path(path: &Path) -> anyhow::Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => Ok(()),
        Some("png") => bail!(
            "--plot {}: PNG is not supported: drawing text into a bitmap needs a font \
             rasteriser and a font file, which this build does not carry. Write an SVG \
             (--plot {}) and convert it if you need a PNG (e.g. `rsvg-convert -o out.png in.svg`)",
            path.display(),
            path.with_extension("svg").display()
        ),
        _ => bail!(
            "--plot {}: the plot is written as SVG; name the file *.svg",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The trace.

/// The columns a trace must have, in any order.
const TRACE_COLUMNS: [&str; 4] = ["submit_time", "duration", "pool", "project"];

fn read_trace(path: &Path) -> anyhow::Result<Vec<TraceJob>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the trace {}", path.display()))?;
    parse_trace(&path.display().to_string(), &text)
}

/// Parses a trace; every error names `file:line` and what to do.
fn parse_trace(file: &str, text: &str) -> anyhow::Result<Vec<TraceJob>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .with_context(|| format!("{file}:1: cannot read the header"))?
        .clone();
    let mut index = [0usize; 4];
    for (i, want) in TRACE_COLUMNS.iter().enumerate() {
        index[i] = header.iter().position(|h| h == *want).with_context(|| {
            format!(
                "{file}:1: the header has no `{want}` column; a trace starts with the line \
                 `submit_time,duration,pool,project`"
            )
        })?;
    }
    if let Some(extra) = header.iter().find(|h| !TRACE_COLUMNS.contains(h)) {
        bail!(
            "{file}:1: unknown column `{extra}`; the columns are submit_time, duration, pool \
             and project"
        );
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            match e.kind() {
                csv::ErrorKind::UnequalLengths { len, .. } => anyhow::anyhow!(
                    "{file}:{line}: the row has {len} fields; every row needs the {} of the header",
                    header.len()
                ),
                _ => anyhow::anyhow!("{file}:{line}: {e}"),
            }
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |i: usize| record.get(index[i]).unwrap_or("");
        let submit = field(0);
        let submit_ms = parse_submit(submit).with_context(|| {
            format!(
                "{file}:{line}: submit_time \"{submit}\" is neither seconds from the start of \
                 the day (below 86400) nor an RFC 3339 time"
            )
        })?;
        let duration = field(1);
        let duration_ms = match duration.parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s < 30.0 * 86_400.0 => (s * 1000.0).round() as u64,
            _ => bail!(
                "{file}:{line}: duration \"{duration}\" is not a number of seconds (more than 0)"
            ),
        };
        let pool = field(2);
        let pool = PoolName::new(pool).map_err(|e| {
            anyhow::anyhow!("{file}:{line}: pool \"{pool}\" is not a pool name: {e}")
        })?;
        let project = field(3);
        let project = ProjectId::new(project).map_err(|e| {
            anyhow::anyhow!("{file}:{line}: project \"{project}\" is not a project id: {e}")
        })?;
        rows.push(TraceJob {
            submit_ms,
            duration_ms,
            pool,
            project,
        });
    }
    if rows.is_empty() {
        bail!("{file}: the trace has a header but no rows");
    }
    Ok(rows)
}

/// Seconds from the start of the day, or an RFC 3339 time (its UTC time of day).
fn parse_submit(s: &str) -> Option<u64> {
    if let Ok(secs) = s.parse::<f64>() {
        let ms = secs * 1000.0;
        return (secs.is_finite() && secs >= 0.0 && ms < DAY_MS as f64).then_some(ms as u64);
    }
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(u64::try_from(since.as_millis()).ok()? % DAY_MS)
}

// ---------------------------------------------------------------------------------------
// The report.

/// The figures of one run, as `--json` prints them.
#[derive(Debug, Serialize)]
struct Figures<'a> {
    builds: u64,
    jobs: u64,
    jobs_never_started: u64,
    queue_wait_s: Waits,
    idle_fraction: f64,
    runner_hours: f64,
    busy_runner_hours: f64,
    scale_ups: u64,
    scale_downs: u64,
    runners_started: u64,
    runners_retired: u64,
    busy_runners_killed: u64,
    retirements_kept_busy: u64,
    scheduler_ticks: u64,
    pools: &'a BTreeMap<String, simulate::PoolReport>,
    hours: &'a [simulate::HourReport],
}

impl<'a> Figures<'a> {
    fn of(r: &'a Report) -> Self {
        Figures {
            builds: r.builds,
            jobs: r.jobs,
            jobs_never_started: r.jobs_never_started,
            queue_wait_s: r.queue_wait_s,
            idle_fraction: r.idle_fraction,
            runner_hours: r.runner_hours,
            busy_runner_hours: r.busy_runner_hours,
            scale_ups: r.scale_ups,
            scale_downs: r.scale_downs,
            runners_started: r.runners_started,
            runners_retired: r.runners_retired,
            busy_runners_killed: r.busy_runners_killed,
            retirements_kept_busy: r.retirements_kept_busy,
            scheduler_ticks: r.scheduler_ticks,
            pools: &r.pools,
            hours: &r.hours,
        }
    }
}

/// The settings a run used, echoed in the JSON.
#[derive(Debug, Serialize)]
struct Settings<'a> {
    startup_ms: u64,
    tick_ms: u64,
    autoscale_interval_ms: u64,
    retire_check_ms: u64,
    policy: &'a Policy,
}

#[derive(Debug, Serialize)]
struct Json<'a> {
    profile: &'a str,
    seed: u64,
    days: u32,
    cells: u32,
    #[serde(flatten)]
    figures: Figures<'a>,
    settings: Settings<'a>,
    #[serde(rename = "static", skip_serializing_if = "Option::is_none")]
    static_figures: Option<Figures<'a>>,
    /// Runners per cell, by pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    static_runners: Option<BTreeMap<String, u32>>,
    /// static:auto only: whether every pool met the autoscaled p95.
    #[serde(skip_serializing_if = "Option::is_none")]
    static_target_met: Option<bool>,
}

impl<'a> Json<'a> {
    fn new(
        auto: &'a Report,
        policy: &'a Policy,
        config: &Config,
        static_run: Option<&'a StaticRun>,
    ) -> Self {
        Json {
            profile: &auto.workload,
            seed: auto.seed,
            days: auto.days,
            cells: auto.cells,
            figures: Figures::of(auto),
            settings: Settings {
                startup_ms: config.startup_ms,
                tick_ms: config.tick_ms,
                autoscale_interval_ms: config.autoscale_interval_ms,
                retire_check_ms: config.retire_check_ms,
                policy,
            },
            static_figures: static_run.map(|s| Figures::of(&s.report)),
            static_runners: static_run
                .map(|s| s.runners.iter().map(|(p, n)| (p.to_string(), *n)).collect()),
            static_target_met: static_run.and_then(|s| s.search.map(|(met, _)| met)),
        }
    }
}

/// The human report: a small aligned table.
fn table(
    args: &Args,
    plan: &Plan,
    auto: &Report,
    static_run: Option<&StaticRun>,
    wall: Duration,
    auto_wall: Duration,
) -> String {
    let mut s = String::new();
    let workload = match &args.trace {
        Some(p) => format!("trace {}", p.display()),
        None => format!(
            "{} ({} builds/day)",
            auto.workload,
            group(u64::from(args.builds))
        ),
    };
    let _ = writeln!(
        s,
        "flotilla simulate: {workload}, {} day{} (day {} reported), {} cells, pools {}, seed {}",
        auto.days,
        if auto.days == 1 { "" } else { "s" },
        auto.days,
        auto.cells,
        plan.pools()
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        auto.seed
    );
    let _ = writeln!(s);
    let mut rows: Vec<[String; 4]> = Vec::new();
    let st = static_run.map(|s| &s.report);
    let static_head = static_run.map_or(String::new(), |s| {
        let sizes: Vec<String> = s.runners.iter().map(|(p, n)| format!("{p} {n}")).collect();
        format!("static ({} per cell)", sizes.join(", "))
    });
    rows.push([
        String::new(),
        "autoscaled".into(),
        static_head,
        if st.is_some() {
            "static ÷ autoscaled".into()
        } else {
            String::new()
        },
    ]);
    let num = |r: &Report, f: &dyn Fn(&Report) -> f64| f(r);
    let mut row = |name: &str, f: &dyn Fn(&Report) -> f64, fmt: &dyn Fn(f64) -> String| {
        let a = num(auto, f);
        let (b, ratio) = match st {
            Some(r) => {
                let b = num(r, f);
                let ratio = if a > 0.0 {
                    format!("{:.2}×", b / a)
                } else {
                    "–".into()
                };
                (fmt(b), ratio)
            }
            None => (String::new(), String::new()),
        };
        rows.push([name.into(), fmt(a), b, ratio]);
    };
    let count = |x: f64| group(x as u64);
    let secs = |x: f64| format!("{x:.2}");
    let pct = |x: f64| format!("{:.1} %", x * 100.0);
    row("jobs", &|r| r.jobs as f64, &count);
    row(
        "jobs never started",
        &|r| r.jobs_never_started as f64,
        &count,
    );
    row("queue wait p50 (s)", &|r| r.queue_wait_s.p50, &secs);
    row("queue wait p95 (s)", &|r| r.queue_wait_s.p95, &secs);
    row("queue wait p99 (s)", &|r| r.queue_wait_s.p99, &secs);
    row("idle runner-time", &|r| r.idle_fraction, &pct);
    row("runner-hours", &|r| r.runner_hours, &count);
    row("busy runner-hours", &|r| r.busy_runner_hours, &count);
    row("scale-ups", &|r| r.scale_ups as f64, &count);
    row("scale-downs", &|r| r.scale_downs as f64, &count);
    row("runners started", &|r| r.runners_started as f64, &count);
    row(
        "busy runners killed",
        &|r| r.busy_runners_killed as f64,
        &count,
    );
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = format!("{:<w$}", r[0], w = widths[0]);
        for c in 1..4 {
            if widths[c] > 0 {
                let _ = write!(line, "  {:>w$}", r[c], w = widths[c]);
            }
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
    let _ = writeln!(s);
    if let Some(StaticRun {
        search: Some((met, runs)),
        ..
    }) = static_run
    {
        let _ = writeln!(
            s,
            "static:auto: the smallest static pools with p95 queue wait ≤ {:.2} s per pool \
             ({runs} runs){}",
            auto.queue_wait_s.p95,
            if *met {
                ""
            } else {
                "; NOT met even at the largest size tried"
            }
        );
    }
    let _ = writeln!(
        s,
        "simulated in {:.2} s wall time ({:.2} s for the autoscaled run of {} jobs over {} day{})",
        wall.as_secs_f64(),
        auto_wall.as_secs_f64(),
        group(plan.jobs() as u64),
        auto.days,
        if auto.days == 1 { "" } else { "s" }
    );
    s
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The plot.

fn plot(path: &Path, auto: &Report, static_run: Option<&StaticRun>) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let series = |f: fn(&Sample) -> u64, r: &Report| -> Vec<(f64, f64)> {
            r.series
                .iter()
                .map(|s| (f64::from(s.minute) / 60.0, f(s) as f64))
                .collect()
        };
        let demand = series(|s| s.demand, auto);
        let runners = series(|s| s.runners, auto);
        let queued = series(|s| s.queued, auto);
        let static_runners = static_run.map(|s| series(|x| x.runners, &s.report));
        let top = demand
            .iter()
            .chain(&runners)
            .chain(&queued)
            .chain(static_runners.iter().flatten())
            .map(|p| p.1)
            .fold(1.0, f64::max);
        let title = format!(
            "flotilla simulate: {} (day {}, seed {}), summed over {} cells",
            auto.workload, auto.days, auto.seed, auto.cells
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..24.0, 0.0..top * 1.05)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc("hour of day (UTC)")
            .y_desc("runners / jobs")
            .x_labels(13)
            .draw()
            .map_err(draw_error)?;
        type Line<'a> = (&'a str, RGBColor, &'a Vec<(f64, f64)>);
        let lines: Vec<Line<'_>> = [
            Some(("demand (busy + queued)", RGBColor(31, 119, 180), &demand)),
            Some(("runners (autoscaled)", RGBColor(44, 160, 44), &runners)),
            Some(("queued jobs (autoscaled)", RGBColor(214, 39, 40), &queued)),
            static_runners
                .as_ref()
                .map(|s| ("runners (static)", RGBColor(127, 127, 127), s)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (label, color, points) in lines {
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(draw_error)?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

fn draw_error<E: std::error::Error + Send + Sync>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_seconds_or_rfc3339_and_names_the_line_of_a_bad_row() {
        let ok = "submit_time,duration,pool,project\n0,60,default,web\n\
                  2026-11-23T09:30:00Z,1.5,large,api\n";
        let rows = parse_trace("t.csv", ok).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].submit_ms, 9 * 3_600_000 + 30 * 60_000);
        assert_eq!(rows[1].duration_ms, 1_500);
        let bad = "submit_time,duration,pool,project\n0,60,default,web\n5,abc,default,web\n";
        let e = parse_trace("t.csv", bad).unwrap_err().to_string();
        assert_eq!(
            e,
            "t.csv:3: duration \"abc\" is not a number of seconds (more than 0)"
        );
        let e = parse_trace("t.csv", "submit_time,duration,pool\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.csv:1: the header has no `project`")
        );
        let e = parse_trace("t.csv", "submit_time,duration,pool,project\n1,2,3\n").unwrap_err();
        assert!(
            e.to_string().starts_with("t.csv:2: the row has 3 fields"),
            "{e}"
        );
        let e = parse_trace("t.csv", "submit_time,duration,pool,project\n90000,2,a,b\n");
        assert!(
            e.unwrap_err()
                .to_string()
                .starts_with("t.csv:2: submit_time \"90000\"")
        );
    }

    #[test]
    fn compare_takes_a_size_or_auto() {
        assert_eq!(parse_compare("static:12"), Ok(Compare::Static(12)));
        assert_eq!(parse_compare("static:auto"), Ok(Compare::Auto));
        assert!(parse_compare("static:0").is_err());
        assert!(parse_compare("dynamic").is_err());
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1_234_567), "1,234,567");
    }
}
