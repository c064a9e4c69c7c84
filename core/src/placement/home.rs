//! Home cells: weighted rendezvous (highest-random-weight) hashing of projects over cells.
//!
//! A project's home cell is the cell it is placed on when it has room, so its build caches stay
//! warm there. Every registered cell that is not `Lost` and has any capacity takes part,
//! whether or not its agent is connected right now, so a session blip does not move homes.
//!
//! For a project `p` and a cell `c` of capacity `w` (the sum of its pool sizes):
//!
//! ```text
//! h(p, c) = splitmix64( fnv1a64(p) XOR splitmix64(fnv1a64(c)) )
//! u       = ((h >> 12) + 0.5) / 2^52          // in (0, 1), never 0 or 1
//! score   = −w / ln(u)
//! ```
//!
//! and the home is the cell with the highest score (ties, which need equal hashes, go to the
//! smaller cell id). `fnv1a64` is 64-bit FNV-1a over the id's UTF-8 bytes (offset basis
//! `0xcbf29ce484222325`, prime `0x100000001b3`); `splitmix64` is the SplitMix64 output function
//! (add `0x9e3779b97f4a7c15`, then the Stafford variant 13 mix). Both are fixed here and pinned
//! by a test: changing them moves every project's home and costs every cache.
//!
//! Why this shape: `−w / ln(u)` is the weighted form of rendezvous hashing (each cell's score
//! is an exponential race with rate `w`), so a cell wins a project with probability `w / Σw`.
//! Adding a cell only moves the projects the new cell now wins, removing one only moves the
//! projects it had, and raising a cell's capacity only moves projects *to* it. Hashing the ids
//! separately and mixing lets a tick hash each id once, not once per pair.

use crate::ids::{CellId, ProjectId};
use crate::state::{Cell, CellState};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_extend(FNV_OFFSET, bytes)
}

/// 64-bit FNV-1a, continued from the hash `h` of what came before.
pub(crate) fn fnv1a64_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// The SplitMix64 output function: a bijection with full avalanche, so nearby inputs (FNV
/// of ids that differ in one character) land far apart.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The project's half of [`rendezvous_hash`].
fn project_key(project: &str) -> u64 {
    fnv1a64(project.as_bytes())
}

/// The cell's half of [`rendezvous_hash`].
fn cell_key(cell: &str) -> u64 {
    splitmix64(fnv1a64(cell.as_bytes()))
}

/// The documented 64-bit hash of a (project, cell) pair that home cells are drawn from (see
/// the module docs). Public so tools can explain a placement.
pub fn rendezvous_hash(project: &str, cell: &str) -> u64 {
    splitmix64(project_key(project) ^ cell_key(cell))
}

/// The rendezvous score of a pair with hash `h` for a cell of capacity `weight`.
fn score(h: u64, weight: f64) -> f64 {
    // 52 random bits, centred in their interval: exact in an f64 (53-bit mantissa), and never
    // 0 (ln = −∞) nor 1 (ln = 0).
    let u = ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64);
    -weight / u.ln()
}

/// A cell's total capacity: the sum of its pool sizes.
pub(crate) fn capacity(cell: &Cell) -> u64 {
    cell.pools.values().map(|n| u64::from(*n)).sum()
}

/// The cells home cells are drawn from, hashed once. `T` is what a caller wants back for the
/// winning cell.
#[derive(Debug)]
pub(crate) struct Ring<T> {
    /// (cell key, capacity, what to return), in cell id order so ties go to the smaller id.
    cells: Vec<(u64, f64, T)>,
}

impl<T: Copy> Ring<T> {
    /// A ring over `cells` (given in cell id order) that are not `Lost` and have capacity.
    pub(crate) fn new<'a>(cells: impl IntoIterator<Item = (&'a Cell, T)>) -> Self {
        let cells = cells
            .into_iter()
            .filter(|(c, _)| c.state != CellState::Lost)
            .filter_map(|(c, t)| {
                let w = capacity(c);
                (w > 0).then(|| (cell_key(c.id.as_str()), w as f64, t))
            })
            .collect();
        Ring { cells }
    }

    /// The project's home, if any cell has capacity.
    pub(crate) fn home(&self, project: &ProjectId) -> Option<T> {
        let p = project_key(project.as_str());
        let mut best: Option<(f64, T)> = None;
        for (c, w, t) in &self.cells {
            let s = score(splitmix64(p ^ c), *w);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, *t));
            }
        }
        best.map(|(_, t)| t)
    }
}

