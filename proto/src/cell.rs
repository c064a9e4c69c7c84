//! Conversions between the cell session's messages (`flotilla.cell.v1`) and domain types.

use std::collections::BTreeMap;

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::pipeline::{Resources, Step};
use flotilla_core::runner::{Assignment, Checkout, JobReport, ReportState};
use flotilla_core::state::CellSpec;
use flotilla_core::{Attempt, BuildId, CellId, Fence, JobId, ProjectId};

use crate::cellpb as pb;

/// A message that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}: {reason}")]
pub struct InvalidMessage {
    /// Which message.
    pub message: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(message: &'static str, reason: impl Into<String>) -> InvalidMessage {
    InvalidMessage {
        message,
        reason: reason.into(),
    }
}

/// The `Assign` message for an assignment.
pub fn assign_to_pb(a: &Assignment, lease_ttl_ms: u64) -> pb::Assign {
    pb::Assign {
        job: a.job.0,
        build: a.build.0,
        project: a.project.to_string(),
        attempt: a.attempt.get(),
        fence: a.fence.0,
        lease_ttl_ms,
        name: a.name.clone(),
        image: a.image.clone(),
        steps: a
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                run: s.run.clone(),
            })
            .collect(),
        env: a
            .env
            .iter()
            .map(|(name, value)| pb::EnvVar {
                name: name.clone(),
                value: value.clone(),
                secret: a.secrets.contains(name),
            })
            .collect(),
        timeout_secs: a.timeout_secs,
        cpu_millis: a.resources.cpu_millis,
        memory_bytes: a.resources.memory_bytes,
        pool: a.pool.clone(),
        checkout: a.checkout.as_ref().map(|c| pb::Checkout {
            repo_url: c.repo_url.clone(),
            git_ref: c.git_ref.clone(),
            sha: c.sha.clone(),
        }),
    }
}

/// The assignment an `Assign` message carries.
pub fn assign_from_pb(m: pb::Assign) -> Result<Assignment, InvalidMessage> {
    let project = ProjectId::new(&m.project).map_err(|e| invalid("Assign", e.to_string()))?;
    let attempt = Attempt::new(m.attempt).ok_or_else(|| invalid("Assign", "attempt 0"))?;
    if m.fence == 0 {
        return Err(invalid("Assign", "fence 0"));
    }
    Ok(Assignment {
        job: JobId(m.job),
        build: BuildId(m.build),
        project,
        attempt,
        fence: Fence(m.fence),
        name: m.name,
        image: m.image,
        steps: m
            .steps
            .into_iter()
            .map(|s| Step {
                name: s.name,
                run: s.run,
            })
            .collect(),
        secrets: {
            let mut names: Vec<String> = Vec::new();
            for e in m.env.iter().filter(|e| e.secret) {
                if !names.contains(&e.name) {
                    names.push(e.name.clone());
                }
            }
            names
        },
        env: m.env.into_iter().map(|e| (e.name, e.value)).collect(),
        timeout_secs: m.timeout_secs,
        resources: Resources {
            cpu_millis: m.cpu_millis,
            memory_bytes: m.memory_bytes,
        },
        pool: m.pool,
        checkout: m.checkout.map(|c| Checkout {
            repo_url: c.repo_url,
            git_ref: c.git_ref,
            sha: c.sha,
        }),
    })
}

fn time(ms: Option<u64>) -> u64 {
    ms.unwrap_or(0)
}

fn opt_time(ms: u64) -> Option<u64> {
    (ms != 0).then_some(ms)
}

/// The `JobUpdate` message for a report.
pub fn report_to_pb(r: &JobReport) -> pb::JobUpdate {
    let (state, exit_code, class, reason) = match r.state {
        ReportState::Running => (pb::JobState::Running, None, "", ""),
        ReportState::Finished(Outcome::Succeeded) => (pb::JobState::Succeeded, None, "", ""),
        ReportState::Finished(Outcome::Failed(class)) => {
            let (exit, reason) = match class {
                FailureClass::Test { exit_code } => (Some(exit_code), ""),
                FailureClass::Infra { reason } => (None, reason.as_str()),
                _ => (None, ""),
            };
            (pb::JobState::Failed, exit, class.kind(), reason)
        }
    };
    pb::JobUpdate {
        job: r.job.0,
        attempt: r.attempt.get(),
        fence: r.fence.0,
        state: state as i32,
        exit_code,
        failure_class: class.to_owned(),
        infra_reason: reason.to_owned(),
        delivered_at_ms: time(r.delivered_at_ms),
        started_at_ms: time(r.started_at_ms),
        finished_at_ms: time(r.finished_at_ms),
    }
}

fn infra_reason(s: &str) -> Option<InfraReason> {
    [
        InfraReason::CellLost,
        InfraReason::Evicted,
        InfraReason::ImagePull,
        InfraReason::RunnerCrash,
        InfraReason::LeaseExpired,
        InfraReason::Drained,
    ]
    .into_iter()
    .find(|r| r.as_str() == s)
}

