//! One scheduler tick: [`run`] brings the [`Book`] up to date, builds the tick's tables
//! (cells and their free runners, tenants and their loads, the queues) from it, then hands out
//! runners in fair-share order.

use std::cmp::{Ordering, Reverse};
use std::collections::btree_set;
use std::collections::{BTreeMap, BinaryHeap};

use super::book::{Book, Queued};
use super::classes::OwnedKey;
use super::home::HomeCache;
use super::{LiveCell, Schedule, Snapshot, Waiting};
use crate::ids::{CellId, JobId};
use crate::state::{CellState, Placement, State};

/// Runs one tick, updating `book` and `homes` to the snapshot's state.
pub(super) fn run(s: &Snapshot<'_>, book: &mut Book, homes: &mut HomeCache) -> Schedule {
    if book.sync(s.state) {
        *homes = HomeCache::default();
    }
    homes.refresh(s.state.cells.values());
    let mut t = Tick::new(s.state, s.live, book);
    t.queues();
    let placements = t.place(s, homes);
    let placeable: usize = t.queues.iter().map(|q| q.total).sum();
    let mut unplaceable = t.unplaceable;
    unplaceable.sort_unstable();
    Schedule {
        waiting: Waiting {
            no_capacity: placeable - placements.len(),
            unplaceable,
        },
        placements,
    }
}

/// A live `Active` cell, by its index in `Tick::cells` (cell id order).
#[derive(Debug)]
struct TickCell<'a> {
    id: &'a CellId,
    /// Index into `Tick::regions`.
    region: u32,
    labels: &'a BTreeMap<String, String>,
    /// Pod creations left this tick.
    budget: u32,
    /// Its pools' slots, by pool name.
    slots: std::ops::Range<usize>,
}

/// One pool of one live `Active` cell.
#[derive(Debug)]
struct Slot<'a> {
    cell: u32,
    pool: &'a str,
    size: u32,
    /// Runners not leased, running or placed this tick.
    free: u32,
}

/// Jobs with the same constraints, which fit the same slots.
#[derive(Debug)]
struct Class {
    /// The slots (one per candidate cell, in cell order) of cells meeting the constraints.
    slots: Vec<u32>,
    /// Set when none of `slots` has room and budget: stays so for the rest of the tick, since
    /// room and budget only shrink within one.
    full: bool,
}

/// A tenant: a project group or a project of its own.
#[derive(Debug)]
struct Tenant<'a> {
    name: &'a str,
    weight: u64,
    /// Jobs leased or running anywhere, plus those placed this tick.
    load: u64,
    /// Indices into `Tick::queues`: one per (project, class) the tenant has queued jobs of.
    queues: Vec<u32>,
    /// The head of each of those queues with room, best first; built at the tenant's first
    /// turn.
    heads: Option<BinaryHeap<Reverse<(Queued, u32)>>>,
}

#[derive(Debug, Clone, Copy)]
struct Home {
    /// Index into `Tick::cells` when the home cell is live and `Active`.
    cell: Option<u32>,
    region: u32,
}

/// One project's queued jobs of one constraint class, best first.
#[derive(Debug)]
struct Queue<'a> {
    class: u32,
    /// The project (interned in the book).
    project: u32,
    /// The jobs not yet taken this tick.
    rest: btree_set::Iter<'a, Queued>,
    /// Jobs queued in it at the start of the tick.
    total: usize,
}

/// A tenant's place in the fair-share order: smaller `load / weight` first, then name.
#[derive(Debug, PartialEq, Eq)]
struct Share {
    load: u64,
    weight: u64,
    /// The tenant's rank by name.
    rank: u32,
    tenant: u32,
}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/wa vs b/wb without division; loads and weights fit in 32 bits, so no overflow.
        (self.load * other.weight)
            .cmp(&(other.load * self.weight))
            .then(self.rank.cmp(&other.rank))
    }
}

