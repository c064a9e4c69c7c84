//! The leader's reactor: what a replica does with committed [`Event`]s while it leads.
//!
//! Every replica applies every entry, so every replica receives the events; followers drop
//! them. When a replica becomes leader it first rescans the state for work its predecessor may
//! have left half done (builds still pending pipeline load), so nothing acknowledged is lost
//! to a failover. Handling is idempotent: a build resolved twice is refused by `apply` the
//! second time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flotilla_consensus::Node;
use flotilla_core::ids::BuildId;
use flotilla_core::repo::RepoSource;
use flotilla_core::state::{BuildStatus, Command, Entry, Event, Response};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::cells::CellHub;
use crate::clock::Clock;
use crate::loader;
use crate::machine::{Events, Machine};

/// Pipeline loads running at once on the leader.
const MAX_CONCURRENT_LOADS: usize = 32;
/// How often the leader prunes old delivery keys.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often the leader looks for pending builds nobody is loading (a resolution that could
/// not be committed, say).
const RESCAN_EVERY: Duration = Duration::from_secs(15);
/// How long committing a resolution may wait for the cluster.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The reactor's inputs.
#[derive(Debug)]
pub struct Reactor {
    /// This replica.
    pub node: Arc<Node<Machine>>,
    /// Where pipelines are read from.
    pub repos: Arc<dyn RepoSource>,
    /// Leader time.
    pub clock: Arc<dyn Clock>,
    /// Committed events.
    pub events: Events,
    /// Cell sessions, told about assignments and leadership.
    pub cells: Arc<CellHub>,
}

impl Reactor {
    /// Runs until `shutdown` turns true; in-flight loads are abandoned (the next leader, or
    /// this one after a restart, picks their builds up again).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let id = self.node.id();
        let mut metrics = self.node.raft().metrics();
        let mut leading = false;
        let mut loads: JoinSet<BuildId> = JoinSet::new();
        let mut in_flight: BTreeSet<BuildId> = BTreeSet::new();
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_LOADS));
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(RESCAN_EVERY);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now_leading = metrics.borrow().current_leader == Some(id);
            if now_leading && !leading {
                tracing::info!(node = id, "Leading: resuming pending pipeline loads.");
                self.cells.set_leading(true);
                self.load_pending(&mut loads, &mut in_flight, &permits);
            } else if leading && !now_leading {
                self.cells.set_leading(false);
            }
            leading = now_leading;
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = metrics.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some((_, events)) = self.events.recv() => {
                    if !leading {
                        continue;
                    }
                    self.cells.on_events(&events);
                    for e in events {
                        if let Event::BuildCreated(b) = e {
                            self.spawn_load(b, &mut loads, &mut in_flight, &permits);
                        }
                    }
                }
                Some(done) = loads.join_next() => {
                    if let Ok(b) = done {
                        in_flight.remove(&b);
                    }
                }
                _ = rescan.tick() => {
                    if leading {
                        self.load_pending(&mut loads, &mut in_flight, &permits);
                    }
                }
                _ = prune.tick() => {
                    if leading {
                        let now_ms = self.clock.now_ms();
                        if let Err(e) = self.node.propose(Entry::V1(Command::Prune { now_ms })).await {
                            tracing::warn!(error = %e, "Pruning delivery keys failed; will try again.");
                        }
                    }
                }
            }
        }
        loads.shutdown().await;
    }

    fn load_pending(
        &self,
        loads: &mut JoinSet<BuildId>,
        in_flight: &mut BTreeSet<BuildId>,
        permits: &Arc<Semaphore>,
    ) {
        let pending: Vec<BuildId> = self
            .node
            .read(|m| m.state().pending_builds().map(|b| b.id).collect());
        for b in pending {
            self.spawn_load(b, loads, in_flight, permits);
        }
    }

    fn spawn_load(
        &self,
        build: BuildId,
        loads: &mut JoinSet<BuildId>,
        in_flight: &mut BTreeSet<BuildId>,
        permits: &Arc<Semaphore>,
    ) {
        if !in_flight.insert(build) {
            return;
        }
        let node = self.node.clone();
        let repos = self.repos.clone();
        let clock = self.clock.clone();
        let permits = permits.clone();
        loads.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return build;
            };
            load_one(&node, repos.as_ref(), clock.as_ref(), build).await;
            build
        });
    }
}

async fn load_one(node: &Node<Machine>, repos: &dyn RepoSource, clock: &dyn Clock, id: BuildId) {
    let found = node.read(|m| {
        let s = m.state();
        let build = s
            .builds
            .get(&id)
            .filter(|b| b.status == BuildStatus::Pending)?;
        let project = s.projects.get(&build.project)?;
        Some((build.clone(), project.clone()))
    });
    let Some((build, project)) = found else {
        return;
    };
    let (sha, resolution) = loader::load(repos, &project, &build).await;
    let command = Command::ResolvePipeline {
        build: id,
        sha,
        resolution,
        now_ms: clock.now_ms(),
    };
    match node
        .propose_via_leader(Entry::V1(command), WRITE_TIMEOUT)
        .await
    {
        Ok(Response::Rejected(r)) => {
            tracing::debug!(build = %id, reason = %r, "Pipeline resolution not needed any more.");
        }
        Ok(_) => tracing::info!(build = %id, project = %project.id, "Pipeline loaded."),
        Err(e) => {
            tracing::warn!(build = %id, error = %e, "Could not commit the pipeline; the next leader retries.");
        }
    }
}