/// The report a `JobUpdate` message carries.
pub fn report_from_pb(m: &pb::JobUpdate) -> Result<JobReport, InvalidMessage> {
    let attempt = Attempt::new(m.attempt).ok_or_else(|| invalid("JobUpdate", "attempt 0"))?;
    let state = match pb::JobState::try_from(m.state) {
        Ok(pb::JobState::Running) => ReportState::Running,
        Ok(pb::JobState::Succeeded) => ReportState::Finished(Outcome::Succeeded),
        Ok(pb::JobState::Failed) => {
            let class = match m.failure_class.as_str() {
                "test" => FailureClass::Test {
                    exit_code: m
                        .exit_code
                        .ok_or_else(|| invalid("JobUpdate", "a test failure needs exit_code"))?,
                },
                "infra" => FailureClass::Infra {
                    reason: infra_reason(&m.infra_reason).ok_or_else(|| {
                        invalid(
                            "JobUpdate",
                            format!("unknown infra reason `{}`", m.infra_reason),
                        )
                    })?,
                },
                "timeout" => FailureClass::Timeout,
                "cancelled" => FailureClass::Cancelled,
                "config" => FailureClass::Config,
                other => {
                    return Err(invalid(
                        "JobUpdate",
                        format!("unknown failure class `{other}`"),
                    ));
                }
            };
            ReportState::Finished(Outcome::Failed(class))
        }
        _ => return Err(invalid("JobUpdate", format!("unknown state {}", m.state))),
    };
    Ok(JobReport {
        job: JobId(m.job),
        attempt,
        fence: Fence(m.fence),
        state,
        delivered_at_ms: opt_time(m.delivered_at_ms),
        started_at_ms: opt_time(m.started_at_ms),
        finished_at_ms: opt_time(m.finished_at_ms),
    })
}

/// The cell a `Hello` describes.
pub fn hello_spec(m: &pb::Hello) -> Result<CellSpec, InvalidMessage> {
    let id = CellId::new(&m.cell).map_err(|e| invalid("Hello", e.to_string()))?;
    let mut pools = BTreeMap::new();
    for p in &m.pools {
        if p.name.is_empty() {
            return Err(invalid("Hello", "a pool without a name"));
        }
        // Pools are named as pipelines name them (`placement.pool`): DNS labels.
        flotilla_core::ids::PoolName::new(&p.name)
            .map_err(|e| invalid("Hello", format!("pool: {e}")))?;
        pools.insert(p.name.clone(), p.max);
    }
    Ok(CellSpec {
        id,
        region: m.region.clone(),
        labels: m.labels.clone().into_iter().collect(),
        pools,
        agent_version: m.version.clone(),
    })
}

/// `(job, fence)` pairs as `JobRef`s, and back.
pub fn job_refs(refs: impl IntoIterator<Item = (JobId, Fence)>) -> Vec<pb::JobRef> {
    refs.into_iter()
        .map(|(j, f)| pb::JobRef {
            job: j.0,
            fence: f.0,
        })
        .collect()
}

/// The pairs a list of `JobRef`s names.
pub fn from_job_refs(refs: &[pb::JobRef]) -> Vec<(JobId, Fence)> {
    refs.iter()
        .map(|r| (JobId(r.job), Fence(r.fence)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> Assignment {
        Assignment {
            job: JobId(7),
            build: BuildId(3),
            project: ProjectId::new("web").unwrap(),
            attempt: Attempt::FIRST.next(),
            fence: Fence(42),
            name: "test (stable)".into(),
            image: "rust:1.83".into(),
            steps: vec![Step {
                name: "build".into(),
                run: "cargo build".into(),
            }],
            env: vec![
                ("A".into(), "1".into()),
                ("A".into(), "2".into()),
                ("TOKEN".into(), "s3cret".into()),
            ],
            secrets: vec!["TOKEN".into()],
            timeout_secs: 600,
            resources: Resources {
                cpu_millis: 1500,
                memory_bytes: 1 << 30,
            },
            pool: "default".into(),
            checkout: Some(Checkout {
                repo_url: "file:///srv/web.git".into(),
                git_ref: "refs/heads/main".into(),
                sha: "0".repeat(40),
            }),
        }
    }

    #[test]
    fn an_assignment_survives_the_wire() {
        let a = assignment();
        assert_eq!(assign_from_pb(assign_to_pb(&a, 30_000)).unwrap(), a);
    }

    #[test]
    fn every_kind_of_report_survives_the_wire() {
        let classes = [
            FailureClass::Test { exit_code: 3 },
            FailureClass::Infra {
                reason: InfraReason::RunnerCrash,
            },
            FailureClass::Timeout,
            FailureClass::Cancelled,
            FailureClass::Config,
        ];
        let states = [
            ReportState::Running,
            ReportState::Finished(Outcome::Succeeded),
        ]
        .into_iter()
        .chain(classes.map(|c| ReportState::Finished(Outcome::Failed(c))));
        for state in states {
            let r = JobReport {
                job: JobId(1),
                attempt: Attempt::FIRST,
                fence: Fence(9),
                state,
                delivered_at_ms: Some(5),
                started_at_ms: None,
                finished_at_ms: Some(8),
            };
            assert_eq!(report_from_pb(&report_to_pb(&r)).unwrap(), r);
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let mut m = assign_to_pb(&assignment(), 1);
        m.attempt = 0;
        assert_eq!(
            assign_from_pb(m).unwrap_err().to_string(),
            "invalid Assign: attempt 0"
        );
        let mut u = report_to_pb(&JobReport {
            job: JobId(1),
            attempt: Attempt::FIRST,
            fence: Fence(1),
            state: ReportState::Running,
            delivered_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
        });
        u.state = pb::JobState::Failed as i32;
        u.failure_class = "cosmic-ray".into();
        assert!(
            report_from_pb(&u)
                .unwrap_err()
                .to_string()
                .contains("cosmic-ray")
        );
        let hello = pb::Hello {
            cell: "Not A Cell".into(),
            ..Default::default()
        };
        assert!(hello_spec(&hello).is_err());
    }
}
