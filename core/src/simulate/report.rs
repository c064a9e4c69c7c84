//! What a run measured, and the report it comes to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::workload::Plan;
use super::{Config, HOUR_MS};

/// Queue waits, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Waits {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Longest.
    pub max: f64,
}

impl Waits {
    /// Nearest-rank percentiles of waits in milliseconds (sorted here).
    fn of(waits: &mut [u32]) -> Waits {
        if waits.is_empty() {
            return Waits::default();
        }
        waits.sort_unstable();
        let rank = |q: f64| {
            let r = (q * waits.len() as f64).ceil() as usize;
            f64::from(waits[r.clamp(1, waits.len()) - 1]) / 1000.0
        };
        let sum: u64 = waits.iter().map(|w| u64::from(*w)).sum();
        Waits {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            mean: round(sum as f64 / waits.len() as f64 / 1000.0, 3),
            max: f64::from(waits[waits.len() - 1]) / 1000.0,
        }
    }

    /// The 95th percentile in whole milliseconds.
    pub fn p95_ms(&self) -> u64 {
        (self.p95 * 1000.0).round() as u64
    }
}

/// One pool's figures (summed over cells).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Jobs of the pool that became runnable during the reported day.
    pub jobs: u64,
    /// Of those, not started by the end of the day.
    pub jobs_never_started: u64,
    /// Their queue waits.
    pub queue_wait_s: Waits,
    /// Idle (idle, starting and fenced) runner time over all runner time.
    pub idle_fraction: f64,
    /// All runner time, in hours.
    pub runner_hours: f64,
    /// The most runners one cell's pool had at once (a static pool's size).
    pub peak_runners: u32,
}

/// One hour of the reported day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HourReport {
    /// The hour (0–23, UTC).
    pub hour: u32,
    /// Jobs that became runnable in the hour.
    pub jobs: u64,
    /// Their queue waits.
    pub queue_wait_s: Waits,
    /// Runners alive on average over the hour, over all cells and pools.
    pub runners: f64,
    /// Busy runners on average over the hour.
    pub busy: f64,
}

/// One sample of the per-minute series (summed over cells and pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Minutes since the start of the reported day.
    pub minute: u32,
    /// Busy runners plus runnable jobs waiting for one.
    pub demand: u64,
    /// Runners alive: busy, idle, starting and fenced.
    pub runners: u64,
    /// Runnable jobs waiting (at the federator or at a cell).
    pub queued: u64,
}

/// What one run came to, over its last simulated day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `busy`, `sparse`, `spiky` or `trace`.
    pub workload: String,
    /// `autoscaled` or `static`.
    pub mode: String,
    /// The seed.
    pub seed: u64,
    /// Days simulated (the last one is reported).
    pub days: u32,
    /// Cells.
    pub cells: u32,
    /// Builds pushed during the reported day.
    pub builds: u64,
    /// Jobs that became runnable during the reported day.
    pub jobs: u64,
    /// Of those, not started by the end of the day.
    pub jobs_never_started: u64,
    /// Their queue waits: start (or the end of the day) minus when they became runnable.
    pub queue_wait_s: Waits,
    /// Idle (idle, starting and fenced) runner time over all runner time.
    pub idle_fraction: f64,
    /// All runner time, in hours.
    pub runner_hours: f64,
    /// Busy runner time, in hours.
    pub busy_runner_hours: f64,
    /// Autoscaler decisions that added runners.
    pub scale_ups: u64,
    /// Autoscaler decisions that fenced idle runners for retirement.
    pub scale_downs: u64,
    /// Runners created.
    pub runners_started: u64,
    /// Runners deleted by scale-down.
    pub runners_retired: u64,
    /// Runners deleted by scale-down while the backend had them running a job.
    pub busy_runners_killed: u64,
    /// Fenced runners the backend check found busy, and kept.
    pub retirements_kept_busy: u64,
    /// Scheduler ticks that had queued jobs to place.
    pub scheduler_ticks: u64,
    /// Per pool.
    pub pools: BTreeMap<String, PoolReport>,
    /// Per hour of the day.
    pub hours: Vec<HourReport>,
    /// Per minute of the day.
    pub series: Vec<Sample>,
}

/// What the engine counts while it runs.
#[derive(Debug)]
pub(super) struct Stats {
    window: (u64, u64),
    pub(super) builds: u64,
    /// Per pool: jobs that became runnable in the window.
    pub(super) queued: Vec<u64>,
    started: Vec<u64>,
    never: Vec<u64>,
    /// Per pool: waits (ms) of the window's jobs.
    waits: Vec<Vec<u32>>,
    /// Per hour of the window: waits (ms) of the jobs that became runnable in it.
    hour_waits: Vec<Vec<u32>>,
    /// Per pool and runner state: runner-milliseconds in the window.
    runner_ms: Vec<[u64; 4]>,
    /// Per hour and runner state, all pools.
    hour_runner_ms: Vec<[u64; 4]>,
    pub(super) scale_ups: u64,
    pub(super) scale_downs: u64,
    pub(super) runners_started: u64,
    pub(super) runners_retired: u64,
    pub(super) busy_runners_killed: u64,
    pub(super) retirements_kept_busy: u64,
    pub(super) ticks: u64,
    /// Per pool: the most runners one cell's pool had.
    pub(super) peak: Vec<u32>,
    pub(super) series: Vec<Sample>,
}

