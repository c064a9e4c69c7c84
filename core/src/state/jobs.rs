//! The job table of the replicated state, which also keeps a log of the jobs that changed.
//!
//! Reads go straight to the map (`Jobs` derefs to a `BTreeMap<JobId, Arc<Job>>`). Every way to
//! change a job (`get_mut`, `insert`, `remove`) first notes its id in a bounded in-memory
//! log, so a reader that keeps its own view of the jobs — the leader's
//! [`Scheduler`](crate::placement::Scheduler) — can catch up with [`Jobs::changed_since`] by
//! looking at the jobs that changed instead of walking all of them.
//!
//! Jobs are shared (`Arc`), so copying the table for a snapshot copies pointers, not jobs,
//! and takes the state lock for milliseconds instead of tens of them; a job is copied only
//! when it changes while a snapshot still holds it (`Arc::make_mut` in [`Jobs::get_mut`]).
//!
//! The log is not replicated state: it is not serialized, not compared, and starts empty (in
//! a new *epoch*) whenever the table is built, cloned or deserialized. A cursor from another
//! epoch, or one the log has moved past (it keeps the last [`LOG_MAX`] changes), gets `None`,
//! and the reader rebuilds its view from the whole table.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Job;
use crate::ids::JobId;

/// How many changes the log keeps. A reader that falls further behind rebuilds its view.
pub(crate) const LOG_MAX: usize = 1 << 18;

/// Hands out epochs: unique per table in this process, never reused.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

fn fresh_epoch() -> u64 {
    EPOCHS.fetch_add(1, Ordering::Relaxed)
}

/// A reader's place in a table's change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor {
    epoch: u64,
    position: u64,
}

/// The jobs by id, with the log of which changed (see the module docs).
pub struct Jobs {
    map: BTreeMap<JobId, Arc<Job>>,
    /// The largest id ever inserted in this epoch: `apply` only ever adds larger ones.
    newest: Option<JobId>,
    epoch: u64,
    /// The position of `log[0]`.
    base: u64,
    log: VecDeque<JobId>,
}

impl Jobs {
    /// An empty table.
    pub fn new() -> Self {
        Jobs::from_map(BTreeMap::new())
    }

    fn from_map(map: BTreeMap<JobId, Arc<Job>>) -> Self {
        Jobs {
            newest: map.keys().next_back().copied(),
            map,
            epoch: fresh_epoch(),
            base: 0,
            log: VecDeque::new(),
        }
    }

    fn note(&mut self, id: JobId) {
        if self.log.len() == LOG_MAX {
            self.log.pop_front();
            self.base += 1;
        }
        self.log.push_back(id);
    }

    /// The job, to change it (noted as changed).
    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut Job> {
        if !self.map.contains_key(id) {
            return None;
        }
        self.note(*id);
        self.map.get_mut(id).map(Arc::make_mut)
    }

    /// Adds a job, returning the one it replaces. `apply` only adds ids larger than any
    /// before; an id at or below the largest ever added (a job replaced, or a removed id put
    /// back, perhaps as another project's job) starts a new epoch, so readers, which may
    /// remember what never changes about a job id, rebuild.
    pub fn insert(&mut self, id: JobId, job: Job) -> Option<Job> {
        let reused = self.newest.is_some_and(|n| id <= n);
        self.note(id);
        let old = self.map.insert(id, Arc::new(job)).map(Arc::unwrap_or_clone);
        if reused {
            *self = Jobs::from_map(std::mem::take(&mut self.map));
        } else {
            self.newest = Some(id);
        }
        old
    }

    /// Removes a job.
    pub fn remove(&mut self, id: &JobId) -> Option<Job> {
        let old = self.map.remove(id).map(Arc::unwrap_or_clone);
        if old.is_some() {
            self.note(*id);
        }
        old
    }

    /// Where the log is now: pass it to [`Jobs::changed_since`] later.
    pub fn cursor(&self) -> JobCursor {
        JobCursor {
            epoch: self.epoch,
            position: self.base + self.log.len() as u64,
        }
    }

    /// The ids of the jobs changed (added, changed or removed) since `cursor`, in the order
    /// of the changes, an id once per change; `None` when the cursor is from another table
    /// or epoch, or the log no longer reaches back to it.
    pub fn changed_since(&self, cursor: JobCursor) -> Option<impl Iterator<Item = JobId> + '_> {
        let end = self.base + self.log.len() as u64;
        if cursor.epoch != self.epoch || cursor.position < self.base || cursor.position > end {
            return None;
        }
        let skip = (cursor.position - self.base) as usize;
        Some(self.log.range(skip..).copied())
    }
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs::new()
    }
}