/// How good a slot is for a job: home cell, then home region, then headroom.
#[derive(Debug, PartialEq, Eq)]
struct Score {
    home: bool,
    region: bool,
    free: u32,
    size: u32,
}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.home, self.region)
            .cmp(&(other.home, other.region))
            .then_with(|| {
                // free/size vs other.free/other.size, without division.
                (u64::from(self.free) * u64::from(other.size))
                    .cmp(&(u64::from(other.free) * u64::from(self.size)))
            })
    }
}

/// The working state of one tick.
#[derive(Debug)]
struct Tick<'a> {
    state: &'a State,
    book: &'a Book,
    cells: Vec<TickCell<'a>>,
    /// Live `Active` cells by id.
    cell_index: BTreeMap<&'a CellId, u32>,
    /// The live `Active` cell of each of the book's cells, if it is one.
    book_cell: Vec<Option<u32>>,
    slots: Vec<Slot<'a>>,
    /// Region names (of every registered cell), interned.
    regions: Vec<&'a str>,
    region_index: BTreeMap<&'a str, u32>,
    classes: Vec<Class>,
    /// The tick's class of each of the book's classes, once one is needed.
    book_class: Vec<Option<u32>>,
    tenants: Vec<Tenant<'a>>,
    tenant_index: BTreeMap<&'a str, u32>,
    /// The tenant of each of the book's projects, once one is needed.
    book_tenant: Vec<Option<u32>>,
    /// The home of each of the book's projects, once one is needed.
    book_home: Vec<Option<Option<Home>>>,
    queues: Vec<Queue<'a>>,
    unplaceable: Vec<JobId>,
}

impl<'a> Tick<'a> {
    /// Cells with their free runners, regions, and tenants with their loads.
    fn new(state: &'a State, live: &'a [LiveCell], book: &'a Book) -> Self {
        let mut budgets: BTreeMap<&CellId, u32> = BTreeMap::new();
        for l in live {
            let b = l.budget.unwrap_or(u32::MAX);
            budgets
                .entry(&l.id)
                .and_modify(|old| *old = (*old).min(b))
                .or_insert(b);
        }
        let mut region_index: BTreeMap<&str, u32> = BTreeMap::new();
        for c in state.cells.values() {
            let n = region_index.len() as u32;
            region_index.entry(c.region.as_str()).or_insert(n);
        }
        let mut regions = vec![""; region_index.len()];
        for (r, i) in &region_index {
            regions[*i as usize] = r;
        }

        let mut cells = Vec::new();
        let mut cell_index = BTreeMap::new();
        let mut book_cell = vec![None; book.cells.len()];
        let mut slots = Vec::new();
        for c in state.cells.values() {
            let Some(budget) = budgets.get(&c.id) else {
                continue;
            };
            if c.state != CellState::Active {
                continue;
            }
            let i = cells.len() as u32;
            let first = slots.len();
            let known = book.cells.get(&c.id);
            for (name, size) in &c.pools {
                let out = match (known, book.pools.get(name.as_str())) {
                    (Some(cell), Some(pool)) => book.out_in(cell, pool),
                    _ => 0,
                };
                slots.push(Slot {
                    cell: i,
                    pool: name.as_str(),
                    size: *size,
                    free: size.saturating_sub(out),
                });
            }
            if let Some(k) = known {
                book_cell[k as usize] = Some(i);
            }
            cell_index.insert(&c.id, i);
            cells.push(TickCell {
                id: &c.id,
                region: region_index[c.region.as_str()],
                labels: &c.labels,
                budget: *budget,
                slots: first..slots.len(),
            });
        }

        let mut tick = Tick {
            state,
            book,
            cells,
            cell_index,
            book_cell,
            slots,
            regions,
            region_index,
            classes: Vec::new(),
            book_class: vec![None; book.classes.len()],
            tenants: Vec::new(),
            tenant_index: BTreeMap::new(),
            book_tenant: vec![None; book.projects.len()],
            book_home: vec![None; book.projects.len()],
            queues: Vec::new(),
            unplaceable: Vec::new(),
        };
        // Every project's tenant, so a group's weight is the largest of all its projects'.
        for p in state.projects.values() {
            let name = p.tenant.as_deref().unwrap_or(p.id.as_str());
            tick.tenant_named(name, p.weight);
        }
        for (p, out) in book.out_projects.iter().enumerate() {
            if *out > 0 {
                let t = tick.tenant_of(p as u32);
                tick.tenants[t as usize].load += u64::from(*out);
            }
        }
        tick
    }

