//! The interim first-fit policy of the Cell agent issue: oldest job first, first cell (by id)
//! that can take it. [`super::schedule`] replaces it (fair share, home cells, budgets); it stays
//! until the federator's scheduler loop is switched over, with the same signature.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::CellId;
use crate::state::{CellState, Placement, State};

/// Places as many queued jobs as fit, oldest first, on the first cell (by id) that is
/// `Active`, has a live session (`live`), meets the job's region and label constraints, and
/// has a free runner in the job's pool. A cell's free runners are its pool's size less the
/// jobs already leased to or running on it there. At most `limit` decisions.
pub fn first_fit(
    state: &State,
    live: &BTreeSet<CellId>,
    now_ms: u64,
    lease_ttl_ms: u64,
    limit: usize,
) -> Vec<Placement> {
    let mut free: BTreeMap<(&CellId, &str), u32> = BTreeMap::new();
    for cell in state.cells.values() {
        if cell.state != CellState::Active || !live.contains(&cell.id) {
            continue;
        }
        for (pool, max) in &cell.pools {
            free.insert((&cell.id, pool.as_str()), *max);
        }
    }
    if free.is_empty() {
        return Vec::new();
    }
    for job in state.jobs.values() {
        if let Some(cell) = job.run.cell()
            && let Some(n) = free.get_mut(&(cell, State::pool_of(job)))
        {
            *n = n.saturating_sub(1);
        }
    }
    let mut out = Vec::new();
    for job in state.queued_jobs() {
        if out.len() >= limit {
            break;
        }
        let pool = State::pool_of(job);
        let constraints = &job.spec.placement;
        let chosen = state.cells.values().find(|c| {
            free.get(&(&c.id, pool)).is_some_and(|n| *n > 0)
                && constraints.region.as_ref().is_none_or(|r| *r == c.region)
                && constraints
                    .labels
                    .iter()
                    .all(|(k, v)| c.labels.get(k) == Some(v))
        });
        if let Some(cell) = chosen {
            *free.get_mut(&(&cell.id, pool)).expect("checked") -= 1;
            out.push(Placement {
                job: job.id,
                cell: cell.id.clone(),
                lease_expires_at_ms: now_ms + lease_ttl_ms,
            });
        }
    }
    out
}