impl std::ops::Deref for Jobs {
    type Target = BTreeMap<JobId, Arc<Job>>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<'a> IntoIterator for &'a Jobs {
    type Item = (&'a JobId, &'a Arc<Job>);
    type IntoIter = std::collections::btree_map::Iter<'a, JobId, Arc<Job>>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl FromIterator<(JobId, Job)> for Jobs {
    fn from_iter<I: IntoIterator<Item = (JobId, Job)>>(iter: I) -> Self {
        Jobs::from_map(
            iter.into_iter()
                .map(|(id, job)| (id, Arc::new(job)))
                .collect(),
        )
    }
}

/// A copy is a new table: its log starts empty, in an epoch of its own. It shares the jobs.
impl Clone for Jobs {
    fn clone(&self) -> Self {
        Jobs::from_map(self.map.clone())
    }
}

/// Equal when the jobs are; the log is not state.
impl PartialEq for Jobs {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

/// Serialized as the map alone, exactly as before the log existed.
impl Serialize for Jobs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Jobs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Jobs::from_map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table with jobs 1 to 4, as `apply` leaves it.
    fn table() -> Jobs {
        let mut w = crate::state::tests::World::new();
        w.build_with(crate::state::tests::DIAMOND, None);
        assert_eq!(w.state.jobs.len(), 4);
        w.state.jobs
    }

    fn ids(it: impl Iterator<Item = JobId>) -> Vec<u64> {
        it.map(|j| j.0).collect()
    }

    #[test]
    fn a_reader_sees_each_change_once_in_order_from_its_cursor() {
        let mut jobs = table();
        let start = jobs.cursor();
        let [a, b, c] = [1, 2, 3].map(JobId);
        jobs.get_mut(&b).unwrap().boost = 1;
        assert!(jobs.get_mut(&JobId(99)).is_none(), "a miss is no change");
        let middle = jobs.cursor();
        let job = jobs.remove(&a).unwrap();
        assert!(jobs.remove(&a).is_none(), "a miss is no change");
        jobs.get_mut(&c).unwrap().boost = 2;
        assert_eq!(ids(jobs.changed_since(start).unwrap()), [2, 1, 3]);
        assert_eq!(ids(jobs.changed_since(middle).unwrap()), [1, 3]);
        assert_eq!(ids(jobs.changed_since(jobs.cursor()).unwrap()), [0u64; 0]);
        // A new id is a change like any other; putting a removed id back starts over.
        let before = jobs.cursor();
        let mut new = job.clone();
        new.id = JobId(9);
        jobs.insert(JobId(9), new);
        assert_eq!(ids(jobs.changed_since(before).unwrap()), [9]);
        jobs.insert(a, job);
        assert!(jobs.changed_since(before).is_none());
    }

    #[test]
    fn a_copy_a_reloaded_table_or_a_replaced_job_sends_readers_back_to_the_whole_table() {
        let mut jobs = table();
        let cursor = jobs.cursor();
        let copy = jobs.clone();
        assert_eq!(copy, jobs, "the log is not part of the value");
        assert!(copy.changed_since(cursor).is_none());
        let json = serde_json::to_string(&jobs).unwrap();
        let map_json = serde_json::to_string(&*jobs).unwrap();
        assert_eq!(json, map_json, "serialized exactly as the plain map");
        let reloaded: Jobs = serde_json::from_str(&json).unwrap();
        assert_eq!(reloaded, jobs);
        assert!(reloaded.changed_since(cursor).is_none());
        // Replacing a job under its id (never done by `apply`) starts a new epoch.
        let one = JobId(1);
        let job = Job::clone(&jobs[&one]);
        assert!(jobs.changed_since(cursor).is_some());
        jobs.insert(one, job);
        assert!(jobs.changed_since(cursor).is_none());
    }

    #[test]
    fn a_reader_the_log_has_moved_past_is_sent_back_to_the_whole_table() {
        let mut jobs = table();
        let one = JobId(1);
        let old = jobs.cursor();
        jobs.get_mut(&one).unwrap();
        let recent = jobs.cursor();
        for _ in 0..LOG_MAX - 1 {
            jobs.get_mut(&one).unwrap();
        }
        assert_eq!(jobs.changed_since(old).unwrap().count(), LOG_MAX);
        jobs.get_mut(&one).unwrap();
        assert!(jobs.changed_since(old).is_none(), "one change too many");
        assert_eq!(jobs.changed_since(recent).unwrap().count(), LOG_MAX);
    }
}
