//! `CellService`: one bidirectional session per cell agent.
//!
//! The agent's first message is `Hello`. The replica authenticates it (a client certificate
//! naming the cell, or the bootstrap token), answers `NotLeader` with the leader's address
//! when it does not lead, registers the cell through Raft, says `Welcome`, and reconciles
//! what the agent holds with the state: attempts that are no longer the cell's are revoked,
//! assignments the agent never received are sent again, and attempts the state has running
//! there but the agent has forgotten (it restarted) are failed as `Infra{RunnerCrash}`.
//! Then heartbeats renew the cell's lease and job updates are committed; each update is
//! acknowledged once committed or refused (a stale fence is refused, counted and revoked).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_consensus::TlsConfig;
use flotilla_core::ids::{CellId, Fence, JobId};
use flotilla_core::job::{FailureClass, InfraReason, JobPhase, Outcome};
use flotilla_core::runner::{JobReport, ReportState};
use flotilla_core::state::{Command, Entry, Rejection, Response, RunnerTimes};
use flotilla_proto::cell::{assign_to_pb, from_job_refs, hello_spec, job_refs, report_from_pb};
use flotilla_proto::cellpb as pb;
use flotilla_proto::cellpb::cell_service_server::{CellService, CellServiceServer};
use futures::Stream;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status, Streaming};

use super::{CellHub, assignment, message};
use pb::agent_message::Msg as In;
use pb::federator_message::Msg as Out;

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued to one agent before the session is considered stuck.
const OUTBOX: usize = 8192;
/// How long one commit from a session may take before the session is closed (the agent
/// reconnects, perhaps to a healthier leader, and re-sends).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CellServer {
    hub: Arc<CellHub>,
    shutdown: watch::Receiver<bool>,
}

/// Serves `CellService` on `listener` until `shutdown`, with mutual TLS when `tls` is given
/// (its CA bundle is the one cell certificates must chain to).
pub async fn serve(
    hub: Arc<CellHub>,
    listener: TcpListener,
    tls: Option<TlsConfig>,
    shutdown: watch::Receiver<bool>,
) {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &tls.cert_chain_pem,
                &tls.private_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&tls.ca_pem));
        builder = match builder.tls_config(config) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Unusable cell TLS configuration; not serving cells.");
                return;
            }
        };
    }
    let service = CellServer {
        hub,
        shutdown: shutdown.clone(),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut stop = shutdown;
    let result = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(CellServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "Cell session server failed.");
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::FederatorMessage, Status>> + Send>>;

fn outbound(rx: mpsc::Receiver<pb::FederatorMessage>) -> Outbound {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (Ok(m), rx))
    }))
}

fn not_leader(hint: String) -> Outbound {
    let msg = message(Out::NotLeader(pb::NotLeader { leader: hint }));
    Box::pin(futures::stream::iter([Ok(msg)]))
}

#[tonic::async_trait]
impl CellService for CellServer {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<tonic::Response<Outbound>, Status> {
        let certs = request.peer_certs();
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("send Hello first"))??
            .ok_or_else(|| Status::invalid_argument("the session ended before Hello"))?;
        let Some(In::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        let spec = hello_spec(&hello).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hub = &self.hub;
        hub.authenticate(
            &spec.id,
            &hello.bootstrap_token,
            certs.as_deref().map(|c| c.as_slice()),
        )?;
        if !hub.is_leader() {
            return Ok(tonic::Response::new(not_leader(hub.leader_hint())));
        }
        let cell = spec.id.clone();
        let register = Entry::V1(Command::RegisterCell {
            spec,
            now_ms: hub.clock.now_ms(),
        });
        match tokio::time::timeout(COMMIT_TIMEOUT, hub.node.propose(register)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::info!(cell = %cell, error = %e, "Could not register the cell; sending it to the leader.");
                return Ok(tonic::Response::new(not_leader(hub.leader_hint())));
            }
            Err(_) => return Err(Status::unavailable("registering the cell timed out; retry")),
        }
        let (tx, rx) = mpsc::channel(OUTBOX);
        // Welcome goes first: assignments may be queued as soon as the session is open.
        let welcome = Out::Welcome(pb::Welcome {
            heartbeat_interval_ms: hub.timing.heartbeat_interval.as_millis() as u64,
            node_id: hub.node.id(),
        });
        let _ = tx.try_send(message(welcome));
        let sid = hub.open(&cell, tx.clone(), hello.api_budget);
        tracing::info!(cell = %cell, peer = ?peer, session = sid, "Cell session opened.");
        let reader = Reader {
            hub: hub.clone(),
            cell,
            sid,
            tx,
        };
        // The reader reconciles (after the stream is returned, so the agent sees Welcome at
        // once), then reads until the agent hangs up, the session is replaced or this replica
        // stops leading or shuts down; it holds the only other sender, so the outbound stream
        // ends with it.
        let known = from_job_refs(&hello.known);
        tokio::spawn(reader.run(known, inbound, self.shutdown.clone()));
        Ok(tonic::Response::new(outbound(rx)))
    }
}

