//! How many runners a pool should have, from its total workload.

use serde::{Deserialize, Serialize};

use super::PoolLoad;
use super::floor::{DemandHistory, FloorPolicy};

/// How one pool is sized. Durations in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Fewest runners, busy or idle, even with no work.
    pub min: u32,
    /// Most runners at once (the pool's capacity as placement sees it).
    pub max: u32,
    /// The share of runners that should be busy (0–1]: the pool is sized to
    /// `ceil(demand / target_utilisation)`, so `0.8` keeps one runner in five warm.
    pub target_utilisation: f64,
    /// Most runners added by one decision.
    pub scale_up_step: u32,
    /// After adding runners, how long before adding more. Together with the step it caps
    /// how fast the pool grows (`scale_up_step` per cooldown) — which also paces replacing
    /// one-shot runners as their jobs end, so keep the cooldown short next to the step.
    pub scale_up_cooldown_ms: u64,
    /// How long the pool must have been larger than needed before idle runners are retired:
    /// demand that dips between two builds does not cost a cold start.
    pub scale_down_delay_ms: u64,
    /// The time-of-day floor; `None` sizes from current demand alone.
    pub floor: Option<FloorPolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min: 0,
            max: 10,
            target_utilisation: 0.8,
            scale_up_step: 50,
            scale_up_cooldown_ms: 2_000,
            scale_down_delay_ms: 120_000,
            floor: Some(FloorPolicy::default()),
        }
    }
}

/// A policy that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// `min` above `max`.
    #[error("min ({min}) is larger than max ({max}); lower min or raise max")]
    MinAboveMax {
        /// The minimum.
        min: u32,
        /// The maximum.
        max: u32,
    },
    /// A target utilisation outside (0, 1].
    #[error(
        "target_utilisation must be more than 0 and at most 1 (0.8 keeps a fifth of the pool warm), not {0}"
    )]
    Target(f64),
    /// A zero step.
    #[error("scale_up_step must be at least 1")]
    Step,
    /// A floor quantile outside [0, 1].
    #[error("floor.quantile must be between 0 and 1 (0.9 is usual), not {0}")]
    Quantile(f64),
}

impl Policy {
    /// Checks the policy makes sense.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.min > self.max {
            return Err(PolicyError::MinAboveMax {
                min: self.min,
                max: self.max,
            });
        }
        if !(self.target_utilisation > 0.0 && self.target_utilisation <= 1.0) {
            return Err(PolicyError::Target(self.target_utilisation));
        }
        if self.scale_up_step == 0 {
            return Err(PolicyError::Step);
        }
        if let Some(f) = &self.floor
            && !(0.0..=1.0).contains(&f.quantile)
        {
            return Err(PolicyError::Quantile(f.quantile));
        }
        Ok(())
    }

    /// Runners needed for `demand` at the target utilisation.
    fn runners_for(&self, demand: u32) -> u32 {
        if demand == 0 {
            return 0;
        }
        (f64::from(demand) / self.target_utilisation - 1e-9).ceil() as u32
    }
}

/// What to do with a pool now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing.
    Hold,
    /// Start this many runners.
    Add(u32),
    /// Retire this many idle runners (two-phase: see [`RunnerPool`](super::RunnerPool)).
    Retire(u32),
}

/// Why the pool is sized as it is (a bounded set, for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Why {
    /// Current demand over the target utilisation.
    Demand,
    /// The time-of-day floor, above current demand.
    Floor,
    /// The pool's minimum.
    Min,
    /// The pool's maximum capped it.
    Max,
}

impl Why {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Demand => "demand",
            Why::Floor => "floor",
            Why::Min => "min",
            Why::Max => "max",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The runners the pool should have.
    pub desired: u32,
    /// What sets `desired`.
    pub why: Why,
    /// What to do about it now (limited by the step, the cooldown, the scale-down delay and
    /// the idle runners there are to retire).
    pub change: Change,
}

/// Sizes one pool over time: a [`Policy`] plus what it remembers (the last scale-up, since
/// when the pool has been too large, the demand history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Autoscaler {
    policy: Policy,
    last_up_ms: Option<u64>,
    /// Since when desired has been below the pool's size.
    over_since_ms: Option<u64>,
    history: Option<DemandHistory>,
}

