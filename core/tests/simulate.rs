//! `flotilla simulate`'s engine through its public API: determinism, the safety of
//! scale-down, the autoscaled pool against a static one, traces, and the time-of-day floor.
//! Runs are small (a few thousand builds over a few cells) so the suite stays fast in debug
//! builds; the full-scale figures are in `docs/benchmarks.md`.

use flotilla_core::autoscale::{FloorPolicy, Period, Policy};
use flotilla_core::simulate::{
    self, Config, HOUR_MS, MINUTE_MS, Plan, Profile, ProfileLoad, Report, Runners, TraceJob,
    Workload,
};
use flotilla_core::{PoolName, ProjectId};

fn config(seed: u64, cells: u32) -> Config {
    Config {
        seed,
        cells,
        ..Config::default()
    }
}

fn profile(profile: Profile, builds: u32) -> Workload {
    Workload::Profile(ProfileLoad {
        profile,
        builds_per_day: builds,
        projects: 40,
        large_share: 0.2,
    })
}

/// The simulator's default policy: the cell agent's, with a daily floor and room to grow.
fn policy(floor: Option<Period>) -> Policy {
    Policy {
        max: 1_000,
        floor: floor.map(|period| FloorPolicy {
            period,
            ..FloorPolicy::default()
        }),
        ..Policy::default()
    }
}

fn autoscaled(workload: &Workload, config: &Config, days: u32) -> Report {
    let plan = Plan::new(workload, config.seed, days).unwrap();
    simulate::run(
        config,
        &plan,
        &Runners::Autoscaled(policy(Some(Period::Day))),
    )
    .unwrap()
}

#[test]
fn the_same_seed_gives_the_same_report_and_another_seed_another() {
    let w = profile(Profile::Busy, 1_500);
    let a = autoscaled(&w, &config(7, 3), 1);
    let b = autoscaled(&w, &config(7, 3), 1);
    assert_eq!(a, b);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap(),
        "the JSON is byte for byte the same"
    );
    let c = autoscaled(&w, &config(8, 3), 1);
    assert_ne!(a.jobs, c.jobs, "another seed draws another day");
    assert_ne!(a.queue_wait_s, c.queue_wait_s);
    // The busy profile is busy in business hours and quiet at night.
    assert!(
        a.hours[10].jobs > 5 * a.hours[3].jobs,
        "10:00 {} vs 03:00 {}",
        a.hours[10].jobs,
        a.hours[3].jobs
    );
    // About five jobs a build, all started.
    assert!(a.jobs > 4 * a.builds && a.jobs < 6 * a.builds, "{a:?}");
    assert_eq!(a.jobs_never_started, 0);
}

#[test]
fn scale_down_never_kills_a_busy_runner_in_any_profile() {
    for p in Profile::ALL {
        let r = autoscaled(&profile(p, 1_200), &config(3, 3), 2);
        assert!(
            r.runners_retired > 0,
            "{}: scale-down never ran, so the check proves nothing",
            p.as_str()
        );
        assert_eq!(r.busy_runners_killed, 0, "{}", p.as_str());
        assert_eq!(r.jobs_never_started, 0, "{}", p.as_str());
        assert!(r.scale_ups > 0 && r.scale_downs > 0);
    }
}

#[test]
fn a_static_pool_sized_for_the_peak_idles_far_more_than_the_autoscaled_one() {
    let w = profile(Profile::Busy, 2_000);
    let config = config(5, 3);
    let plan = Plan::new(&w, config.seed, 1).unwrap();
    let auto = simulate::run(&config, &plan, &Runners::Autoscaled(policy(None))).unwrap();
    let peak = auto.pools.values().map(|p| p.peak_runners).max().unwrap();
    let fixed = simulate::run(&config, &plan, &Runners::static_all(&plan, peak)).unwrap();
    assert_eq!(auto.jobs, fixed.jobs, "the very same work");
    assert!(
        auto.idle_fraction < 0.35,
        "autoscaled idle {}",
        auto.idle_fraction
    );
    assert!(
        fixed.idle_fraction > 0.6 && fixed.idle_fraction > 2.0 * auto.idle_fraction,
        "static idle {} vs autoscaled {}",
        fixed.idle_fraction,
        auto.idle_fraction
    );
    assert!(fixed.runner_hours > 1.5 * auto.runner_hours);
    assert_eq!(fixed.busy_runners_killed, 0);
    assert_eq!(
        fixed.scale_ups + fixed.scale_downs,
        0,
        "a static pool never scales"
    );
}