impl CellHub {
    fn authenticate(
        &self,
        cell: &CellId,
        token: &str,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<(), Status> {
        if let Some(leaf) = certs.and_then(|c| c.first()) {
            // The TLS layer has already checked the chain against the cells' CA.
            let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
                Status::unauthenticated(format!("unreadable client certificate: {e}"))
            })?;
            let name = ServerName::try_from(cell.as_str())
                .map_err(|_| Status::invalid_argument("the cell id is not a DNS name"))?;
            return cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
                Status::permission_denied(format!(
                    "the client certificate is not for cell `{cell}` (it must carry `{cell}` as a DNS name)"
                ))
            });
        }
        match &self.bootstrap_token {
            Some(expected)
                if !token.is_empty()
                    && subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), token.as_bytes())
                        .into() =>
            {
                Ok(())
            }
            _ => Err(Status::unauthenticated(
                "present a client certificate naming the cell, or the cell bootstrap token",
            )),
        }
    }

    /// Brings the agent and the state into agreement after a hello.
    async fn reconcile(
        &self,
        cell: &CellId,
        known: &[(JobId, Fence)],
        tx: &mpsc::Sender<pb::FederatorMessage>,
    ) {
        let known: BTreeMap<JobId, Fence> = known.iter().copied().collect();
        let ttl = self.timing.lease().as_millis() as u64;
        let (revoke, resend, forgotten) = self.node.read(|m| {
            let s = m.state();
            let mut revoke = Vec::new();
            for (job, fence) in &known {
                let ours = s
                    .jobs
                    .get(job)
                    .is_some_and(|j| j.run.cell() == Some(cell) && j.run.fence() == Some(*fence));
                if !ours {
                    revoke.push((*job, *fence));
                }
            }
            let mut resend = Vec::new();
            let mut forgotten = Vec::new();
            for j in s.jobs_on(cell) {
                let fence = j.run.fence().expect("a job on a cell has a fence");
                if known.get(&j.id) == Some(&fence) {
                    continue;
                }
                match j.phase() {
                    JobPhase::Leased => resend.extend(assignment(s, j.id, fence)),
                    _ => forgotten.push((j.id, fence)),
                }
            }
            (revoke, resend, forgotten)
        });
        if !revoke.is_empty() {
            tracing::info!(cell = %cell, jobs = ?revoke, "Revoking attempts that are no longer the cell's.");
            let _ = tx.try_send(message(Out::Revoke(pb::Revoke {
                jobs: job_refs(revoke),
            })));
        }
        for a in resend {
            let _ = tx.try_send(message(Out::Assign(assign_to_pb(&a, ttl))));
        }
        for (job, fence) in forgotten {
            tracing::warn!(cell = %cell, job = %job, "The cell no longer runs this job (agent restarted?); failing the attempt.");
            let command = Entry::V1(Command::JobFinished {
                job,
                fence,
                outcome: Outcome::Failed(FailureClass::Infra {
                    reason: InfraReason::RunnerCrash,
                }),
                now_ms: self.clock.now_ms(),
            });
            match tokio::time::timeout(COMMIT_TIMEOUT, self.node.propose(command)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(job = %job, error = %e, "Could not fail a forgotten attempt.");
                }
                Err(_) => tracing::warn!(job = %job, "Failing a forgotten attempt timed out."),
            }
        }
    }

    fn is_current(&self, cell: &CellId, sid: u64) -> bool {
        self.lock().by_cell.get(cell).is_some_and(|s| s.id == sid)
    }
}

struct Reader {
    hub: Arc<CellHub>,
    cell: CellId,
    sid: u64,
    tx: mpsc::Sender<pb::FederatorMessage>,
}

