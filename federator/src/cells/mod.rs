//! Cell sessions on the leader (ARCHITECTURE §6, §8): who is connected, what they can take,
//! the placement loop, and lease expiry.
//!
//! - `service.rs`: the `CellService` gRPC session — hello, authentication, reconciliation,
//!   heartbeats and job updates.
//! - this file: [`CellHub`], shared by the sessions, the reactor (which hands it committed
//!   events while this replica leads) and two owned loops: the scheduler (interim first-fit
//!   placement, one `PlaceJobs` entry per batch) and the lease monitor (`ExpireLeases` for a
//!   cell silent for `missed_heartbeats × heartbeat_interval + grace`).
//!
//! Leases are renewed in the leader's memory by heartbeats rather than through Raft (a
//! heartbeat entry every 2 s per cell would dominate the log). A new leader knows no
//! heartbeats, so it counts every cell as last heard from when it took over: a failover
//! delays the detection of a lost cell by at most one lease, and never loses a live one.

mod service;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use flotilla_consensus::Node;
use flotilla_core::ids::{CellId, Fence, JobId};
use flotilla_core::job::JobPhase;
use flotilla_core::placement::{LiveCell, Scheduler, Snapshot, Waiting};
use flotilla_core::runner::{Assignment, Checkout};
use flotilla_core::state::{CellState, Command, Entry, Event, Response, State};
use flotilla_proto::cell::{assign_to_pb, job_refs};
use flotilla_proto::cellpb as pb;
use tokio::sync::{Notify, mpsc, watch};

pub use service::{CellServer, serve};

use crate::clock::Clock;
use crate::machine::Machine;

/// Timing of cell sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellTiming {
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Heartbeats a cell may miss before it is suspect.
    pub missed_heartbeats: u32,
    /// How long a suspect cell has before its jobs are re-queued.
    pub grace: Duration,
}

impl Default for CellTiming {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            missed_heartbeats: 3,
            grace: Duration::from_secs(10),
        }
    }
}

impl CellTiming {
    /// How long a cell may stay silent before it is lost: `missed × interval + grace`. It is
    /// also the lease length written into placements.
    pub fn lease(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats + self.grace
    }
}

/// Counters about sessions, exposed at `/metrics`.
#[derive(Debug, Default)]
pub struct CellMetrics {
    /// Job updates refused because their fence was stale.
    pub stale_updates: AtomicU64,
    /// Cells declared lost.
    pub lease_expiries: AtomicU64,
    /// Sessions opened on this replica while it led.
    pub sessions_opened: AtomicU64,
    /// Placement decisions committed.
    pub placements: AtomicU64,
    /// Jobs handed back by drains that reached their deadline.
    pub drained_jobs: AtomicU64,
    /// Queued jobs no live active cell can take (constraints match none), at the last tick.
    pub unplaceable: AtomicU64,
    /// Queued jobs that match a cell but found no room, at the last tick.
    pub waiting_for_room: AtomicU64,
}

/// What the leader knows about one connected agent.
#[derive(Debug)]
struct Session {
    id: u64,
    tx: mpsc::Sender<pb::FederatorMessage>,
    last_heartbeat: Instant,
    /// What its last heartbeat said about its pools.
    load: Option<CellLoad>,
}

/// One runner pool of a cell, as its agent last reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolLoad {
    /// Runners in the pool.
    pub total: u32,
    /// Runners running a job.
    pub busy: u32,
    /// Runners waiting for one (a warm pool's idle runners; for a pool without warm
    /// runners, the free places: `max - busy`).
    pub idle: u32,
    /// Runners being created (counted in `total`).
    pub starting: u32,
    /// Jobs waiting in the cell for a runner of the pool.
    pub queued: u32,
    /// The most runners the pool may have.
    pub max: u32,
}

impl PoolLoad {
    /// The pool's total workload `(busy + queued) / total` (ARCHITECTURE §8); `None` for a
    /// pool with no runners.
    pub fn workload(&self) -> Option<f64> {
        (self.total > 0).then(|| f64::from(self.busy + self.queued) / f64::from(self.total))
    }
}

/// A cell's last heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellLoad {
    /// Per pool.
    pub pools: std::collections::BTreeMap<String, PoolLoad>,
    /// Pod creations per second it can afford (`None`: no limit reported).
    pub api_budget: Option<u32>,
}