#[test]
fn static_auto_finds_the_smallest_static_pools_meeting_the_p95() {
    let w = profile(Profile::Spiky, 800);
    let config = config(11, 2);
    let plan = Plan::new(&w, config.seed, 1).unwrap();
    let auto = simulate::run(&config, &plan, &Runners::Autoscaled(policy(None))).unwrap();
    let target = auto.queue_wait_s.p95_ms();
    let found = simulate::size_static(&config, &plan, target, Some(&auto)).unwrap();
    assert!(found.met);
    for (pool, n) in &found.runners {
        let name = pool.to_string();
        assert!(found.report.pools[&name].queue_wait_s.p95_ms() <= target);
        if *n > 1 {
            // One runner fewer in that pool misses the target.
            let mut smaller = found.runners.clone();
            smaller.insert(pool.clone(), n - 1);
            let r = simulate::run(&config, &plan, &Runners::Static(smaller)).unwrap();
            assert!(
                r.pools[&name].queue_wait_s.p95_ms() > target,
                "{name}: {} runners would do",
                n - 1
            );
        }
    }
}

fn trace_job(at_s: u64, duration_s: u64, pool: &str, project: &str) -> TraceJob {
    TraceJob {
        submit_ms: at_s * 1000,
        duration_ms: duration_s * 1000,
        pool: PoolName::new(pool).unwrap(),
        project: ProjectId::new(project).unwrap(),
    }
}

#[test]
fn a_trace_places_and_starts_every_job_in_its_pool() {
    let mut rows = Vec::new();
    for i in 0..300u64 {
        let pool = ["default", "large", "gpu"][(i % 3) as usize];
        let project = format!("team-{}", i % 7);
        rows.push(trace_job(i * 250, 30 + i % 200, pool, &project));
    }
    let plan = Plan::new(&Workload::Trace(rows), 1, 1).unwrap();
    assert_eq!(plan.pools().len(), 3);
    let r = simulate::run(
        &config(1, 4),
        &plan,
        &Runners::Autoscaled(policy(Some(Period::Day))),
    )
    .unwrap();
    assert_eq!(r.workload, "trace");
    assert_eq!(r.builds, 300);
    assert_eq!(r.jobs, 300);
    assert_eq!(r.jobs_never_started, 0);
    for pool in ["default", "large", "gpu"] {
        assert_eq!(r.pools[pool].jobs, 100, "{pool}");
    }
    // Jobs minutes apart, each waits for a cold runner: start-up plus at most a tick or so.
    assert!(
        r.queue_wait_s.p50 >= 5.0 && r.queue_wait_s.p50 < 6.0,
        "{r:?}"
    );
}

#[test]
fn the_time_of_day_floor_warms_the_pools_before_yesterdays_morning_burst() {
    // A quiet trickle all day, and 120 jobs of 50 minutes pushed at once at 09:00 every
    // day (the floor learns each hour's mean demand: ~100 runners for nine o'clock).
    let mut rows = Vec::new();
    for i in 0..96u64 {
        rows.push(trace_job(i * 900, 60, "default", "background"));
    }
    for i in 0..120u64 {
        rows.push(trace_job(
            9 * 3600,
            3000,
            "default",
            &format!("team-{}", i % 6),
        ));
    }
    let plan = Plan::new(&Workload::Trace(rows), 1, 2).unwrap();
    let config = config(1, 2);
    let run = |floor| simulate::run(&config, &plan, &Runners::Autoscaled(policy(floor))).unwrap();
    let with = run(Some(Period::Day));
    let without = run(None);
    let nine = |r: &Report| r.hours[9].queue_wait_s;
    // Without a floor the burst waits for runners to start; with one, day 1's demand kept
    // most of them warm from 08:45 on day 2.
    assert!(nine(&without).p50 >= 5.0, "{:?}", nine(&without));
    assert!(
        nine(&with).p50 < 1.0 && nine(&with).mean < nine(&without).mean / 2.0,
        "with {:?}, without {:?}",
        nine(&with),
        nine(&without)
    );
    // The warm runners cost idle time before the burst.
    assert!(with.hours[8].runners > without.hours[8].runners);
    assert_eq!(with.busy_runners_killed + without.busy_runners_killed, 0);
    // Sanity: the series covers the day, a sample a minute.
    assert_eq!(with.series.len() as u64, 24 * HOUR_MS / MINUTE_MS);
}

#[test]
fn settings_that_cannot_work_are_refused_with_what_to_change() {
    let w = profile(Profile::Busy, 100);
    assert!(Plan::new(&w, 1, 0).is_err(), "zero days");
    let plan = Plan::new(&w, 1, 1).unwrap();
    let bad = Policy {
        min: 5,
        max: 2,
        ..Policy::default()
    };
    let e = simulate::run(&config(1, 2), &plan, &Runners::Autoscaled(bad)).unwrap_err();
    assert!(e.to_string().contains("lower min"), "{e}");
    let e = simulate::run(&config(1, 0), &plan, &Runners::Autoscaled(policy(None))).unwrap_err();
    assert!(e.to_string().contains("cells"), "{e}");
    let late = Workload::Trace(vec![trace_job(90_000, 1, "default", "a")]);
    let e = Plan::new(&late, 1, 1).unwrap_err();
    assert!(e.to_string().contains("below 86400"), "{e}");
}
