//! The book: what a [`Scheduler`](super::Scheduler) keeps between ticks, so a tick costs the
//! jobs that changed and the jobs it places, not every job in the state.
//!
//! It holds every queued job in a set per (project, constraint class), ordered best first,
//! and counts the leased and running jobs per project and per (cell, pool). It follows the
//! state through the job table's change log ([`Jobs::changed_since`]): each tick it re-reads
//! only the jobs changed since the last one. When it cannot follow (the first tick, another
//! state, a log that moved past it) it reads every job once and carries on from there.
//!
//! It holds no decision of its own: everything in it is a function of the state, so a
//! placement that was never committed leaves nothing behind.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::classes::Classes;
use crate::ids::{CellId, JobId, ProjectId};
use crate::job::JobPhase;
use crate::state::{Job, JobCursor, State};

/// Values interned to dense indices.
#[derive(Debug)]
pub(super) struct Interner<T> {
    items: Vec<T>,
    index: BTreeMap<T, u32>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            items: Vec::new(),
            index: BTreeMap::new(),
        }
    }
}

impl<T: Ord + Clone> Interner<T> {
    /// The index of `v`, interning it if new.
    pub(super) fn intern<Q>(&mut self, v: &Q) -> u32
    where
        T: Borrow<Q>,
        Q: Ord + ?Sized + ToOwned<Owned = T>,
    {
        if let Some(i) = self.index.get(v) {
            return *i;
        }
        let i = self.items.len() as u32;
        self.items.push(v.to_owned());
        self.index.insert(v.to_owned(), i);
        i
    }

    /// The index of `v`, if interned.
    pub(super) fn get<Q>(&self, v: &Q) -> Option<u32>
    where
        T: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.index.get(v).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}

impl<T> std::ops::Index<u32> for Interner<T> {
    type Output = T;

    fn index(&self, i: u32) -> &T {
        &self.items[i as usize]
    }
}

/// A queued job in its queue, ordered best first: boosted (taken back by the platform)
/// first, then the oldest queue time, then the lower id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Queued {
    boost: Reverse<u32>,
    queued_at_ms: u64,
    pub(super) id: JobId,
    /// The cell to avoid (interned); never decides the order, ids being unique.
    pub(super) avoid: Option<u32>,
}

/// Where a tracked job is.
#[derive(Debug, Clone, Copy)]
enum At {
    Queued(Queued),
    /// Leased or running, on this cell (interned; a job out without a cell has none).
    Out(Option<u32>),
}

/// A tracked (queued, leased or running) job.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    project: u32,
    class: u32,
    at: At,
}

/// Tracked jobs by id, in pages of consecutive ids: ids are handed out in order and the jobs
/// alive at once have ids close together, so a few hundred pages hold them, and a tick's
/// changes, looked up in id order, mostly fall in a page just used.
#[derive(Debug, Default)]
struct Pages {
    pages: BTreeMap<u64, Page>,
}

const PAGE: usize = 256;

#[derive(Debug)]
struct Page {
    /// Tracked jobs in the page.
    len: u32,
    slots: Box<[Option<Tracked>; PAGE]>,
}

impl Pages {
    fn at(id: JobId) -> (u64, usize) {
        (id.0 / PAGE as u64, (id.0 % PAGE as u64) as usize)
    }

    fn get(&self, id: JobId) -> Option<Tracked> {
        let (page, slot) = Pages::at(id);
        self.pages.get(&page).and_then(|p| p.slots[slot])
    }

    fn insert(&mut self, id: JobId, t: Tracked) {
        let (page, slot) = Pages::at(id);
        let p = self.pages.entry(page).or_insert_with(|| Page {
            len: 0,
            slots: Box::new([None; PAGE]),
        });
        if p.slots[slot].replace(t).is_none() {
            p.len += 1;
        }
    }

    fn remove(&mut self, id: JobId) {
        let (page, slot) = Pages::at(id);
        if let Some(p) = self.pages.get_mut(&page)
            && p.slots[slot].take().is_some()
        {
            p.len -= 1;
            if p.len == 0 {
                self.pages.remove(&page);
            }
        }
    }

