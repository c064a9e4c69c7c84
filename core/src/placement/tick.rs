//! One scheduler tick: [`run`] builds the working tables from a [`Snapshot`], scans the jobs
//! into per-tenant queues, then hands out runners in fair-share order.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use super::classes::{self, ClassIndex, ClassKey, Memo, Memory};
use super::home::{self, Ring};
use super::{LiveCell, Schedule, Snapshot, Waiting};
use crate::ids::{BuildId, CellId, Fence, JobId, ProjectId};
use crate::job::JobPhase;
use crate::pipeline::Placement as Constraints;
use crate::state::{CellState, Job, Placement, State};

/// Runs one tick, reading and updating `memory`.
pub(super) fn run(s: &Snapshot<'_>, memory: &mut Memory) -> Schedule {
    memory.trim();
    let mut t = Tick::new(s.state, s.live);
    t.scan(s.state, memory);
    let placements = t.place(s);
    let placeable: usize = t.queues.iter().map(|q| q.total).sum();
    Schedule {
        waiting: Waiting {
            no_capacity: placeable - placements.len(),
            unplaceable: t.unplaceable,
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
    /// Indices into `Tick::queues`: one per constraint class the tenant has queued jobs of.
    queues: Vec<u32>,
}

/// A project, for its tenant and its home cell.
#[derive(Debug)]
struct ProjectInfo<'a> {
    id: &'a ProjectId,
    tenant: u32,
    /// The home cell, computed when first needed.
    home: Option<Option<Home>>,
}

#[derive(Debug, Clone, Copy)]
struct Home {
    /// Index into `Tick::cells` when the home cell is live and `Active`.
    cell: Option<u32>,
    region: u32,
}

/// One tenant's queued jobs of one constraint class, best first.
#[derive(Debug)]
struct Queue<'a> {
    class: u32,
    heap: BinaryHeap<Entry<'a>>,
    /// Jobs queued in it at the start of the tick.
    total: usize,
}

/// A queued job in its queue: greater is placed first.
#[derive(Debug)]
struct Entry<'a> {
    boost: u32,
    project: u32,
    queued_at_ms: u64,
    /// The job's id, copied so comparisons do not reach into the job (a cache miss each).
    id: JobId,
    job: &'a Job,
}

impl Entry<'_> {
    fn key(&self) -> (u32, Reverse<u64>, Reverse<JobId>) {
        (self.boost, Reverse(self.queued_at_ms), Reverse(self.id))
    }
}

impl PartialEq for Entry<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Entry<'_> {}
impl PartialOrd for Entry<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// What the scan needs of one job, gathered in one place.
#[derive(Debug)]
struct Row<'a> {
    job: &'a Job,
    constraints: &'a Constraints,
    build: BuildId,
    id: JobId,
    /// A queued job always has a queue time; were one missing it would count as oldest.
    queued_at_ms: u64,
    boost: u32,
    /// Queued (else leased or running).
    queued: bool,
    /// The fence of its latest placement.
    fence: Option<Fence>,
    /// Queued without any constraint.
    plain: bool,
    /// Queued: the print of its constraints; running: of its cell and pool.
    print: u64,
    /// The print of its project's id, on the first row of each build.
    project_print: Option<u64>,
    /// Where the memory's entry for this job is, if it has one.
    memo: Option<u32>,
}

