//! The time-of-day floor: a pool's warm runners are up before its daily peak because the
//! demand of the same hour on earlier days (or the same hour of the week on earlier weeks)
//! says it is coming.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::HOUR_MS;

/// What repeats: the same hour every day, or the same hour of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// 24 hourly slots: weekdays and weekends alike.
    Day,
    /// 168 hourly slots, Monday 00:00 UTC first: quiet weekends stay quiet.
    Week,
}

impl Period {
    fn slots(self) -> usize {
        match self {
            Period::Day => 24,
            Period::Week => 168,
        }
    }

    /// The slot of an hour counted from the Unix epoch (a Thursday).
    fn slot(self, hour: u64) -> usize {
        match self {
            Period::Day => (hour % 24) as usize,
            // 1970-01-01 was a Thursday: Monday 00:00 is 72 hours before it.
            Period::Week => ((hour + 72) % 168) as usize,
        }
    }
}

/// How the floor is learnt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloorPolicy {
    /// What repeats.
    pub period: Period,
    /// Which quantile of the hour's past mean demands to keep warm (0–1; 0.9 ignores one
    /// odd day in ten).
    pub quantile: f64,
    /// How many past periods to learn from (the oldest is forgotten).
    pub periods: u32,
    /// How far ahead to look: the floor is the larger of now's and of this much later's, so
    /// runners are started before the hour that needs them.
    pub lookahead_ms: u64,
}

impl Default for FloorPolicy {
    fn default() -> Self {
        FloorPolicy {
            period: Period::Week,
            quantile: 0.9,
            periods: 4,
            lookahead_ms: 15 * 60 * 1000,
        }
    }
}

/// The mean demand of each hourly slot over the last few periods.
///
/// Mean, not peak: demand moves within an hour (builds fan out in batches, spikes last
/// minutes), and a floor at the hour's peak would hold the spike's height all hour. The
/// floor is for being ready when the day's load arrives; what comes on top within the hour
/// the demand-driven sizing answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemandHistory {
    period: Period,
    depth: usize,
    /// Per slot, the mean demands of earlier periods, oldest first.
    slots: Vec<VecDeque<u32>>,
    /// The hour being observed.
    current: Option<Hour>,
}

/// Demand seen so far in one hour, integrated over time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Hour {
    /// Hours since the epoch.
    hour: u64,
    /// The first sample's time.
    since_ms: u64,
    /// The last sample: its time and demand (which holds until the next).
    last_ms: u64,
    last: u32,
    /// Demand × milliseconds from `since_ms` to `last_ms`.
    area: u128,
}

impl DemandHistory {
    /// An empty history.
    pub fn new(period: Period, periods: u32) -> Self {
        DemandHistory {
            period,
            depth: periods.max(1) as usize,
            slots: vec![VecDeque::new(); period.slots()],
            current: None,
        }
    }

    /// Records the demand seen at `now_ms`; it holds until the next sample. Time only moves
    /// forward: a sample from before the last one is ignored.
    pub fn record(&mut self, now_ms: u64, demand: u32) {
        let hour = now_ms / HOUR_MS;
        match &mut self.current {
            Some(h) if now_ms < h.last_ms => {}
            Some(h) if h.hour == hour => {
                h.area += u128::from(h.last) * u128::from(now_ms - h.last_ms);
                h.last_ms = now_ms;
                h.last = demand;
            }
            _ => {
                self.close_hour();
                self.current = Some(Hour {
                    hour,
                    since_ms: now_ms,
                    last_ms: now_ms,
                    last: demand,
                    area: 0,
                });
            }
        }
    }

    /// Files the current hour's mean demand (rounded up) into its slot: the last sample
    /// holds to the end of the hour.
    fn close_hour(&mut self) {
        if let Some(h) = self.current.take() {
            let end = (h.hour + 1) * HOUR_MS;
            let area = h.area + u128::from(h.last) * u128::from(end - h.last_ms);
            let span = u128::from((end - h.since_ms).max(1));
            let mean = u32::try_from(area.div_ceil(span)).unwrap_or(u32::MAX);
            let slot = &mut self.slots[self.period.slot(h.hour)];
            if slot.len() == self.depth {
                slot.pop_front();
            }
            slot.push_back(mean);
        }
    }