impl CellLoad {
    /// From a heartbeat.
    pub fn from_pb(hb: &pb::Heartbeat) -> Self {
        let api_budget = hb
            .pools
            .iter()
            .map(|p| p.api_budget)
            .filter(|b| *b > 0)
            .min();
        Self {
            pools: hb
                .pools
                .iter()
                .map(|p| {
                    (
                        p.pool.clone(),
                        PoolLoad {
                            total: p.total,
                            busy: p.busy,
                            idle: p.idle,
                            starting: p.starting,
                            queued: p.queued,
                            max: p.max,
                        },
                    )
                })
                .collect(),
            api_budget,
        }
    }
}

/// A cell as the operator API shows it: its session and last heartbeat.
#[derive(Debug, Clone)]
pub struct CellLive {
    /// How long ago it was last heard from.
    pub since_heartbeat: Duration,
    /// Its last heartbeat's figures, once one came.
    pub load: Option<CellLoad>,
}

#[derive(Debug, Default)]
struct Sessions {
    next_id: u64,
    by_cell: HashMap<CellId, Session>,
    /// When each cell was last heard from, for cells without a session.
    silent_since: HashMap<CellId, Instant>,
    /// When this replica last became leader.
    leading_since: Option<Instant>,
}

/// Cell sessions, shared by the gRPC service, the reactor and the leader's loops.
#[derive(Debug)]
pub struct CellHub {
    node: Arc<Node<Machine>>,
    clock: Arc<dyn Clock>,
    timing: CellTiming,
    bootstrap_token: Option<String>,
    sessions: std::sync::Mutex<Sessions>,
    wake: Notify,
    metrics: CellMetrics,
    /// Jobs that no cell could take at the last tick (each is reported once).
    unplaceable: std::sync::Mutex<BTreeSet<JobId>>,
    /// The scheduler, which remembers what it learnt about jobs between ticks; a fresh one
    /// per leadership term.
    scheduler: std::sync::Mutex<Scheduler>,
    /// Each cell's API budget as a token bucket, kept across its sessions.
    budgets: std::sync::Mutex<HashMap<CellId, Bucket>>,
}

/// Pod creations a cell may still be asked for: refilled at the rate it reports (per
/// second), holding at most one second's worth, spent by placements.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + self.rate * now.duration_since(self.at).as_secs_f64())
            .min(self.rate.max(1.0));
        self.at = now;
    }
}