    fn clear(&mut self) {
        self.pages.clear();
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Book {
    /// Where in the state's job log the book is; `None` before it read a state.
    cursor: Option<JobCursor>,
    pub(super) projects: Interner<ProjectId>,
    pub(super) cells: Interner<CellId>,
    pub(super) pools: Interner<String>,
    pub(super) classes: Classes,
    /// The pool of each class (interned).
    class_pool: Vec<u32>,
    /// Every queued, leased or running job.
    jobs: Pages,
    /// Queued jobs by (project, class), best first; no set is empty.
    pub(super) queues: BTreeMap<(u32, u32), BTreeSet<Queued>>,
    /// Leased and running jobs by cell, then pool.
    out_slots: Vec<Vec<u32>>,
    /// Leased and running jobs per project.
    pub(super) out_projects: Vec<u32>,
    /// The project of the last job added.
    last_project: Option<u32>,
}

/// Interned values beyond this many more than the state needs make the book start over.
const SLACK: usize = 1_024;

impl Book {
    /// Brings the book up to date with `state`. True when it started over, interning
    /// projects afresh: whatever is kept by the book's project index elsewhere (home cells)
    /// must be forgotten.
    pub(super) fn sync(&mut self, state: &State) -> bool {
        let restart = self.projects.len() > 2 * state.projects.len() + SLACK
            || self.cells.len() > 2 * state.cells.len() + SLACK
            || self.classes.len() > 2 * self.classes.in_use() + SLACK;
        if restart {
            // Projects, cells or constraints came and went: forget them.
            *self = Book::default();
        }
        let changed = self.cursor.and_then(|c| state.jobs.changed_since(c));
        match changed {
            Some(ids) => {
                // Each job once, in id order: a job changes several times between ticks
                // (placed, started, finished), and lookups in id order walk the state's
                // tree mostly through nodes just visited.
                let mut ids: Vec<JobId> = ids.collect();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let job = state.jobs.get(&id);
                    let old = self.jobs.get(id);
                    if let (Some(job), Some(old)) = (job, old)
                        && self.still(job, &old)
                    {
                        continue;
                    }
                    if let Some(t) = old {
                        self.jobs.remove(id);
                        self.untrack(t);
                    }
                    if let Some(job) = job {
                        self.track(job, old.map(|t| (t.project, t.class)));
                    }
                }
            }
            None => {
                self.jobs.clear();
                self.queues.clear();
                self.out_slots.iter_mut().flatten().for_each(|n| *n = 0);
                self.out_projects.iter_mut().for_each(|n| *n = 0);
                self.classes.release_all();
                for job in state.jobs.values() {
                    self.track(job, None);
                }
            }
        }
        self.cursor = Some(state.jobs.cursor());
        restart
    }

    /// Leased and running jobs in a pool (interned) of a cell (interned).
    pub(super) fn out_in(&self, cell: u32, pool: u32) -> u32 {
        self.out_slots
            .get(cell as usize)
            .and_then(|pools| pools.get(pool as usize))
            .copied()
            .unwrap_or(0)
    }

    /// Whether the book already has `job` where it is (a lease renewed, a leased job
    /// started: nothing the scheduler looks at changed).
    fn still(&self, job: &Job, old: &Tracked) -> bool {
        match old.at {
            At::Out(cell) => {
                matches!(job.phase(), JobPhase::Leased | JobPhase::Running)
                    && job.run.cell().map(|c| self.cells.get(c)) == cell.map(Some)
            }
            At::Queued(q) => {
                job.phase() == JobPhase::Queued
                    && job.boost == q.boost.0
                    && job.queued_at_ms.unwrap_or(0) == q.queued_at_ms
                    && job.avoid.as_ref().map(|c| self.cells.get(c)) == q.avoid.map(Some)
            }
        }
    }

    /// Adds a job, if it is queued, leased or running. `known` is its project and class when
    /// the book had them already (they never change for a job).
    fn track(&mut self, job: &Job, known: Option<(u32, u32)>) {
        let at = match job.phase() {
            JobPhase::Queued => At::Queued(Queued {
                boost: Reverse(job.boost),
                // A queued job always has a queue time; were one missing it would count
                // as oldest.
                queued_at_ms: job.queued_at_ms.unwrap_or(0),
                id: job.id,
                avoid: job.avoid.as_ref().map(|c| self.cells.intern(c)),
            }),
            JobPhase::Leased | JobPhase::Running => {
                At::Out(job.run.cell().map(|c| self.cells.intern(c)))
            }
            _ => return,
        };
        let (project, class) = known.unwrap_or_else(|| {
            // New jobs come a build at a time, all of one project.
            let project = match self.last_project {
                Some(p) if self.projects[p] == job.project => p,
                _ => self.projects.intern(&job.project),
            };
            self.last_project = Some(project);
            let class = self.classes.of(&job.spec.placement);
            if class as usize == self.class_pool.len() {
                let pool = self.pools.intern(self.classes.key(class).pool.as_str());
                self.class_pool.push(pool);
            }
            (project, class)
        });
        self.classes.hold(class);
        match at {
            At::Queued(q) => {
                self.queues.entry((project, class)).or_default().insert(q);
            }
            At::Out(cell) => {
                if self.out_projects.len() <= project as usize {
                    self.out_projects.resize(project as usize + 1, 0);
                }
                self.out_projects[project as usize] += 1;
                if let Some(cell) = cell {
                    let pool = self.class_pool[class as usize] as usize;
                    if self.out_slots.len() <= cell as usize {
                        self.out_slots.resize_with(cell as usize + 1, Vec::new);
                    }
                    let pools = &mut self.out_slots[cell as usize];
                    if pools.len() <= pool {
                        pools.resize(pool + 1, 0);
                    }
                    pools[pool] += 1;
                }
            }
        }
        self.jobs.insert(job.id, Tracked { project, class, at });
    }

    /// Takes out what [`Book::track`] put in.
    fn untrack(&mut self, t: Tracked) {
        self.classes.release(t.class);
        match t.at {
            At::Queued(q) => {
                let key = (t.project, t.class);
                if let Some(set) = self.queues.get_mut(&key) {
                    set.remove(&q);
                    if set.is_empty() {
                        self.queues.remove(&key);
                    }
                }
            }
            At::Out(cell) => {
                self.out_projects[t.project as usize] -= 1;
                if let Some(cell) = cell {
                    let pool = self.class_pool[t.class as usize] as usize;
                    self.out_slots[cell as usize][pool] -= 1;
                }
            }
        }
    }
}