impl Autoscaler {
    /// An autoscaler that remembers nothing yet.
    pub fn new(policy: Policy) -> Self {
        let history = policy
            .floor
            .as_ref()
            .map(|f| DemandHistory::new(f.period, f.periods));
        Autoscaler {
            policy,
            last_up_ms: None,
            over_since_ms: None,
            history,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The demand history the floor is learnt from, when there is a floor.
    pub fn history(&self) -> Option<&DemandHistory> {
        self.history.as_ref()
    }

    /// Replaces the demand history with one saved by an earlier run, when the policy has a
    /// floor learnt the same way (same period and depth). True when it was taken.
    pub fn restore_history(&mut self, history: DemandHistory) -> bool {
        match &mut self.history {
            Some(h) if h.shape() == history.shape() => {
                *h = history;
                true
            }
            _ => false,
        }
    }

    /// The runners the pool should have at `now_ms` for `load`, and why.
    fn desired(&self, now_ms: u64, load: &PoolLoad) -> (u32, Why) {
        let p = &self.policy;
        let mut desired = (p.runners_for(load.demand()), Why::Demand);
        if let (Some(f), Some(h)) = (&p.floor, &self.history) {
            let expected = h
                .expected(now_ms, f.quantile)
                .max(h.expected(now_ms.saturating_add(f.lookahead_ms), f.quantile));
            // The floor is the demand to expect, not runners over the target utilisation:
            // it is an hour's mean, and the headroom above it is the demand sizing's job.
            let floor = expected;
            if floor > desired.0 {
                desired = (floor, Why::Floor);
            }
        }
        if p.min > desired.0 {
            desired = (p.min, Why::Min);
        }
        if desired.0 > p.max {
            desired = (p.max, Why::Max);
        }
        desired
    }

    /// Records `load` and decides what to do with the pool at `now_ms`. Call it on every
    /// change of the pool or its queue and now and then besides (the delays need a clock).
    pub fn decide(&mut self, now_ms: u64, load: PoolLoad) -> Decision {
        if let Some(h) = &mut self.history {
            h.record(now_ms, load.demand());
        }
        let (desired, why) = self.desired(now_ms, &load);
        let total = load.total();
        let p = &self.policy;
        let change = if desired > total {
            self.over_since_ms = None;
            let cooling = self
                .last_up_ms
                .is_some_and(|t| now_ms < t.saturating_add(p.scale_up_cooldown_ms));
            if cooling {
                Change::Hold
            } else {
                self.last_up_ms = Some(now_ms);
                Change::Add((desired - total).min(p.scale_up_step))
            }
        } else if desired < total {
            let since = *self.over_since_ms.get_or_insert(now_ms);
            let n = (total - desired).min(load.idle);
            if now_ms < since.saturating_add(p.scale_down_delay_ms) || n == 0 {
                Change::Hold
            } else {
                Change::Retire(n)
            }
        } else {
            self.over_since_ms = None;
            Change::Hold
        };
        Decision {
            desired,
            why,
            change,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::Period;

    fn load(busy: u32, idle: u32, starting: u32, queued: u32) -> PoolLoad {
        PoolLoad {
            busy,
            idle,
            starting,
            fenced: 0,
            queued,
        }
    }

    fn policy() -> Policy {
        Policy {
            min: 2,
            max: 100,
            target_utilisation: 0.8,
            scale_up_step: 20,
            scale_up_cooldown_ms: 5_000,
            scale_down_delay_ms: 60_000,
            floor: None,
        }
    }

    #[test]
    fn a_burst_scales_up_by_at_most_a_step_per_cooldown_and_counts_starting_runners() {
        let mut a = Autoscaler::new(policy());
        // 4 busy of 4 and 40 queued: demand 44 needs 55 runners; the first step adds 20.
        let d = a.decide(0, load(4, 0, 0, 40));
        assert_eq!(
            (d.desired, d.why, d.change),
            (55, Why::Demand, Change::Add(20))
        );
        // Within the cooldown nothing more, however large the queue.
        assert_eq!(a.decide(1_000, load(4, 0, 20, 40)).change, Change::Hold);
        // After it: the runners still starting count, so only the rest is added.
        assert_eq!(a.decide(5_000, load(4, 0, 20, 40)).change, Change::Add(20));
        assert_eq!(a.decide(10_000, load(4, 0, 40, 40)).change, Change::Add(11));
        assert_eq!(a.decide(15_000, load(44, 11, 0, 0)).change, Change::Hold);
    }

    #[test]
    fn the_pool_stays_between_min_and_max() {
        let mut a = Autoscaler::new(policy());
        let d = a.decide(0, load(0, 0, 0, 0));
        assert_eq!((d.desired, d.why, d.change), (2, Why::Min, Change::Add(2)));
        let d = a.decide(10_000, load(2, 0, 0, 500));
        assert_eq!((d.desired, d.why), (100, Why::Max));
    }

    #[test]
    fn idle_runners_are_retired_only_after_the_scale_down_delay_and_never_busy_ones() {
        let mut a = Autoscaler::new(policy());
        // 10 busy, 30 idle: 13 needed, 27 too many, but not before a minute has passed.
        assert_eq!(a.decide(0, load(10, 30, 0, 0)).change, Change::Hold);
        assert_eq!(a.decide(59_999, load(10, 30, 0, 0)).change, Change::Hold);
        assert_eq!(
            a.decide(60_000, load(10, 30, 0, 0)).change,
            Change::Retire(27)
        );
        // Demand back up in between resets the delay.
        let mut a = Autoscaler::new(policy());
        a.decide(0, load(10, 30, 0, 0));
        a.decide(30_000, load(40, 0, 0, 0));
        assert_eq!(a.decide(60_000, load(10, 30, 0, 0)).change, Change::Hold);
        assert_eq!(
            a.decide(120_000, load(10, 30, 0, 0)).change,
            Change::Retire(27)
        );
        // Too many runners, but all busy: nothing can go.
        let mut a = Autoscaler::new(Policy { max: 5, ..policy() });
        a.decide(0, load(8, 0, 0, 0));
        assert_eq!(a.decide(60_000, load(8, 0, 0, 0)).change, Change::Hold);
        // Some idle: only those.
        assert_eq!(a.decide(61_000, load(6, 1, 0, 0)).change, Change::Retire(1));
    }

    #[test]
    fn the_time_of_day_floor_warms_the_pool_before_yesterdays_peak() {
        const HOUR: u64 = 3_600_000;
        const DAY: u64 = 24 * HOUR;
        let floor = FloorPolicy {
            period: Period::Day,
            quantile: 0.9,
            periods: 7,
            lookahead_ms: 15 * 60_000,
        };
        let mut a = Autoscaler::new(Policy {
            min: 0,
            floor: Some(floor),
            ..policy()
        });
        // Yesterday: quiet until 09:00, then 40 jobs at once for an hour.
        a.decide(8 * HOUR, load(0, 0, 0, 0));
        a.decide(9 * HOUR, load(0, 0, 0, 40));
        a.decide(10 * HOUR, load(0, 0, 0, 0));
        // Today at 08:30 nothing runs: no floor yet (the lookahead reaches 08:45).
        let d = a.decide(DAY + 8 * HOUR + 30 * 60_000, load(0, 0, 0, 0));
        assert_eq!((d.desired, d.change), (0, Change::Hold));
        // At 08:45 the floor for 09:00 applies: yesterday's 40 ready, a step at a time.
        let d = a.decide(DAY + 8 * HOUR + 45 * 60_000, load(0, 0, 0, 0));
        assert_eq!(
            (d.desired, d.why, d.change),
            (40, Why::Floor, Change::Add(20))
        );
        // Without the floor, the same morning waits for the queue.
        let mut plain = Autoscaler::new(Policy { min: 0, ..policy() });
        let d = plain.decide(DAY + 8 * HOUR + 45 * 60_000, load(0, 0, 0, 0));
        assert_eq!((d.desired, d.change), (0, Change::Hold));
    }

    #[test]
    fn a_policy_that_cannot_work_is_refused_with_what_to_change() {
        let bad = Policy {
            min: 5,
            max: 2,
            ..Policy::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("lower min")
        );
        for t in [0.0, 1.5, f64::NAN] {
            let bad = Policy {
                target_utilisation: t,
                ..Policy::default()
            };
            assert!(matches!(bad.validate(), Err(PolicyError::Target(_))));
        }
        assert!(Policy::default().validate().is_ok());
    }
}
