//! Placement of queued jobs on cells (ARCHITECTURE §7): a pure function from a snapshot of the
//! replicated state to a batch of decisions, which the leader commits as one `PlaceJobs` entry.
//!
//! [`schedule`] runs once per scheduler tick:
//!
//! 1. **Order** — weighted fair queuing across tenants. A tenant is a project's
//!    [`Project::tenant`](crate::state::Project::tenant) group, or the project itself; its
//!    weight is the largest weight of its projects. The next decision always goes to the tenant
//!    with the smallest `(running + placed this tick) / weight` that still has a job that fits
//!    (ties by tenant name), so a monorepo with thousands of queued jobs cannot hold back a
//!    small project's one job, and under saturation each tenant's share of running jobs tends
//!    to its share of the weights. Inside a tenant: `boost` first (attempts the platform took
//!    back), then the oldest queue time, then the job id — first-come first-served, which is
//!    the aging that keeps a job from starving behind newer work of its own tenant.
//! 2. **Filter** — a job may go to a cell with a live session that is `Active`, meets the
//!    job's region and label constraints, has the job's pool with a free runner (pool size less
//!    the jobs leased or running there, less what this tick already put there) and has API
//!    budget left this tick. A job whose head-of-line neighbour does not fit is not held up
//!    by it: jobs are grouped by their constraints, and a group with no room left is skipped.
//! 3. **Score** — among the cells that fit: the project's [home cell](home_cell) (weighted
//!    rendezvous hashing, for cache locality), then cells in the home cell's region, then the
//!    most headroom (free runners as a fraction of the pool), then the smaller cell id. The
//!    cell an infrastructure failure took the job's previous attempt from
//!    ([`Job::avoid`](crate::state::Job::avoid)) is only used when no other cell fits.
//!
//! Everything is deterministic: maps are `BTreeMap`s or vectors sorted by id, no hash map
//! order reaches a decision, and no clock or randomness is read, so the same snapshot always
//! gives the same schedule.
//!
//! Cost: one pass over the jobs, grouping queued jobs into a heap per tenant and constraint
//! class (heapified in O(n), never sorted), then O(log n) per decision plus a look at the
//! class's candidate cells. At tens of thousands of queued jobs the pass is bound by memory:
//! by walking the job map, and by following each job's spec to its constraints, its project
//! and its cell. A [`Scheduler`] kept across ticks remembers what never changes about a job
//! (its constraint class, its project, its cell while it holds one fence), so a tick follows
//! those pointers only for jobs that are new to it. `core/examples/bench_placement.rs`
//! measures both ways.
//!
//! Known limit: there are no reservations. A job that only a few busy cells can take (a rare
//! label) gets a runner there when one is free at its turn; jobs that could run anywhere may
//! take that runner first in a tick where it comes up before the job's tenant does. Over
//! ticks the fair-share order brings the job's tenant first, so it waits, but less
//! predictably than a job that fits anywhere.
//!
//! Layout: this file holds the API; `tick.rs` one tick (tables, scan, the fair-share loop,
//! scoring); `classes.rs` constraint classes and the memory a [`Scheduler`] keeps;
//! `home.rs` the home-cell hashing; `first_fit.rs` the interim policy the federator calls
//! until it switches over.

mod classes;
mod first_fit;
mod home;
mod tick;

pub use first_fit::first_fit;
pub use home::{home_cell, rendezvous_hash};

use crate::ids::{CellId, JobId};
use crate::state::{Placement, State};

/// A cell whose agent has a live session with the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCell {
    /// The cell.
    pub id: CellId,
    /// Pod creations the cell may be asked for this tick (its reported API-server budget,
    /// scaled to the tick); `None` means no limit. A cell listed twice gets the smaller.
    pub budget: Option<u32>,
}

/// What one scheduler tick looks at.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The replicated state, as of the last applied entry.
    pub state: &'a State,
    /// The cells with a live session, in any order; no other cell gets work.
    pub live: &'a [LiveCell],
    /// Leader time (ms since the Unix epoch), the base of the leases handed out.
    pub now_ms: u64,
    /// How long a lease lasts unless the cell heartbeats.
    pub lease_ttl_ms: u64,
    /// The most decisions to return (one `PlaceJobs` entry's worth).
    pub limit: usize,
}

/// What a tick decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The decisions, in the order they were made (fair-share order), at most `limit`.
    pub placements: Vec<Placement>,
    /// Why the other queued jobs wait.
    pub waiting: Waiting,
}

/// Queued jobs that were not placed, by reason (for metrics and events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Queued jobs no live `Active` cell could ever take: no such cell meets their region and
    /// label constraints with a non-empty pool of theirs. They wait for a cell to (re)connect
    /// or for someone to fix the pipeline. By job id.
    pub unplaceable: Vec<JobId>,
    /// Queued jobs some live `Active` cell could take but that were not placed this tick: the
    /// cells that could were full or out of API budget, or the batch reached `limit` (then
    /// calling again places more).
    pub no_capacity: usize,
}

/// Places queued jobs on live cells: fair share across tenants, FIFO with priorities within
/// one, home cell then region then headroom (see the module docs). Pure and deterministic.
///
/// This reads every queued job's constraints; a leader that ticks repeatedly should keep a
/// [`Scheduler`], which decides exactly the same but remembers them between ticks.
pub fn schedule(s: &Snapshot<'_>) -> Schedule {
    tick::run(s, &mut classes::Memory::default())
}

/// [`schedule`] with a memory: remembers each queued job's constraint class from one tick to
/// the next (a job's spec never changes), so a tick reads the constraints only of jobs queued
/// since the previous one.
///
/// Its decisions are exactly [`schedule`]'s for the same snapshot, whatever it remembers: a
/// remembered job counts only if its id and its very spec (`Arc` identity) match. Keep one per
/// leader term and drop it with leadership; it holds about 24 bytes and a spec reference per
/// queued job, and starts over if pipelines keep inventing new constraints.
#[derive(Debug)]
pub struct Scheduler {
    memory: classes::Memory,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new()
    }
}

impl Scheduler {
    /// A scheduler that remembers nothing yet.
    pub fn new() -> Self {
        Scheduler {
            memory: classes::Memory::remembering(),
        }
    }

    /// One tick: see [`schedule`].
    pub fn schedule(&mut self, s: &Snapshot<'_>) -> Schedule {
        tick::run(s, &mut self.memory)
    }
}
