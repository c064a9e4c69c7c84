//! Constraint classes: jobs whose placement constraints are equal fit the same slots, so a
//! tick works out the candidate cells once per class, not once per job.
//!
//! Finding a job's class means reading its constraints, which sit behind the spec's `Arc`
//! with each string in its own allocation: at 50,000 queued jobs those cache misses are most
//! of a tick. Two things keep that cheap:
//! - [`ClassIndex`] looks constraints up by a 64-bit print and compares strings only with the
//!   one candidate the print points at;
//! - [`Memory`], kept by a [`Scheduler`](super::Scheduler) across ticks, remembers each
//!   queued job's class (a job's spec never changes), so only jobs queued since the last tick
//!   have their constraints read at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::home::{fnv1a64, fnv1a64_extend};
use crate::ids::{CellId, Fence, JobId, ProjectId};
use crate::pipeline::{JobSpec, Placement as Constraints};
use crate::state::DEFAULT_POOL;

/// Constraints in a canonical, ordered form (labels sorted), so equal constraints written in
/// different orders share a class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClassKey<'a> {
    pub(super) region: Option<&'a str>,
    pub(super) pool: &'a str,
    pub(super) labels: Vec<(&'a str, &'a str)>,
}

impl<'a> ClassKey<'a> {
    pub(super) fn of(c: &'a Constraints) -> Self {
        let mut labels: Vec<(&str, &str)> = c
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        labels.sort_unstable();
        ClassKey {
            region: c.region.as_deref(),
            pool: c.pool.as_ref().map_or(DEFAULT_POOL, |p| p.as_str()),
            labels,
        }
    }
}

/// A [`ClassKey`] that owns its strings, to outlive one tick's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct OwnedKey {
    region: Option<String>,
    pool: String,
    labels: Vec<(String, String)>,
}

impl OwnedKey {
    fn of(k: &ClassKey<'_>) -> Self {
        OwnedKey {
            region: k.region.map(str::to_owned),
            pool: k.pool.to_owned(),
            labels: k
                .labels
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        }
    }

    fn key(&self) -> ClassKey<'_> {
        ClassKey {
            region: self.region.as_deref(),
            pool: &self.pool,
            labels: self
                .labels
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect(),
        }
    }
}

/// What is remembered of one job that was queued, leased or running: what never changes
/// about it (its constraint class, its project) and where it was out.
#[derive(Debug)]
pub(super) struct Memo {
    pub(super) id: JobId,
    /// The spec the class was read from: a job whose spec is not this very one (a different
    /// state, say) is read again. Holding the `Arc` keeps the allocation, so its address
    /// cannot be reused for another spec meanwhile.
    pub(super) spec: Arc<JobSpec>,
    /// Index into [`Memory::keys`]; its pool is the pool the job runs in.
    pub(super) key: u32,
    /// Index into [`Memory::projects`].
    pub(super) project: u32,
    /// The fence it was last seen out on a cell under, and that cell (index into
    /// [`Memory::cells`]): a fence names one placement, so while the job holds the same fence
    /// it is on the same cell.
    pub(super) out: Option<(Fence, u32)>,
}

/// Past this many remembered classes, projects or cells, the memory starts over (bounds it
/// when pipelines keep inventing new constraints, or projects and cells come and go).
const INTERNED_MAX: usize = 4_096;

/// Interned constraint classes, projects and cells, and what is known of each job that was
/// queued, leased or running at the last tick, by job id.
#[derive(Debug, Default)]
pub(super) struct Memory {
    /// Whether to remember this tick's jobs for the next (a [`Scheduler`](super::Scheduler)
    /// does; the one-off [`schedule`](super::schedule) does not).
    pub(super) remember: bool,
    /// The jobs of the last tick, by id (all `Some`; a tick takes them out as it goes).
    pub(super) jobs: Vec<Option<Memo>>,
    keys: Vec<OwnedKey>,
    key_index: BTreeMap<OwnedKey, u32>,
    /// Interned project ids.
    pub(super) projects: Vec<ProjectId>,
    project_index: BTreeMap<ProjectId, u32>,
    /// Interned cell ids.
    pub(super) cells: Vec<CellId>,
    cell_index: BTreeMap<CellId, u32>,
}