/// How many placements one `PlaceJobs` entry carries at most.
const MAX_BATCH: usize = 512;
/// The scheduler runs at most this often (ARCHITECTURE §7), and at least once a second.
const MIN_TICK: Duration = Duration::from_millis(100);
const IDLE_TICK: Duration = Duration::from_secs(1);
/// How long a commit from the cell loops may wait.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl CellHub {
    /// A hub for this replica.
    pub fn new(
        node: Arc<Node<Machine>>,
        clock: Arc<dyn Clock>,
        timing: CellTiming,
        bootstrap_token: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            clock,
            timing,
            bootstrap_token,
            sessions: std::sync::Mutex::default(),
            wake: Notify::new(),
            metrics: CellMetrics::default(),
            unplaceable: std::sync::Mutex::default(),
            scheduler: std::sync::Mutex::new(Scheduler::new()),
            budgets: std::sync::Mutex::default(),
        })
    }

    /// Session counters.
    pub fn metrics(&self) -> &CellMetrics {
        &self.metrics
    }

    /// The cells with a session on this replica.
    pub fn connected(&self) -> BTreeSet<CellId> {
        self.lock().by_cell.keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_leader(&self) -> bool {
        self.node.metrics().current_leader == Some(self.node.id())
    }

    /// The leader's cell-session address, when known, for `NotLeader` hints.
    fn leader_hint(&self) -> String {
        let Some(leader) = self.node.metrics().current_leader else {
            return String::new();
        };
        self.node.read(|m| {
            m.state()
                .cell_endpoints
                .get(&leader)
                .cloned()
                .unwrap_or_default()
        })
    }

    /// Called by the reactor when this replica gains or loses leadership. Losing it closes
    /// every session (agents reconnect and find the new leader).
    pub fn set_leading(&self, leading: bool) {
        let mut s = self.lock();
        if leading {
            s.leading_since = Some(Instant::now());
            s.silent_since.clear();
            *self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) = Scheduler::new();
        } else {
            s.leading_since = None;
            s.by_cell.clear();
            s.silent_since.clear();
            // A follower places nothing: its gauges must not go on showing its last tick.
            self.metrics.unplaceable.store(0, Ordering::Relaxed);
            self.metrics.waiting_for_room.store(0, Ordering::Relaxed);
            self.unplaceable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Registers a new session for `cell`, replacing (and so closing) any older one, with
    /// the API budget its `Hello` reported. 0 (an agent that reports none, or one too old to
    /// send it) leaves the cell's bucket as it was; the first heartbeat settles it.
    fn open(&self, cell: &CellId, tx: mpsc::Sender<pb::FederatorMessage>, api_budget: u32) -> u64 {
        if api_budget > 0 {
            self.set_budget(cell, Some(api_budget));
        }
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.by_cell.insert(
            cell.clone(),
            Session {
                id,
                tx,
                last_heartbeat: Instant::now(),
                load: None,
            },
        );
        s.silent_since.remove(cell);
        self.metrics.sessions_opened.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// Forgets session `id` of `cell` (if it is still the current one). Its leases keep
    /// running: a dropped connection is not a lost cell until the heartbeats are overdue.
    fn close(&self, cell: &CellId, id: u64) {
        let mut s = self.lock();
        if let Some(sess) = s.by_cell.get(cell)
            && sess.id == id
        {
            let last = sess.last_heartbeat;
            s.by_cell.remove(cell);
            s.silent_since.insert(cell.clone(), last);
        }
    }

    fn heartbeat(&self, cell: &CellId, id: u64, load: Option<CellLoad>) {
        let mut s = self.lock();
        if let Some(sess) = s.by_cell.get_mut(cell)
            && sess.id == id
        {
            sess.last_heartbeat = Instant::now();
            if let Some(load) = load {
                self.set_budget(cell, load.api_budget);
                sess.load = Some(load);
            }
        }
    }

    /// What a cell reports it can afford (in `Hello` and every heartbeat): its bucket refills
    /// at that rate from now on; `None` lifts the limit.
    fn set_budget(&self, cell: &CellId, rate: Option<u32>) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        match rate {
            Some(rate) => {
                let b = budgets.entry(cell.clone()).or_insert(Bucket {
                    rate: f64::from(rate),
                    tokens: f64::from(rate),
                    at: Instant::now(),
                });
                b.refill();
                b.rate = f64::from(rate);
            }
            None => {
                budgets.remove(cell);
            }
        }
    }

    /// The connected cells with their last heartbeats, for the operator API.
    pub fn live(&self) -> HashMap<CellId, CellLive> {
        self.lock()
            .by_cell
            .iter()
            .map(|(cell, s)| {
                (
                    cell.clone(),
                    CellLive {
                        since_heartbeat: s.last_heartbeat.elapsed(),
                        load: s.load.clone(),
                    },
                )
            })
            .collect()
    }

    fn send(&self, cell: &CellId, msg: pb::FederatorMessage) {
        let tx = self.lock().by_cell.get(cell).map(|s| s.tx.clone());
        if let Some(tx) = tx
            && tx.try_send(msg).is_err()
        {
            // A session that cannot keep up is closed; the agent reconnects and the hello
            // reconciliation re-sends what it missed.
            tracing::warn!(cell = %cell, "Cell session is not keeping up; closing it.");
            let mut s = self.lock();
            s.by_cell.remove(cell);
            s.silent_since.insert(cell.clone(), Instant::now());
        }
    }

    /// Acts on committed events while this replica leads: tells cells about assignments,
    /// cancellations and revocations, and wakes the scheduler when there may be work.
    pub fn on_events(&self, events: &[Event]) {
        let mut wake = false;
        for e in events {
            match e {
                Event::JobAssigned { job, cell, fence } => {
                    let assign = self.node.read(|m| assignment(m.state(), *job, *fence));
                    if let Some(a) = assign {
                        let ttl = self.timing.lease().as_millis() as u64;
                        self.send(
                            cell,
                            message(pb::federator_message::Msg::Assign(assign_to_pb(&a, ttl))),
                        );
                    }
                }
                Event::JobRevoked { job, cell, fence } => {
                    let cancelled = self.node.read(|m| {
                        m.state().jobs.get(job).map(|j| j.phase()) == Some(JobPhase::Cancelled)
                    });
                    let msg = if cancelled {
                        pb::federator_message::Msg::Cancel(pb::Cancel {
                            job: job.0,
                            fence: fence.0,
                        })
                    } else {
                        pb::federator_message::Msg::Revoke(pb::Revoke {
                            jobs: job_refs([(*job, *fence)]),
                        })
                    };
                    self.send(cell, message(msg));
                    wake = true;
                }
                Event::CellChanged(cell) => {
                    // A cell declared lost while its session lingers (a long stall the
                    // connection survived) must say hello again to become active: close the
                    // session so the agent reconnects and re-registers.
                    let lost = self.node.read(|m| {
                        m.state().cells.get(cell).map(|c| c.state) == Some(CellState::Lost)
                    });
                    if lost {
                        let mut s = self.lock();
                        if s.by_cell.remove(cell).is_some() {
                            s.silent_since.insert(cell.clone(), Instant::now());
                        }
                    }
                    wake = true;
                }
                Event::JobsQueued(_) | Event::JobChanged(_) => {
                    wake = true;
                }
                Event::BuildCreated(_) | Event::BuildChanged(_) => {}
            }
        }
        if wake {
            self.wake.notify_one();
        }
    }

    /// The scheduler: while leading, places queued jobs on connected active cells, one
    /// `PlaceJobs` entry per batch, at most every 100 ms.
    pub async fn run_scheduler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // The spacing counts from the last tick that placed something: a tick that found
        // nothing to do (woken by a report, say) must not delay the next job by 100 ms.
        let mut last_placed = Instant::now() - MIN_TICK;
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_TICK) => {}
            }
            let since = last_placed.elapsed();
            if since < MIN_TICK {
                tokio::time::sleep(MIN_TICK - since).await;
            }
            if !self.is_leader() {
                continue;
            }
            // Drain the queue in capped batches before waiting again; each cell's API budget
            // is for the whole tick, whatever the number of batches.
            let mut live = self.live_cells();
            let mut placed = 0;
            loop {
                let n = self.place_once(&mut live).await;
                placed += n;
                if n < MAX_BATCH {
                    break;
                }
            }
            if placed > 0 {
                last_placed = Instant::now();
            }
        }
    }

    /// The connected cells the scheduler may use, each with the pods it may be asked to
    /// create this tick: what its budget bucket holds now (no limit for a cell that reports
    /// none).
    fn live_cells(&self) -> Vec<LiveCell> {
        let connected: Vec<CellId> = self.lock().by_cell.keys().cloned().collect();
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        connected
            .into_iter()
            .map(|id| {
                let budget = budgets.get_mut(&id).map(|b| {
                    b.refill();
                    b.tokens.floor() as u32
                });
                LiveCell { id, budget }
            })
            .collect()
    }

    /// One batch: schedules, commits the decisions as one `PlaceJobs` entry, and takes what
    /// it used out of the cells' budgets.
    async fn place_once(&self, live: &mut [LiveCell]) -> usize {
        let now_ms = self.clock.now_ms();
        let ttl = self.timing.lease().as_millis() as u64;
        let schedule = self.node.read(|m| {
            self.scheduler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .schedule(&Snapshot {
                    state: m.state(),
                    live,
                    now_ms,
                    lease_ttl_ms: ttl,
                    limit: MAX_BATCH,
                })
        });
        self.note_waiting(&schedule.waiting);
        let placements = schedule.placements;
        let n = placements.len();
        if n == 0 {
            return 0;
        }
        for p in &placements {
            if let Some(cell) = live.iter_mut().find(|c| c.id == p.cell)
                && let Some(b) = &mut cell.budget
            {
                *b = b.saturating_sub(1);
            }
        }
        self.spend_budgets(&placements);
        let command = Entry::V1(Command::PlaceJobs { placements, now_ms });
        match tokio::time::timeout(WRITE_TIMEOUT, self.node.propose(command)).await {
            Ok(Ok(_)) => {
                self.metrics
                    .placements
                    .fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Committing placements failed; will try again.");
                0
            }
            Err(_) => {
                tracing::warn!("Committing placements timed out; will try again.");
                0
            }
        }
    }

    /// Publishes what waits, and says when jobs start waiting for a cell that can take
    /// them (one line per tick that adds some, with a count and a few ids, however many).
    fn note_waiting(&self, waiting: &Waiting) {
        self.metrics
            .unplaceable
            .store(waiting.unplaceable.len() as u64, Ordering::Relaxed);
        self.metrics
            .waiting_for_room
            .store(waiting.no_capacity as u64, Ordering::Relaxed);
        let mut known = self.unplaceable.lock().unwrap_or_else(|e| e.into_inner());
        let now: BTreeSet<JobId> = waiting.unplaceable.iter().copied().collect();
        let new: Vec<JobId> = now.difference(&known).copied().collect();
        if !new.is_empty() {
            let some: Vec<String> = new.iter().take(5).map(ToString::to_string).collect();
            tracing::warn!(
                jobs = new.len(),
                waiting = now.len(),
                examples = %some.join(","),
                "Queued jobs match no connected active cell (region, labels, pool): they wait until one does."
            );
        }
        *known = now;
    }

    /// Takes committed placements out of the cells' budget buckets.
    fn spend_budgets(&self, placements: &[flotilla_core::state::Placement]) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        for p in placements {
            if let Some(b) = budgets.get_mut(&p.cell) {
                b.tokens = (b.tokens - 1.0).max(0.0);
            }
        }
    }

    /// The lease monitor: while leading, declares lost every cell not heard from for a lease.
    pub async fn run_lease_monitor(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = (self.timing.heartbeat_interval / 2).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        let mut resent: HashMap<(JobId, Fence), Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            // If this process was paused (stopped, swapped, starved) it heard nothing from
            // anyone meanwhile: count every cell as heard from now rather than expiring the
            // whole fleet at once.
            if last_tick.elapsed() > period * 4 {
                tracing::warn!(paused = ?last_tick.elapsed(), "The lease monitor was paused; restarting every cell's lease.");
                let mut s = self.lock();
                if s.leading_since.is_some() {
                    s.leading_since = Some(Instant::now());
                }
            }
            last_tick = Instant::now();
            if !self.is_leader() {
                continue;
            }
            self.resend_stuck_assignments(&mut resent);
            self.finish_due_drains().await;
            for (cell, last_seen_ms) in self.overdue() {
                let now_ms = self.clock.now_ms();
                let command = Entry::V1(Command::ExpireLeases {
                    cell: cell.clone(),
                    last_seen_ms,
                    now_ms,
                });
                match tokio::time::timeout(WRITE_TIMEOUT, self.node.propose(command)).await {
                    Ok(Ok(Response::Rejected(r))) => {
                        tracing::debug!(cell = %cell, reason = %r, "Lease expiry refused.");
                    }
                    Ok(Ok(_)) => {
                        self.metrics.lease_expiries.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(cell = %cell, "Cell lost: no heartbeat within its lease; its jobs are re-queued.");
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(cell = %cell, error = %e, "Expiring leases failed.")
                    }
                    Err(_) => tracing::warn!(cell = %cell, "Expiring leases timed out."),
                }
            }
        }
    }

    /// Hands back the jobs of every draining cell past its deadline (ARCHITECTURE §7).
    async fn finish_due_drains(&self) {
        let now_ms = self.clock.now_ms();
        let due: Vec<CellId> = self.node.read(|m| {
            m.state()
                .cells
                .values()
                .filter(|c| {
                    matches!(c.state, CellState::Draining { deadline_ms } if deadline_ms <= now_ms)
                })
                .map(|c| c.id.clone())
                .collect()
        });
        for cell in due {
            let remaining = self.node.read(|m| m.state().jobs_on(&cell).count());
            let command = Entry::V1(Command::FinishDrain {
                cell: cell.clone(),
                now_ms,
            });
            match tokio::time::timeout(WRITE_TIMEOUT, self.node.propose(command)).await {
                Ok(Ok(Response::Rejected(r))) => {
                    tracing::debug!(cell = %cell, reason = %r, "Finishing a drain refused.");
                }
                Ok(Ok(_)) => {
                    self.metrics
                        .drained_jobs
                        .fetch_add(remaining as u64, Ordering::Relaxed);
                    tracing::warn!(cell = %cell, requeued = remaining, "Drain deadline reached: the cell's remaining jobs are placed elsewhere.");
                }
                Ok(Err(e)) => tracing::warn!(cell = %cell, error = %e, "Finishing a drain failed."),
                Err(_) => tracing::warn!(cell = %cell, "Finishing a drain timed out."),
            }
        }
    }

    /// Sends the assignment again for jobs leased to a connected cell for longer than a lease
    /// without starting (an `Assign` lost on the way, or dropped by a full session), at most
    /// once per lease per attempt. The agent ignores assignments it already holds or ran.
    fn resend_stuck_assignments(&self, resent: &mut HashMap<(JobId, Fence), Instant>) {
        let lease = self.timing.lease();
        let lease_ms = lease.as_millis() as u64;
        let now_ms = self.clock.now_ms();
        let connected = self.connected();
        let stuck: Vec<(CellId, Assignment)> = self.node.read(|m| {
            let s = m.state();
            s.jobs
                .values()
                .filter(|j| j.phase() == JobPhase::Leased)
                .filter(|j| {
                    j.placed_at_ms
                        .is_some_and(|p| now_ms.saturating_sub(p) > lease_ms)
                })
                .filter_map(|j| {
                    let cell = j.run.cell()?.clone();
                    let a = assignment(s, j.id, j.run.fence()?)?;
                    connected.contains(&cell).then_some((cell, a))
                })
                .collect()
        });
        resent.retain(|k, _| stuck.iter().any(|(_, a)| (a.job, a.fence) == *k));
        for (cell, a) in stuck {
            let key = (a.job, a.fence);
            if resent.get(&key).is_some_and(|t| t.elapsed() < lease) {
                continue;
            }
            tracing::warn!(cell = %cell, job = %a.job, fence = %a.fence, "Job leased without starting for a whole lease; sending its assignment again.");
            resent.insert(key, Instant::now());
            let msg = pb::federator_message::Msg::Assign(assign_to_pb(&a, lease_ms));
            self.send(&cell, message(msg));
        }
    }

    /// Cells that are not yet lost and have been silent for longer than a lease, with the
    /// `last_seen_ms` they were judged at.
    fn overdue(&self) -> Vec<(CellId, u64)> {
        let lease = self.timing.lease();
        let candidates: Vec<(CellId, u64)> = self.node.read(|m| {
            m.state()
                .cells
                .values()
                .filter(|c| c.state != CellState::Lost)
                .map(|c| (c.id.clone(), c.last_seen_ms))
                .collect()
        });
        let s = self.lock();
        let Some(leading_since) = s.leading_since else {
            return Vec::new();
        };
        candidates
            .into_iter()
            .filter(|(c, _)| {
                let last = match s.by_cell.get(c) {
                    Some(sess) => sess.last_heartbeat,
                    None => s.silent_since.get(c).copied().unwrap_or(leading_since),
                };
                last.max(leading_since).elapsed() > lease
            })
            .collect()
    }
}