    /// The demand to be ready for at `at_ms`: the `quantile` of the past mean demands of its
    /// hourly slot (nearest rank), 0 with no history.
    pub fn expected(&self, at_ms: u64, quantile: f64) -> u32 {
        let slot = &self.slots[self.period.slot(at_ms / HOUR_MS)];
        if slot.is_empty() {
            return 0;
        }
        let mut peaks: Vec<u32> = slot.iter().copied().collect();
        peaks.sort_unstable();
        let q = quantile.clamp(0.0, 1.0);
        let rank = ((q * peaks.len() as f64).ceil() as usize).clamp(1, peaks.len());
        peaks[rank - 1]
    }

    /// What repeats, and how many periods it keeps: a history is only worth restoring into
    /// a policy that learns the same way.
    pub fn shape(&self) -> (Period, usize) {
        (self.period, self.depth)
    }

    /// How many past hours the slot of `at_ms` holds.
    pub fn depth_at(&self, at_ms: u64) -> usize {
        self.slots[self.period.slot(at_ms / HOUR_MS)].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 24 * HOUR_MS;

    #[test]
    fn each_hours_mean_demand_over_time_is_filed_when_the_hour_ends() {
        let mut h = DemandHistory::new(Period::Day, 4);
        let nine = 9 * HOUR_MS;
        // 3 for 30 minutes, a 60-second spike of 100, then 10 to the end of the hour.
        h.record(nine, 3);
        h.record(nine + 30 * 60_000, 100);
        h.record(nine + 31 * 60_000, 10);
        assert_eq!(
            h.expected(nine + DAY_MS, 1.0),
            0,
            "nine o'clock is not over yet"
        );
        h.record(10 * HOUR_MS, 1);
        // (3·30 + 100·1 + 10·29) / 60 = 8 (rounded up): the spike does not hold all hour.
        assert_eq!(
            h.expected(nine + DAY_MS, 1.0),
            8,
            "the next day's nine o'clock"
        );
        assert_eq!(h.expected(nine + DAY_MS + 59 * 60_000, 1.0), 8);
        assert_eq!(h.expected(11 * HOUR_MS, 1.0), 0, "an hour never seen");
        // Time never runs backwards.
        h.record(nine, 1_000);
        h.record(11 * HOUR_MS, 0);
        assert_eq!(h.expected(nine + DAY_MS, 1.0), 8);
        assert_eq!(h.expected(10 * HOUR_MS + DAY_MS, 1.0), 1);
    }

    #[test]
    fn the_quantile_ignores_an_odd_day_and_old_days_are_forgotten() {
        let mut h = DemandHistory::new(Period::Day, 4);
        // Five days at 09:00: 10, 10, 10, 200 (a one-off), 10; only the last four are kept.
        for (day, peak) in [50, 10, 10, 200, 10].into_iter().enumerate() {
            let t = day as u64 * DAY_MS + 9 * HOUR_MS;
            h.record(t, peak);
            h.record(t + HOUR_MS, 0);
        }
        assert_eq!(h.depth_at(9 * HOUR_MS), 4);
        assert_eq!(h.expected(9 * HOUR_MS, 0.75), 10);
        assert_eq!(h.expected(9 * HOUR_MS, 1.0), 200);
        assert_eq!(h.expected(9 * HOUR_MS, 0.0), 10);
    }

    #[test]
    fn a_weekly_history_keeps_weekends_apart_from_weekdays() {
        let mut h = DemandHistory::new(Period::Week, 4);
        // 1970-01-05 was a Monday; the 10th a Saturday.
        let monday_9 = 4 * DAY_MS + 9 * HOUR_MS;
        let saturday_9 = 9 * DAY_MS + 9 * HOUR_MS;
        h.record(monday_9, 40);
        h.record(monday_9 + HOUR_MS, 0);
        h.record(saturday_9, 2);
        h.record(saturday_9 + HOUR_MS, 0);
        let week = 7 * DAY_MS;
        assert_eq!(h.expected(monday_9 + week, 1.0), 40);
        assert_eq!(h.expected(saturday_9 + week, 1.0), 2);
        assert_eq!(
            h.expected(monday_9 + DAY_MS, 1.0),
            0,
            "Tuesday is its own slot"
        );
    }
}