    /// The tenant called `name`, created if new; its weight is at least `weight`.
    fn tenant_named(&mut self, name: &'a str, weight: u32) -> u32 {
        let weight = u64::from(weight.max(1));
        let tenants = &mut self.tenants;
        let t = *self.tenant_index.entry(name).or_insert_with(|| {
            tenants.push(Tenant {
                name,
                weight,
                load: 0,
                queues: Vec::new(),
                heads: None,
            });
            tenants.len() as u32 - 1
        });
        let tenant = &mut self.tenants[t as usize];
        tenant.weight = tenant.weight.max(weight);
        t
    }

    /// The tenant of one of the book's projects. A project the state does not know (which
    /// `apply` never leaves behind: deleting a project deletes its jobs) is a tenant of its
    /// own with weight 1.
    fn tenant_of(&mut self, p: u32) -> u32 {
        if let Some(t) = self.book_tenant[p as usize] {
            return t;
        }
        let id = &self.book.projects[p];
        let t = match self.state.projects.get(id) {
            Some(project) => self.tenant_index[project.tenant.as_deref().unwrap_or(id.as_str())],
            None => self.tenant_named(id.as_str(), 1),
        };
        self.book_tenant[p as usize] = Some(t);
        t
    }

    /// The book's queues into their tenants, or into `unplaceable` when no live `Active`
    /// cell could take their class.
    fn queues(&mut self) {
        for (&(project, class), set) in &self.book.queues {
            let class = self.class_of(class);
            if self.classes[class as usize].slots.is_empty() {
                self.unplaceable.extend(set.iter().map(|q| q.id));
                continue;
            }
            let tenant = self.tenant_of(project);
            let q = self.queues.len() as u32;
            self.queues.push(Queue {
                class,
                project,
                rest: set.iter(),
                total: set.len(),
            });
            self.tenants[tenant as usize].queues.push(q);
        }
    }

    /// The tick's class for one of the book's classes.
    fn class_of(&mut self, key: u32) -> u32 {
        if let Some(c) = self.book_class[key as usize] {
            return c;
        }
        let c = self.classes.len() as u32;
        let class = self.candidates(self.book.classes.key(key));
        self.classes.push(class);
        self.book_class[key as usize] = Some(c);
        c
    }