/// Home cells remembered from tick to tick, while the cells they are drawn from stay the same
/// (ids, order and capacities): hashing a project against every cell is most of the cost of
/// finding its home.
#[derive(Debug, Default)]
pub(crate) struct HomeCache {
    /// The cells of the ring, as (id, capacity), in cell id order.
    cells: Vec<(CellId, u64)>,
    /// Their ring; each returns its position in `cells`.
    ring: Option<Ring<u32>>,
    /// By the book's interned project index: its home's position in `cells`, once worked
    /// out. The owner starts the cache over whenever the book re-interns its projects.
    homes: Vec<Option<Option<u32>>>,
}

impl HomeCache {
    /// Makes the cache about `cells` (registered cells, in cell id order), forgetting what it
    /// knew if they changed.
    pub(crate) fn refresh<'a>(&mut self, cells: impl IntoIterator<Item = &'a Cell>) {
        let now: Vec<&Cell> = cells
            .into_iter()
            .filter(|c| c.state != CellState::Lost && capacity(c) > 0)
            .collect();
        let same = self.ring.is_some()
            && now.len() == self.cells.len()
            && now
                .iter()
                .zip(&self.cells)
                .all(|(c, (id, w))| c.id == *id && capacity(c) == *w);
        if same {
            return;
        }
        self.cells = now.iter().map(|c| (c.id.clone(), capacity(c))).collect();
        self.ring = Some(Ring::new(now.iter().zip(0u32..).map(|(c, i)| (*c, i))));
        self.homes.clear();
    }

    /// The home of project `p` (interned as `index`): the id of its cell, if any has
    /// capacity. Call [`HomeCache::refresh`] first.
    pub(crate) fn home(&mut self, index: u32, p: &ProjectId) -> Option<&CellId> {
        let i = index as usize;
        if self.homes.len() <= i {
            self.homes.resize(i + 1, None);
        }
        let ring = self.ring.as_ref()?;
        let at = *self.homes[i].get_or_insert_with(|| ring.home(p));
        at.map(|at| &self.cells[at as usize].0)
    }
}

/// The project's home cell among `cells` (ARCHITECTURE §7): weighted rendezvous hashing as the
/// module docs describe. `Lost` cells and cells without capacity never win; `None` when no
/// cell qualifies. The order of `cells` does not matter.
pub fn home_cell<'a>(
    project: &ProjectId,
    cells: impl IntoIterator<Item = &'a Cell>,
) -> Option<CellId> {
    let mut cells: Vec<&Cell> = cells.into_iter().collect();
    cells.sort_by(|a, b| a.id.cmp(&b.id));
    cells.dedup_by(|a, b| a.id == b.id);
    Ring::new(cells.into_iter().map(|c| (c, &c.id)))
        .home(project)
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_functions_are_the_documented_ones() {
        // FNV-1a test vectors from the reference implementation.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // SplitMix64 from seed 0: the first output of the reference generator.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        // Pinned so an accidental change (which would move every home) fails here.
        assert_eq!(rendezvous_hash("web", "eu-1"), PINNED_WEB_EU1);
    }

    const PINNED_WEB_EU1: u64 = 0x4369_18db_f0ce_8e01;

    #[test]
    fn scores_stay_finite_and_positive_at_the_ends_of_the_hash_range() {
        for h in [0, 1, u64::MAX, u64::MAX >> 1] {
            let s = score(h, 3.0);
            assert!(s.is_finite() && s > 0.0, "{h}: {s}");
        }
        assert!(score(u64::MAX, 1.0) > score(0, 1.0));
    }
}