/// The memory's entry for a job seen this tick: the one it had (with where the job is out
/// now), or a new one.
fn remember(
    memo: Option<Memo>,
    job: &Job,
    key: u32,
    project: u32,
    out: Option<(Fence, u32)>,
) -> Memo {
    match memo {
        Some(m) => Memo { out, ..m },
        None => Memo {
            id: job.id,
            spec: Arc::clone(&job.spec),
            key,
            project,
            out,
        },
    }
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
    cells: Vec<TickCell<'a>>,
    /// Live `Active` cells by id.
    cell_index: BTreeMap<&'a CellId, u32>,
    slots: Vec<Slot<'a>>,
    /// (print of cell id and pool name, slot), sorted: finds a running job's slot.
    slot_prints: Vec<(u64, u32)>,
    /// Region names (of every registered cell), interned.
    regions: Vec<&'a str>,
    ring: Ring<Home>,
    classes: Vec<Class>,
    /// The tick's class of each of the memory's classes, once one is needed.
    key_class: Vec<Option<u32>>,
    /// The tick's project of each of the memory's projects, once one is needed.
    memo_project: Vec<Option<u32>>,
    /// The live `Active` cell (if it is one) of each of the memory's cells, once needed.
    memo_cell: Vec<Option<Option<u32>>>,
    tenants: Vec<Tenant<'a>>,
    projects: Vec<ProjectInfo<'a>>,
    /// (print of project id, project), sorted: finds a job's project.
    project_prints: Vec<(u64, u32)>,
    queues: Vec<Queue<'a>>,
    unplaceable: Vec<JobId>,
}

impl<'a> Tick<'a> {
    /// Cells, slots, regions, the home ring, tenants and projects.
    fn new(state: &'a State, live: &'a [LiveCell]) -> Self {
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
            for (name, size) in &c.pools {
                slots.push(Slot {
                    cell: i,
                    pool: name.as_str(),
                    size: *size,
                    free: *size,
                });
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
        let ring = Ring::new(state.cells.values().map(|c| {
            let home = Home {
                cell: cell_index.get(&c.id).copied(),
                region: region_index[c.region.as_str()],
            };
            (c, home)
        }));
        let mut slot_prints: Vec<(u64, u32)> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let print = classes::slot_print(cells[s.cell as usize].id, s.pool);
                (print, i as u32)
            })
            .collect();
        slot_prints.sort_unstable();