impl Memory {
    /// A memory that remembers each tick's jobs for the next.
    pub(super) fn remembering() -> Self {
        Memory {
            remember: true,
            ..Memory::default()
        }
    }

    /// Starts over when anything interned grew past [`INTERNED_MAX`].
    pub(super) fn trim(&mut self) {
        if self.keys.len() > INTERNED_MAX
            || self.projects.len() > INTERNED_MAX
            || self.cells.len() > INTERNED_MAX
        {
            *self = Memory {
                remember: self.remember,
                ..Memory::default()
            };
        }
    }

    /// The pool of an interned class.
    pub(super) fn pool(&self, k: u32) -> &str {
        &self.keys[k as usize].pool
    }

    /// The index of a project id, interning it if new.
    pub(super) fn project(&mut self, id: &ProjectId) -> u32 {
        if let Some(i) = self.project_index.get(id) {
            return *i;
        }
        let i = self.projects.len() as u32;
        self.projects.push(id.clone());
        self.project_index.insert(id.clone(), i);
        i
    }

    /// The index of a cell id, interning it if new.
    pub(super) fn cell(&mut self, id: &CellId) -> u32 {
        if let Some(i) = self.cell_index.get(id) {
            return *i;
        }
        let i = self.cells.len() as u32;
        self.cells.push(id.clone());
        self.cell_index.insert(id.clone(), i);
        i
    }

    /// How many classes are interned.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// An interned class.
    pub(super) fn key(&self, k: u32) -> ClassKey<'_> {
        self.keys[k as usize].key()
    }

    /// The index of a class, interning it if new.
    fn intern(&mut self, key: &ClassKey<'_>) -> u32 {
        let owned = OwnedKey::of(key);
        if let Some(k) = self.key_index.get(&owned) {
            return *k;
        }
        let k = self.keys.len() as u32;
        self.keys.push(owned.clone());
        self.key_index.insert(owned, k);
        k
    }
}