const HOURS: usize = 24;

impl Stats {
    pub(super) fn new(pools: usize, window: (u64, u64)) -> Self {
        Stats {
            window,
            builds: 0,
            queued: vec![0; pools],
            started: vec![0; pools],
            never: vec![0; pools],
            waits: vec![Vec::new(); pools],
            hour_waits: vec![Vec::new(); HOURS],
            runner_ms: vec![[0; 4]; pools],
            hour_runner_ms: vec![[0; 4]; HOURS],
            scale_ups: 0,
            scale_downs: 0,
            runners_started: 0,
            runners_retired: 0,
            busy_runners_killed: 0,
            retirements_kept_busy: 0,
            ticks: 0,
            peak: vec![0; pools],
            series: Vec::new(),
        }
    }

    fn hour_of(&self, t: u64) -> usize {
        (((t - self.window.0) / HOUR_MS) as usize).min(HOURS - 1)
    }

    /// A job of the window started after waiting `wait_ms`.
    pub(super) fn started(&mut self, pool: usize, queued_at: u64, wait_ms: u64) {
        let w = u32::try_from(wait_ms).unwrap_or(u32::MAX);
        self.started[pool] += 1;
        self.waits[pool].push(w);
        let h = self.hour_of(queued_at);
        self.hour_waits[h].push(w);
    }

    /// A job of the window was still waiting at its end, for `wait_ms` so far.
    pub(super) fn never_started(&mut self, pool: usize, wait_ms: u64) {
        let w = u32::try_from(wait_ms).unwrap_or(u32::MAX);
        self.never[pool] += 1;
        self.waits[pool].push(w);
        let h = self.hour_of(self.window.1 - wait_ms);
        self.hour_waits[h].push(w);
    }

    /// Runner time over `[from, to)` (inside the window) with `counts` runners per pool and
    /// state.
    pub(super) fn add_runner_time(&mut self, from: u64, to: u64, counts: &[[u32; 4]]) {
        let mut total = [0u64; 4];
        for (pool, c) in counts.iter().enumerate() {
            for s in 0..4 {
                let ms = u64::from(c[s]) * (to - from);
                self.runner_ms[pool][s] += ms;
                total[s] += u64::from(c[s]);
            }
        }
        let mut t = from;
        while t < to {
            let h = self.hour_of(t);
            let hour_end = (self.window.0 + (h as u64 + 1) * HOUR_MS).min(to);
            let end = if h == HOURS - 1 { to } else { hour_end };
            for (acc, n) in self.hour_runner_ms[h].iter_mut().zip(total) {
                *acc += n * (end - t);
            }
            t = end;
        }
    }

    pub(super) fn report(mut self, config: &Config, plan: &Plan, mode: &str) -> Report {
        let idle = |ms: &[u64; 4]| {
            let all: u64 = ms.iter().sum();
            if all == 0 {
                0.0
            } else {
                round((ms[0] + ms[1] + ms[2]) as f64 / all as f64, 4)
            }
        };
        let mut pools = BTreeMap::new();
        for (i, name) in plan.pools.iter().enumerate() {
            let ms = self.runner_ms[i];
            pools.insert(
                name.to_string(),
                PoolReport {
                    jobs: self.queued[i],
                    jobs_never_started: self.never[i],
                    queue_wait_s: Waits::of(&mut self.waits[i]),
                    idle_fraction: idle(&ms),
                    runner_hours: hours(ms.iter().sum()),
                    peak_runners: self.peak[i],
                },
            );
        }
        let mut all_ms = [0u64; 4];
        for ms in &self.runner_ms {
            for s in 0..4 {
                all_ms[s] += ms[s];
            }
        }
        let mut all_waits: Vec<u32> = self.waits.concat();
        let hours_report = (0..HOURS)
            .map(|h| {
                let ms = self.hour_runner_ms[h];
                HourReport {
                    hour: h as u32,
                    jobs: self.hour_waits[h].len() as u64,
                    queue_wait_s: Waits::of(&mut self.hour_waits[h]),
                    runners: round(ms.iter().sum::<u64>() as f64 / HOUR_MS as f64, 2),
                    busy: round(ms[3] as f64 / HOUR_MS as f64, 2),
                }
            })
            .collect();
        Report {
            workload: plan.name.to_owned(),
            mode: mode.to_owned(),
            seed: config.seed,
            days: plan.days,
            cells: config.cells,
            builds: self.builds,
            jobs: self.queued.iter().sum(),
            jobs_never_started: self.never.iter().sum(),
            queue_wait_s: Waits::of(&mut all_waits),
            idle_fraction: idle(&all_ms),
            runner_hours: hours(all_ms.iter().sum()),
            busy_runner_hours: hours(all_ms[3]),
            scale_ups: self.scale_ups,
            scale_downs: self.scale_downs,
            runners_started: self.runners_started,
            runners_retired: self.runners_retired,
            busy_runners_killed: self.busy_runners_killed,
            retirements_kept_busy: self.retirements_kept_busy,
            scheduler_ticks: self.ticks,
            pools,
            hours: hours_report,
            series: self.series,
        }
    }
}

fn hours(ms: u64) -> f64 {
    round(ms as f64 / HOUR_MS as f64, 2)
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}