    /// The candidate slots of a constraint class: live `Active` cells in its region with its
    /// labels and a non-empty pool of its.
    fn candidates(&self, key: &OwnedKey) -> Class {
        let mut slots = Vec::new();
        for c in &self.cells {
            if key
                .region
                .as_deref()
                .is_some_and(|r| r != self.regions[c.region as usize])
            {
                continue;
            }
            if !key.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v)) {
                continue;
            }
            let slot = c.slots.clone().find(|s| self.slots[*s].pool == key.pool);
            if let Some(s) = slot
                && self.slots[s].size > 0
            {
                slots.push(s as u32);
            }
        }
        Class { slots, full: false }
    }

    /// The fair-share loop.
    fn place(&mut self, s: &Snapshot<'_>, homes: &mut HomeCache) -> Vec<Placement> {
        let mut out = Vec::new();
        let mut by_name: Vec<u32> = (0..self.tenants.len() as u32).collect();
        by_name.sort_by_key(|t| self.tenants[*t as usize].name);
        let mut rank = vec![0; self.tenants.len()];
        for (r, t) in by_name.iter().enumerate() {
            rank[*t as usize] = r as u32;
        }
        let mut order: BinaryHeap<Reverse<Share>> = self
            .tenants
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.queues.is_empty())
            .map(|(i, t)| {
                Reverse(Share {
                    load: t.load,
                    weight: t.weight,
                    rank: rank[i],
                    tenant: i as u32,
                })
            })
            .collect();
        let expires = s.now_ms.saturating_add(s.lease_ttl_ms);
        while out.len() < s.limit
            && let Some(Reverse(share)) = order.pop()
        {
            let t = share.tenant as usize;
            let Some((job, slot)) = self.next_of(t, homes) else {
                // Nothing of this tenant fits any more this tick.
                continue;
            };
            let slot = &mut self.slots[slot as usize];
            slot.free -= 1;
            let cell = &mut self.cells[slot.cell as usize];
            cell.budget -= 1;
            out.push(Placement {
                job: job.id,
                cell: cell.id.clone(),
                lease_expires_at_ms: expires,
            });
            let tenant = &mut self.tenants[t];
            tenant.load += 1;
            order.push(Reverse(Share {
                load: tenant.load,
                ..share
            }));
        }
        out
    }

    /// The tenant's best queued job that fits somewhere, taken out of its queue, and the slot
    /// it goes to. Marks classes found full.
    fn next_of(&mut self, t: usize, homes: &mut HomeCache) -> Option<(Queued, u32)> {
        if self.tenants[t].heads.is_none() {
            let mut heads = BinaryHeap::with_capacity(self.tenants[t].queues.len());
            for &q in &self.tenants[t].queues {
                if let Some(head) = self.queues[q as usize].rest.next() {
                    heads.push(Reverse((*head, q)));
                }
            }
            self.tenants[t].heads = Some(heads);
        }
        loop {
            let Reverse((job, q)) = self.tenants[t].heads.as_mut()?.pop()?;
            let queue = &self.queues[q as usize];
            let (class, project) = (queue.class, queue.project);
            if self.classes[class as usize].full {
                // Full for the rest of the tick: the queue is done.
                continue;
            }
            match self.cell_for(class, job, project, homes) {
                Some(slot) => {
                    if let Some(next) = self.queues[q as usize].rest.next() {
                        let heads = self.tenants[t].heads.as_mut().expect("built above");
                        heads.push(Reverse((*next, q)));
                    }
                    return Some((job, slot));
                }
                None => self.classes[class as usize].full = true,
            }
        }
    }

    /// The best slot of `class` for `job`, or `None` when none has room and budget.
    fn cell_for(
        &mut self,
        class: u32,
        job: Queued,
        project: u32,
        homes: &mut HomeCache,
    ) -> Option<u32> {
        let home = self.home_of(project, homes);
        let avoid = job.avoid.and_then(|c| self.book_cell[c as usize]);
        let mut best: Option<(Score, u32)> = None;
        let mut avoided = None;
        for &slot in &self.classes[class as usize].slots {
            let sl = &self.slots[slot as usize];
            let cell = &self.cells[sl.cell as usize];
            if sl.free == 0 || cell.budget == 0 {
                continue;
            }
            if Some(sl.cell) == avoid {
                avoided = Some(slot);
                continue;
            }
            let score = Score {
                home: home.is_some_and(|h| h.cell == Some(sl.cell)),
                region: home.is_some_and(|h| h.region == cell.region),
                free: sl.free,
                size: sl.size,
            };
            // Slots come in cell id order: keep the first of equals (the smaller id).
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, slot));
            }
        }
        best.map(|(_, s)| s).or(avoided)
    }

    fn home_of(&mut self, project: u32, homes: &mut HomeCache) -> Option<Home> {
        if let Some(h) = self.book_home[project as usize] {
            return h;
        }
        let home = homes.home(project, &self.book.projects[project]).map(|id| {
            let cell = &self.state.cells[id];
            Home {
                cell: self.cell_index.get(id).copied(),
                region: self.region_index[cell.region.as_str()],
            }
        });
        self.book_home[project as usize] = Some(home);
        home
    }
}