/// Finds the class of constraints read this tick by their print, comparing strings only with
/// the one candidate the print points at. Constraints that differ only in label order get
/// different prints but share a class through the canonical [`ClassKey`].
#[derive(Debug, Default)]
pub(super) struct ClassIndex<'a> {
    plain: Option<u32>,
    last: Option<(u64, &'a Constraints, u32)>,
    /// Constraint values met this tick, as written, by print, with their class.
    by_print: BTreeMap<u64, Vec<(&'a Constraints, u32)>>,
    by_key: BTreeMap<ClassKey<'a>, u32>,
}

impl<'a> ClassIndex<'a> {
    /// The class of constraints known to be empty.
    pub(super) fn plain(&mut self, c: &'a Constraints, memory: &mut Memory) -> u32 {
        match self.plain {
            Some(k) => k,
            None => {
                let k = self.intern(c, memory);
                self.plain = Some(k);
                k
            }
        }
    }

    /// The class of `c`, whose print is `print`.
    pub(super) fn get(&mut self, c: &'a Constraints, print: u64, memory: &mut Memory) -> u32 {
        if let Some((p, last, k)) = self.last
            && p == print
            && same(last, c)
        {
            return k;
        }
        let known = self
            .by_print
            .get(&print)
            .and_then(|v| v.iter().find(|(s, _)| same(s, c)))
            .map(|(_, k)| *k);
        let k = match known {
            Some(k) => k,
            None => {
                let k = self.intern(c, memory);
                self.by_print.entry(print).or_default().push((c, k));
                k
            }
        };
        self.last = Some((print, c, k));
        k
    }

    fn intern(&mut self, c: &'a Constraints, memory: &mut Memory) -> u32 {
        let key = ClassKey::of(c);
        if let Some(k) = self.by_key.get(&key) {
            return *k;
        }
        let k = memory.intern(&key);
        self.by_key.insert(key, k);
        k
    }
}

/// Whether constraints have none of region, labels and pool.
pub(super) fn is_plain(c: &Constraints) -> bool {
    c.region.is_none() && c.labels.is_empty() && c.pool.is_none()
}

/// Equal constraints, labels in the same order (`IndexMap`'s own `==` hashes every key).
fn same(a: &Constraints, b: &Constraints) -> bool {
    a.pool == b.pool
        && a.region == b.region
        && a.labels.len() == b.labels.len()
        && a.labels.iter().eq(b.labels.iter())
}

/// A print of constraints as written: FNV-1a over their fields, each ended by a byte that no
/// UTF-8 string contains.
pub(super) fn constraints_print(c: &Constraints) -> u64 {
    let mut h = fnv1a64(&[u8::from(c.region.is_some())]);
    let mut feed = |s: &str| {
        h = fnv1a64_extend(h, s.as_bytes());
        h = fnv1a64_extend(h, &[0xff]);
    };
    feed(c.region.as_deref().unwrap_or(""));
    feed(c.pool.as_ref().map_or(DEFAULT_POOL, |p| p.as_str()));
    for (k, v) in &c.labels {
        feed(k);
        feed(v);
    }
    h
}

/// A print of a cell id and a pool name.
pub(super) fn slot_print(cell: &CellId, pool: &str) -> u64 {
    let h = fnv1a64_extend(fnv1a64(cell.as_str().as_bytes()), &[0xff]);
    fnv1a64_extend(h, pool.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PoolName;

    fn c(region: Option<&str>, labels: &[(&str, &str)], pool: Option<&str>) -> Constraints {
        let mut c = Constraints {
            region: region.map(str::to_owned),
            pool: pool.map(|p| PoolName::new(p).unwrap()),
            ..Constraints::default()
        };
        for (k, v) in labels {
            c.labels.insert((*k).to_owned(), (*v).to_owned());
        }
        c
    }

    #[test]
    fn equal_constraints_share_a_class_whatever_the_label_order_and_default_pool_spelling() {
        let mut memory = Memory::default();
        let mut index = ClassIndex::default();
        let plain = c(None, &[], None);
        let default = c(None, &[], Some("default"));
        let ab = c(Some("eu"), &[("a", "1"), ("b", "2")], None);
        let ba = c(Some("eu"), &[("b", "2"), ("a", "1")], None);
        let other = c(Some("us"), &[("a", "1"), ("b", "2")], None);
        let k_plain = index.plain(&plain, &mut memory);
        let mut get = |x| index.get(x, constraints_print(x), &mut memory);
        assert_eq!(get(&default), k_plain);
        let k_ab = get(&ab);
        assert_eq!(get(&ba), k_ab);
        assert_ne!(get(&other), k_ab);
        assert_ne!(k_ab, k_plain);
        assert_eq!(memory.len(), 3);
        assert_eq!(
            memory.key(k_ab),
            ClassKey {
                region: Some("eu"),
                pool: "default",
                labels: vec![("a", "1"), ("b", "2")],
            }
        );
    }

    #[test]
    fn prints_tell_apart_values_that_concatenate_alike() {
        assert_ne!(
            constraints_print(&c(None, &[("ab", "c")], None)),
            constraints_print(&c(None, &[("a", "bc")], None))
        );
        assert_ne!(
            constraints_print(&c(Some(""), &[], None)),
            constraints_print(&c(None, &[], None))
        );
    }

    #[test]
    fn memory_starts_over_once_it_holds_too_many_classes() {
        let mut memory = Memory::default();
        let mut index = ClassIndex::default();
        let many: Vec<Constraints> = (0..=INTERNED_MAX)
            .map(|i| c(Some(&format!("r{i}")), &[], None))
            .collect();
        for x in &many {
            index.get(x, constraints_print(x), &mut memory);
        }
        assert_eq!(memory.len(), INTERNED_MAX + 1);
        memory.trim();
        assert_eq!(memory.len(), 0);
    }
}