fn message(msg: pb::federator_message::Msg) -> pb::FederatorMessage {
    pb::FederatorMessage { msg: Some(msg) }
}

/// What a cell must run for `job`, if it is still out under `fence`.
fn assignment(state: &State, job: JobId, fence: Fence) -> Option<Assignment> {
    let j = state.jobs.get(&job)?;
    if j.run.fence() != Some(fence) || !matches!(j.phase(), JobPhase::Leased | JobPhase::Running) {
        return None;
    }
    let build = state.builds.get(&j.build)?;
    let project = state.projects.get(&j.project)?;
    let spec = &j.spec;
    Some(Assignment {
        job,
        build: build.id,
        project: project.id.clone(),
        attempt: j.run.attempt(),
        fence,
        name: spec.name.clone(),
        image: spec.image.clone(),
        steps: spec.steps.clone(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        // The job's declared `secrets` get values (and are named here, to be masked) once
        // the secret store is in: README "Status".
        secrets: Vec::new(),
        timeout_secs: spec.timeout_secs,
        resources: spec.resources,
        pool: State::pool_of(j).to_owned(),
        checkout: build.sha.as_ref().map(|sha| Checkout {
            repo_url: project.repo_url.clone(),
            git_ref: build.git_ref.clone(),
            sha: sha.clone(),
        }),
    })
}