impl Reader {
    async fn run(
        self,
        known: Vec<(JobId, Fence)>,
        mut inbound: Streaming<pb::AgentMessage>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.hub.reconcile(&self.cell, &known, &self.tx).await;
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                next = inbound.message() => next,
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(cell = %self.cell, error = %e, "Cell session broke.");
                    break;
                }
            };
            if !self.hub.is_current(&self.cell, self.sid) || !self.hub.is_leader() {
                let _ = self
                    .tx
                    .send(message(Out::NotLeader(pb::NotLeader {
                        leader: self.hub.leader_hint(),
                    })))
                    .await;
                break;
            }
            match msg.msg {
                Some(In::Heartbeat(hb)) => {
                    self.hub
                        .heartbeat(&self.cell, self.sid, Some(super::CellLoad::from_pb(&hb)));
                }
                Some(In::JobUpdate(u)) => {
                    // Any message proves the cell is alive.
                    self.hub.heartbeat(&self.cell, self.sid, None);
                    if !self.update(u).await {
                        break;
                    }
                }
                Some(In::Hello(_)) | None => {
                    tracing::warn!(cell = %self.cell, "Unexpected message in a cell session; ignored.");
                }
            }
        }
        self.hub.close(&self.cell, self.sid);
        tracing::info!(cell = %self.cell, session = self.sid, "Cell session closed.");
    }

    /// Commits one job update and acknowledges it. False when the session must end (this
    /// replica cannot commit: the agent reconnects and re-sends).
    async fn update(&self, u: pb::JobUpdate) -> bool {
        let ack = |rejected: String| {
            message(Out::Ack(pb::UpdateAck {
                job: u.job,
                fence: u.fence,
                state: u.state,
                rejected,
            }))
        };
        let report = match report_from_pb(&u) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(cell = %self.cell, error = %e, "Refusing a malformed job update.");
                return self.tx.send(ack(e.to_string())).await.is_ok();
            }
        };
        // Only the cell holding the attempt may report on it. Two jobs placed by one entry
        // share a fence, so the fence alone does not tell cells apart; and a job leaves a
        // cell only with a new fence or by leaving Leased/Running, both of which `apply`
        // refuses as stale, so checking here before committing is race-free.
        let ours = self.hub.node.read(|m| {
            m.state()
                .jobs
                .get(&report.job)
                .is_some_and(|j| j.run.cell() == Some(&self.cell))
        });
        let response = if ours {
            let command = command_for(&report, self.hub.clock.now_ms());
            match tokio::time::timeout(COMMIT_TIMEOUT, self.hub.node.propose(Entry::V1(command)))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(cell = %self.cell, job = %report.job, error = %e, "Could not commit a job update; closing the session.");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(cell = %self.cell, job = %report.job, "Committing a job update timed out; closing the session.");
                    return false;
                }
            }
        } else {
            self.hub
                .node
                .read(|m| match m.state().jobs.get(&report.job) {
                    // Finished and acknowledged before: a re-sent duplicate, harmless.
                    Some(j) if j.phase().is_terminal() && j.run.fence() == Some(report.fence) => {
                        Response::Rejected(Rejection::Conflict(format!(
                            "job {} already finished",
                            report.job
                        )))
                    }
                    Some(j) => Response::Rejected(Rejection::StaleFence {
                        job: report.job,
                        got: report.fence,
                        current: j.run.fence().unwrap_or(report.fence),
                    }),
                    None => Response::Rejected(Rejection::NotFound(format!("job {}", report.job))),
                })
        };
        let rejected = match response {
            Response::Rejected(r @ Rejection::StaleFence { .. }) => {
                self.hub
                    .metrics
                    .stale_updates
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cell = %self.cell, job = %report.job, reason = %r, "Refused a job update with a stale fence; revoking the attempt.");
                let revoke = Out::Revoke(pb::Revoke {
                    jobs: job_refs([(report.job, report.fence)]),
                });
                if self.tx.send(message(revoke)).await.is_err() {
                    return false;
                }
                "stale fence".to_owned()
            }
            Response::Rejected(r) => {
                tracing::debug!(cell = %self.cell, job = %report.job, reason = %r, "Job update refused.");
                r.to_string()
            }
            _ => String::new(),
        };
        self.tx.send(ack(rejected)).await.is_ok()
    }
}

fn command_for(r: &JobReport, now_ms: u64) -> Command {
    match r.state {
        ReportState::Running => Command::JobStarted {
            job: r.job,
            fence: r.fence,
            runner: RunnerTimes {
                delivered_at_ms: r.delivered_at_ms,
                started_at_ms: r.started_at_ms,
            },
            now_ms,
        },
        ReportState::Finished(outcome) => Command::JobFinished {
            job: r.job,
            fence: r.fence,
            outcome,
            now_ms,
        },
    }
}
