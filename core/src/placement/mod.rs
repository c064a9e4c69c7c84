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
//! Cost: a [`Scheduler`] kept across ticks keeps a *book* — the queued jobs in a set per
//! (project, constraint class), best first, and counts of the leased and running jobs per
//! project and per cell pool — and brings it up to date each tick from the job table's change
//! log ([`Jobs::changed_since`](crate::state::Jobs::changed_since)), reading only the jobs that
//! changed. A tick then costs those changes (a lookup and a set update each), the cells,
//! projects and queues (not their jobs), and O(log n) per decision; the only jobs it walks
//! are the unplaceable ones, which it lists.
//! Home cells are remembered while the cells stay the same. The one-off [`schedule`] builds
//! the book from every job; `core/examples/bench_placement.rs` measures both ways.
//!
//! Known limit: there are no reservations. A job that only a few busy cells can take (a rare
//! label) gets a runner there when one is free at its turn; jobs that could run anywhere may
//! take that runner first in a tick where it comes up before the job's tenant does. Over
//! ticks the fair-share order brings the job's tenant first, so it waits, but less
//! predictably than a job that fits anywhere.
//!
//! Layout: this file holds the API; `tick.rs` one tick (tables, the fair-share loop,
//! scoring); `book.rs` what a [`Scheduler`] keeps between ticks; `classes.rs` constraint
//! classes; `home.rs` the home-cell hashing; `first_fit.rs` the interim policy the federator
//! called before this one.

mod book;
mod classes;
mod first_fit;
mod home;
mod tick;

pub use first_fit::first_fit;
pub use home::{home_cell, rendezvous_hash};

use book::Book;
use home::HomeCache;
pub(crate) use home::splitmix64;

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
/// This reads every job in the state; a leader that ticks repeatedly should keep a
/// [`Scheduler`], which decides exactly the same but reads only the jobs that changed.
pub fn schedule(s: &Snapshot<'_>) -> Schedule {
    tick::run(s, &mut Book::default(), &mut HomeCache::default())
}

/// [`schedule`] with a memory: keeps its view of the queued and running jobs (its book)
/// from one tick to the next and brings it up to date from the job table's change log, so a
/// tick reads only the jobs that changed since the previous one, and remembers home cells
/// while the cells stay the same.
///
/// Its decisions are exactly [`schedule`]'s for the same snapshot, whatever it saw before: a
/// state it cannot follow (another state, a copy, one whose log moved past it) is read whole,
/// once. Keep one per leader term and drop it with leadership; it holds about 100 bytes per
/// queued or running job.
#[derive(Debug, Default)]
pub struct Scheduler {
    book: Book,
    homes: HomeCache,
}

impl Scheduler {
    /// A scheduler that knows nothing yet.
    pub fn new() -> Self {
        Scheduler::default()
    }

    /// One tick: see [`schedule`].
    pub fn schedule(&mut self, s: &Snapshot<'_>) -> Schedule {
        tick::run(s, &mut self.book, &mut self.homes)
    }
}