        let mut tick = Tick {
            cells,
            cell_index,
            slots,
            slot_prints,
            regions,
            ring,
            classes: Vec::new(),
            key_class: Vec::new(),
            memo_project: Vec::new(),
            memo_cell: Vec::new(),
            tenants: Vec::new(),
            projects: Vec::new(),
            project_prints: Vec::new(),
            queues: Vec::new(),
            unplaceable: Vec::new(),
        };
        let mut tenant_index: BTreeMap<&str, u32> = BTreeMap::new();
        for p in state.projects.values() {
            let name = p.tenant.as_deref().unwrap_or(p.id.as_str());
            tick.add_project(&mut tenant_index, &p.id, name, p.weight);
        }
        tick.project_prints = tick
            .projects
            .iter()
            .enumerate()
            .map(|(i, p)| (home::fnv1a64(p.id.as_str().as_bytes()), i as u32))
            .collect();
        tick.project_prints.sort_unstable();
        tick
    }

    fn add_project(
        &mut self,
        tenant_index: &mut BTreeMap<&'a str, u32>,
        id: &'a ProjectId,
        tenant: &'a str,
        weight: u32,
    ) -> u32 {
        let weight = u64::from(weight.max(1));
        let t = *tenant_index.entry(tenant).or_insert_with(|| {
            self.tenants.push(Tenant {
                name: tenant,
                weight,
                load: 0,
                queues: Vec::new(),
            });
            self.tenants.len() as u32 - 1
        });
        let tenant = &mut self.tenants[t as usize];
        tenant.weight = tenant.weight.max(weight);
        self.projects.push(ProjectInfo {
            id,
            tenant: t,
            home: None,
        });
        self.projects.len() as u32 - 1
    }

    /// Tenants' loads, slots' free runners, and every queued job into its tenant's queue for
    /// its constraint class (or into `unplaceable`).
    ///
    /// This is the one part of a tick that is linear in the number of jobs, and at 50,000
    /// queued jobs it is bound by memory: a `Job` is a few hundred bytes over several cache
    /// lines, its constraints sit behind the spec's `Arc`, each string in an allocation of its
    /// own. So it runs in stages, each a tight loop over compact rows touching one kind of
    /// memory, so the CPU overlaps the cache misses of many jobs instead of waiting on each
    /// job's in turn; and the memory spares reading the constraints of jobs it has seen.
    fn scan(&mut self, state: &'a State, memory: &mut Memory) {
        // 1. The jobs that matter (queued, leased, running), their scheduling fields copied
        //    into rows.
        let mut rows: Vec<Row<'a>> = state
            .jobs
            .values()
            .filter(|j| {
                matches!(
                    j.phase(),
                    JobPhase::Queued | JobPhase::Leased | JobPhase::Running
                )
            })
            .map(|job| Row {
                job,
                constraints: &job.spec.placement,
                build: job.build,
                id: job.id,
                queued_at_ms: job.queued_at_ms.unwrap_or(0),
                boost: job.boost,
                queued: job.phase() == JobPhase::Queued,
                fence: job.run.fence(),
                plain: false,
                print: 0,
                project_print: None,
                memo: None,
            })
            .collect();
        // 2. What the memory knows of each job (both lists are in id order): a known job's
        //    class and project, and its cell while it holds the same fence. For the rest,
        //    prints (64-bit FNV-1a) of the strings each row is looked up by — a queued job's
        //    constraints, a running job's cell and pool, the project of each build — so the
        //    lookups below compare integers and check one candidate's strings.
        let mut old = std::mem::take(&mut memory.jobs);
        let mut cursor = 0;
        let mut last_build = None;
        for row in &mut rows {
            while old
                .get(cursor)
                .is_some_and(|m| m.as_ref().is_some_and(|m| m.id < row.id))
            {
                cursor += 1;
            }
            // The very same spec: the address of its constraints is the same.
            let hit = old
                .get(cursor)
                .and_then(Option::as_ref)
                .filter(|m| m.id == row.id && std::ptr::eq(&m.spec.placement, row.constraints));
            if let Some(m) = hit {
                row.memo = Some(cursor as u32);
                cursor += 1;
                if !row.queued
                    && m.out.map(|(f, _)| f) != row.fence
                    && let Some(cell) = row.job.run.cell()
                {
                    row.print = classes::slot_print(cell, memory.pool(m.key));
                }
                continue;
            }
            if last_build != Some(row.build) {
                last_build = Some(row.build);
                row.project_print = Some(home::fnv1a64(row.job.project.as_str().as_bytes()));
            }
            if row.queued {
                row.plain = classes::is_plain(row.constraints);
                if !row.plain {
                    row.print = classes::constraints_print(row.constraints);
                }
            } else if let Some(cell) = row.job.run.cell() {
                row.print = classes::slot_print(cell, State::pool_of(row.job));
            }
        }

        // 3. Into tenants and queues. Consecutive jobs mostly belong to one build (ids are
        //    handed out per build), so the last build's project and the last queue are
        //    remembered.
        let mut by_build: (u32, u32) = (0, 0);
        let mut last_queue: Option<((u32, u32), u32)> = None;
        let mut index = ClassIndex::default();
        let mut pending: Vec<Vec<Entry<'a>>> = Vec::new();
        let mut remembered = Vec::with_capacity(if memory.remember { rows.len() } else { 0 });
        for row in rows {
            let job = row.job;
            let memo = row.memo.and_then(|i| old[i as usize].take());
            let (project, memo_project) = match &memo {
                Some(m) => (self.project_of_memo(m.project, memory, job), m.project),
                None => {
                    if let Some(print) = row.project_print {
                        let memo_project = if memory.remember {
                            memory.project(&job.project)
                        } else {
                            0
                        };
                        by_build = (self.project_of(print, &job.project), memo_project);
                    }
                    by_build
                }
            };
            let tenant = self.projects[project as usize].tenant;
            let key = match &memo {
                Some(m) => m.key,
                None if row.plain => index.plain(row.constraints, memory),
                None if row.queued => index.get(row.constraints, row.print, memory),
                // A leased or running job's class is only needed to remember its pool.
                None if memory.remember => {
                    let print = classes::constraints_print(row.constraints);
                    index.get(row.constraints, print, memory)
                }
                None => 0,
            };

            if !row.queued {
                self.tenants[tenant as usize].load += 1;
                let mut out = None;
                let same_fence = memo
                    .as_ref()
                    .and_then(|m| m.out)
                    .filter(|(f, _)| Some(*f) == row.fence);
                let slot = match same_fence {
                    Some((fence, cell)) => {
                        out = Some((fence, cell));
                        self.slot_of_memo(cell, memory.pool(key), memory)
                    }
                    None => match job.run.cell() {
                        Some(cell) => {
                            if memory.remember
                                && let Some(fence) = row.fence
                            {
                                out = Some((fence, memory.cell(cell)));
                            }
                            let pool = match &memo {
                                Some(m) => memory.pool(m.key),
                                None => State::pool_of(job),
                            };
                            self.slot_of(row.print, cell, pool)
                        }
                        None => None,
                    },
                };
                if let Some(slot) = slot {
                    let slot = &mut self.slots[slot as usize];
                    slot.free = slot.free.saturating_sub(1);
                }
                if memory.remember {
                    remembered.push(Some(remember(memo, job, key, memo_project, out)));
                }
                continue;
            }
            if memory.remember {
                let out = memo.as_ref().and_then(|m| m.out);
                remembered.push(Some(remember(memo, job, key, memo_project, out)));
            }

            let class = self.class_of_key(key, memory);
            if self.classes[class as usize].slots.is_empty() {
                self.unplaceable.push(row.id);
                continue;
            }
            let queue = match last_queue {
                Some((k, q)) if k == (tenant, class) => q,
                _ => {
                    // A tenant has a queue per class it uses: a handful.
                    let t = &mut self.tenants[tenant as usize];
                    let q = match t
                        .queues
                        .iter()
                        .find(|q| self.queues[**q as usize].class == class)
                    {
                        Some(q) => *q,
                        None => {
                            let q = self.queues.len() as u32;
                            t.queues.push(q);
                            self.queues.push(Queue {
                                class,
                                heap: BinaryHeap::new(),
                                total: 0,
                            });
                            pending.push(Vec::new());
                            q
                        }
                    };
                    last_queue = Some(((tenant, class), q));
                    q
                }
            };
            pending[queue as usize].push(Entry {
                boost: row.boost,
                queued_at_ms: row.queued_at_ms,
                id: row.id,
                project,
                job,
            });
        }
        memory.jobs = remembered;
        for (q, jobs) in self.queues.iter_mut().zip(pending) {
            q.total = jobs.len();
            q.heap = BinaryHeap::from(jobs);
        }
    }

    /// The project with this id (and print); a project the state does not know (which
    /// `apply` never leaves behind: deleting a project deletes its jobs) becomes its own
    /// tenant with weight 1.
    fn project_of(&mut self, print: u64, id: &'a ProjectId) -> u32 {
        let from = self.project_prints.partition_point(|(p, _)| *p < print);
        let found = self.project_prints[from..]
            .iter()
            .take_while(|(p, _)| *p == print)
            .map(|(_, i)| *i)
            .find(|i| self.projects[*i as usize].id == id);
        if let Some(p) = found {
            return p;
        }
        let mut tenant_index: BTreeMap<&'a str, u32> = self
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name, i as u32))
            .collect();
        let p = self.add_project(&mut tenant_index, id, id.as_str(), 1);
        self.project_prints.insert(from, (print, p));
        p
    }

    /// The tick's project for one of the memory's projects (`job`'s).
    fn project_of_memo(&mut self, p: u32, memory: &Memory, job: &'a Job) -> u32 {
        if self.memo_project.len() < memory.projects.len() {
            self.memo_project.resize(memory.projects.len(), None);
        }
        if let Some(t) = self.memo_project[p as usize] {
            return t;
        }
        // Found by the job's own id, which is the remembered one: the memory's copy only
        // spares reading it for every job.
        let print = home::fnv1a64(job.project.as_str().as_bytes());
        let t = self.project_of(print, &job.project);
        self.memo_project[p as usize] = Some(t);
        t
    }

    /// The slot of a pool of one of the memory's cells, if that cell is live and `Active`.
    fn slot_of_memo(&mut self, c: u32, pool: &str, memory: &Memory) -> Option<u32> {
        if self.memo_cell.len() < memory.cells.len() {
            self.memo_cell.resize(memory.cells.len(), None);
        }
        let cell_index = &self.cell_index;
        let cell = (*self.memo_cell[c as usize]
            .get_or_insert_with(|| cell_index.get(&memory.cells[c as usize]).copied()))?;
        self.cells[cell as usize]
            .slots
            .clone()
            .find(|s| self.slots[*s].pool == pool)
            .map(|s| s as u32)
    }

    /// The slot of a live `Active` cell's pool, by the print of both names.
    fn slot_of(&self, print: u64, cell: &CellId, pool: &str) -> Option<u32> {
        let from = self.slot_prints.partition_point(|(p, _)| *p < print);
        self.slot_prints[from..]
            .iter()
            .take_while(|(p, _)| *p == print)
            .map(|(_, s)| *s)
            .find(|s| {
                let slot = &self.slots[*s as usize];
                slot.pool == pool && self.cells[slot.cell as usize].id == cell
            })
    }

    /// The tick's class for one of the memory's classes.
    fn class_of_key(&mut self, key: u32, memory: &Memory) -> u32 {
        if self.key_class.len() < memory.len() {
            self.key_class.resize(memory.len(), None);
        }
        if let Some(c) = self.key_class[key as usize] {
            return c;
        }
        let c = self.classes.len() as u32;
        let class = self.candidates(&memory.key(key));
        self.classes.push(class);
        self.key_class[key as usize] = Some(c);
        c
    }

    /// The candidate slots of a constraint class: live `Active` cells in its region with its
    /// labels and a non-empty pool of its.
    fn candidates(&self, key: &ClassKey<'_>) -> Class {
        let mut slots = Vec::new();
        for c in &self.cells {
            if key
                .region
                .is_some_and(|r| r != self.regions[c.region as usize])
            {
                continue;
            }
            if !key
                .labels
                .iter()
                .all(|(k, v)| c.labels.get(*k).map(String::as_str) == Some(*v))
            {
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
    fn place(&mut self, s: &Snapshot<'a>) -> Vec<Placement> {
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
            let Some((queue, slot)) = self.next_of(t) else {
                // Nothing of this tenant fits any more this tick.
                continue;
            };
            let entry = self.queues[queue as usize]
                .heap
                .pop()
                .expect("next_of found a head");
            let slot = &mut self.slots[slot as usize];
            slot.free -= 1;
            let cell = &mut self.cells[slot.cell as usize];
            cell.budget -= 1;
            out.push(Placement {
                job: entry.id,
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

    /// The tenant's best queued job that fits somewhere, and the slot it goes to: the best
    /// head among its queues whose class still has room. Marks classes found full.
    fn next_of(&mut self, t: usize) -> Option<(u32, u32)> {
        loop {
            let mut best: Option<(u32, &Entry<'a>)> = None;
            for q in &self.tenants[t].queues {
                let queue = &self.queues[*q as usize];
                if self.classes[queue.class as usize].full {
                    continue;
                }
                if let Some(head) = queue.heap.peek()
                    && best.is_none_or(|(_, b)| head > b)
                {
                    best = Some((*q, head));
                }
            }
            let (q, job, project) = best.map(|(q, h)| (q, h.job, h.project))?;
            let class = self.queues[q as usize].class;
            match self.cell_for(class, job, project) {
                Some(slot) => return Some((q, slot)),
                None => self.classes[class as usize].full = true,
            }
        }
    }

    /// The best slot of `class` for `job`, or `None` when none has room and budget.
    fn cell_for(&mut self, class: u32, job: &Job, project: u32) -> Option<u32> {
        let home = self.home_of(project);
        let avoid = job
            .avoid
            .as_ref()
            .and_then(|c| self.cell_index.get(c).copied());
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

    fn home_of(&mut self, project: u32) -> Option<Home> {
        let p = &mut self.projects[project as usize];
        *p.home.get_or_insert_with(|| self.ring.home(p.id))
    }
}
