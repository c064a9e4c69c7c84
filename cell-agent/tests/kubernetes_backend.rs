//! The Kubernetes runner backend against a mock API server (tower-test) that asserts every
//! request in order, as kube-rs' controller examples do: the watcher's list and watch, pod
//! and Secret creation, log following, deletes. The test plays the cluster: it answers each
//! request and pushes pod updates down the watch.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_cell_agent::backend::conformance::{Collector, assignment};
use flotilla_cell_agent::backend::kubernetes::{KubeBackend, KubeConfig, render};
use flotilla_cell_agent::runner::record::{PROTOCOL_VERSION, Record, Termination, WireStream};
use flotilla_core::ids::CellId;
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, RunnerBackend, RunnerError, RunnerEvent, RunnerEvents};
use flotilla_core::{Fence, JobId};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodStatus, Secret,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = UnsyncBoxBody<Bytes, BoxError>;
type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<TestBody>>;

const NS: &str = "runners";
const WAIT: Duration = Duration::from_secs(10);

fn cell() -> CellId {
    CellId::new("cell-a").expect("valid")
}

fn config() -> KubeConfig {
    KubeConfig {
        namespace: NS.into(),
        image_pull_deadline: Duration::from_millis(300),
        cancel_grace: Duration::from_secs(7),
        ..KubeConfig::default()
    }
}

fn once(status: StatusCode, body: Value) -> Response<TestBody> {
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("json"));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes).map_err(|e| match e {}).boxed_unsync())
        .expect("response")
}

/// A response whose body the test writes to later (a watch, a followed log).
fn streaming() -> (Response<TestBody>, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, BoxError>(http_body::Frame::data(b)));
    let body = StreamBody::new(stream).boxed_unsync();
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(body)
        .expect("response");
    (response, tx)
}

fn status_error(code: u16, reason: &str) -> Response<TestBody> {
    once(
        StatusCode::from_u16(code).expect("code"),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": reason, "code": code}),
    )
}

/// One request the backend made, with the means to answer it.
struct Exchange {
    method: Method,
    path: String,
    query: String,
    body: Bytes,
    send: tower_test::mock::SendResponse<Response<TestBody>>,
}

impl Exchange {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {} sent a body that is not JSON ({e}): {:?}",
                self.method, self.path, self.body
            )
        })
    }

    fn respond(self, response: Response<TestBody>) {
        self.send.send_response(response);
    }
}

/// The mock API server: every request, in order.
struct ApiServer {
    handle: Handle,
}

impl ApiServer {
    async fn next(&mut self) -> Exchange {
        let (req, send) = tokio::time::timeout(WAIT, self.handle.next_request())
            .await
            .expect("the backend made no further request")
            .expect("the client is gone");
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.expect("request body");
        Exchange {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            body,
            send,
        }
    }

    async fn expect(&mut self, method: Method, path: &str) -> Exchange {
        let x = self.next().await;
        assert_eq!(
            (&x.method, x.path.as_str()),
            (&method, path),
            "unexpected request (query {:?})",
            x.query
        );
        x
    }

    /// Nothing more is asked of the cluster for a while.
    async fn expect_silence(&mut self, within: Duration) {
        if let Ok(Some((req, _))) = tokio::time::timeout(within, self.handle.next_request()).await {
            panic!("unexpected request: {} {}", req.method(), req.uri());
        }
    }

    /// The watcher's initial list (answered with `pods`) and its watch, left open.
    async fn list_and_watch(&mut self, pods: &[Pod]) -> Watch {
        let list = self.expect(Method::GET, &pods_path()).await;
        assert!(
            list.query.contains("labelSelector=")
                && list.query.contains("flotilla.dev%2Fcell%3Dcell-a"),
            "the watcher must select the cell's pods by label: {}",
            list.query
        );
        assert!(!list.query.contains("watch=true"), "{}", list.query);
        list.respond(once(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": pods}),
        ));
        let watch = self.expect(Method::GET, &pods_path()).await;
        assert!(watch.query.contains("watch=true"), "{}", watch.query);
        let (response, tx) = streaming();
        watch.respond(response);
        Watch { tx, rv: 100 }
    }
}

struct Watch {
    tx: mpsc::Sender<Bytes>,
    rv: u64,
}

impl Watch {
    async fn push(&mut self, kind: &str, mut pod: Pod) {
        self.rv += 1;
        pod.metadata.resource_version = Some(self.rv.to_string());
        let line = serde_json::to_vec(&json!({"type": kind, "object": pod})).expect("json");
        let mut line = line;
        line.push(b'\n');
        self.tx
            .send(Bytes::from(line))
            .await
            .expect("the watch is open");
    }
}

fn pods_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods")
}

fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{name}")
}

fn setup() -> (KubeBackend, ApiServer) {
    let (service, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<TestBody>>();
    let client = kube::Client::new(service, NS);
    let backend = KubeBackend::new(client, config(), cell()).expect("backend");
    (backend, ApiServer { handle })
}

fn job_assignment(job: u64) -> Assignment {
    let mut a = assignment(JobId(job), Fence(7), &["echo hello"]);
    a.image = "rust:1.83".into();
    a
}

/// The pod as the API server would return it: the rendered pod with a uid and a status.
fn live_pod(a: &Assignment, status: PodStatus) -> Pod {
    let mut pod = render::pod(&config(), &cell(), a);
    pod.metadata.uid = Some(format!("uid-{}", a.job));
    pod.metadata.resource_version = Some("1".into());
    pod.status = Some(status);
    pod
}

fn job_status(state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: render::JOB_CONTAINER.into(),
        image: "rust:1.83".into(),
        image_id: String::new(),
        ready: state.running.is_some(),
        restart_count: 0,
        state: Some(state),
        ..ContainerStatus::default()
    }
}

fn pending() -> PodStatus {
    PodStatus {
        phase: Some("Pending".into()),
        ..PodStatus::default()
    }
}

fn running() -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        container_statuses: Some(vec![job_status(ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
                )),
            }),
            ..ContainerState::default()
        })]),
        ..PodStatus::default()
    }
}

fn terminated(exit_code: i32, reason: &str, outcome: Option<Outcome>) -> PodStatus {
    PodStatus {
        phase: Some(
            if exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            }
            .into(),
        ),
        container_statuses: Some(vec![job_status(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                reason: Some(reason.into()),
                message: outcome.map(|outcome| {
                    Termination {
                        v: PROTOCOL_VERSION,
                        outcome,
                        message: None,
                    }
                    .to_json()
                }),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        })]),
        ..PodStatus::default()
    }
}

fn record_lines(records: &[Record]) -> Bytes {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_line());
        text.push('\n');
    }
    Bytes::from(text)
}

fn finished_outcome(events: &[RunnerEvent]) -> Option<Outcome> {
    events.iter().find_map(|e| match e {
        RunnerEvent::Finished { outcome, .. } => Some(*outcome),
        _ => None,
    })
}

/// Creates the attempt's pod and Secret through the mock, checking both.
async fn expect_create(server: &mut ApiServer, a: &Assignment) {
    let name = render::pod_name(a);
    let create = server.expect(Method::POST, &pods_path()).await;
    let sent: Pod = serde_json::from_value(create.json()).expect("a Pod");
    assert_eq!(
        sent,
        render::pod(&config(), &cell(), a),
        "the created pod is exactly what render-pod prints"
    );
    create.respond(once(
        StatusCode::CREATED,
        serde_json::to_value(live_pod(a, pending())).expect("json"),
    ));
    let secret = server
        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"))
        .await;
    let sent: Secret = serde_json::from_value(secret.json()).expect("a Secret");
    assert_eq!(sent.metadata.name.as_deref(), Some(name.as_str()));
    let owner = &sent.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("Pod", name.as_str(), format!("uid-{}", a.job).as_str()),
        "the Secret is owned by the pod, so it is deleted with it"
    );
    let spec: Assignment =
        serde_json::from_slice(&sent.data.as_ref().expect("data")[render::SPEC_KEY].0)
            .expect("the spec is the assignment");
    assert_eq!(&spec, a);
    secret.respond(once(
        StatusCode::CREATED,
        serde_json::to_value(&sent).expect("json"),
    ));
}

/// Answers the log request with `records` and ends the stream.
async fn serve_log(server: &mut ApiServer, a: &Assignment, follow: bool, records: &[Record]) {
    let log = server
        .expect(
            Method::GET,
            &format!("{}/log", pod_path(&render::pod_name(a))),
        )
        .await;
    assert!(log.query.contains("container=job"), "{}", log.query);
    assert_eq!(log.query.contains("follow=true"), follow, "{}", log.query);
    let (response, tx) = streaming();
    log.respond(response);
    tx.send(record_lines(records)).await.expect("log open");
}

/// The finished pod is kept until the federator acknowledges the report, then deleted.
async fn expect_reaped(server: &mut ApiServer, backend: &KubeBackend, a: &Assignment) {
    server.expect_silence(Duration::from_millis(150)).await;
    backend.reported(a.job, a.fence);
    let delete = server
        .expect(Method::DELETE, &pod_path(&render::pod_name(a)))
        .await;
    assert_eq!(
        delete.json()["gracePeriodSeconds"],
        json!(0),
        "a finished pod is reaped at once"
    );
    let pod = live_pod(a, terminated(0, "Completed", None));
    delete.respond(once(
        StatusCode::OK,
        serde_json::to_value(pod).expect("json"),
    ));
}

#[tokio::test]
async fn a_pod_that_runs_and_succeeds_reports_started_its_output_and_success_then_is_reaped() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(1);
    let events = Collector::new();
    let sink: Arc<dyn RunnerEvents> = events.clone();
    backend.start(a.clone(), sink).await.expect("accepted");
    expect_create(&mut server, &a).await;

    watch.push("ADDED", live_pod(&a, pending())).await;
    watch.push("MODIFIED", live_pod(&a, running())).await;
    serve_log(
        &mut server,
        &a,
        true,
        &[
            Record::Started { ts: 10 },
            Record::Line {
                ts: 11,
                s: WireStream::Stdout,
                step: Some(0),
                t: "hello".into(),
            },
            Record::Line {
                ts: 12,
                s: WireStream::Stderr,
                step: Some(0),
                t: "warning".into(),
            },
            Record::Finished {
                ts: 13,
                outcome: Outcome::Succeeded,
            },
        ],
    )
    .await;
    events.wait_for_line(a.job, a.fence, "warning", WAIT).await;
    assert_eq!(backend.list().await.expect("list").len(), 1);
    watch
        .push(
            "MODIFIED",
            live_pod(&a, terminated(0, "Completed", Some(Outcome::Succeeded))),
        )
        .await;
    let (all, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert!(
        matches!(all.first(), Some(RunnerEvent::Started { .. })),
        "Started comes first: {all:#?}"
    );
    let lines = flotilla_cell_agent::backend::conformance::output_lines(&all);
    assert_eq!(
        lines
            .iter()
            .map(|(_, step, text)| (*step, text.as_str()))
            .collect::<Vec<_>>(),
        vec![(Some(0), "hello"), (Some(0), "warning")]
    );
    expect_reaped(&mut server, &backend, &a).await;
    assert!(backend.list().await.expect("list").is_empty());
    assert!(
        backend.api_budget().expect("kubernetes reports a budget") < config().pod_create_budget,
        "the create counts against the cell's API budget"
    );
}

#[tokio::test]
async fn a_non_zero_exit_is_a_test_failure_with_the_step_exit_code() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(2);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    watch.push("ADDED", live_pod(&a, running())).await;
    serve_log(&mut server, &a, true, &[]).await;
    // No termination message (the wrapper was killed): the exit code decides.
    watch
        .push("MODIFIED", live_pod(&a, terminated(3, "Error", None)))
        .await;
    let (_, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Test { exit_code: 3 })
    );
    expect_reaped(&mut server, &backend, &a).await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_past_the_deadline_fails_as_image_pull() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(3);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    let backoff = PodStatus {
        phase: Some("Pending".into()),
        container_statuses: Some(vec![job_status(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("Back-off pulling image \"rust:1.83\"".into()),
            }),
            ..ContainerState::default()
        })]),
        ..PodStatus::default()
    };
    watch.push("MODIFIED", live_pod(&a, backoff)).await;
    // Still retrying for a moment: nothing is reported before the deadline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(finished_outcome(&events.events_of(a.job, a.fence)), None);
    let (all, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::ImagePull
        })
    );
    assert!(
        flotilla_cell_agent::backend::conformance::system_lines(&all)
            .iter()
            .any(|l| l.contains("Back-off pulling image")),
        "the job's log says why: {all:#?}"
    );
    expect_reaped(&mut server, &backend, &a).await;
}

#[tokio::test]
async fn an_evicted_pod_fails_as_evicted() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(4);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    watch.push("ADDED", live_pod(&a, running())).await;
    // The kubelet's SIGTERM reaches the wrapper, which reports its job cancelled: in the
    // log and in the termination message. That is not the job's result.
    serve_log(
        &mut server,
        &a,
        true,
        &[Record::Finished {
            ts: 40,
            outcome: Outcome::Failed(FailureClass::Cancelled),
        }],
    )
    .await;
    let mut evicted = terminated(130, "Error", Some(Outcome::Failed(FailureClass::Cancelled)));
    evicted.reason = Some("Evicted".into());
    evicted.message = Some("The node was low on resource: memory.".into());
    watch.push("MODIFIED", live_pod(&a, evicted)).await;
    let (_, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::Evicted
        })
    );
    expect_reaped(&mut server, &backend, &a).await;
}

#[tokio::test]
async fn a_pod_deleted_by_someone_else_fails_as_evicted() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(5);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    watch.push("ADDED", live_pod(&a, pending())).await;
    watch.push("DELETED", live_pod(&a, pending())).await;
    let (_, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::Evicted
        })
    );
    // The pod is gone already: nothing to reap.
    server.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn cancel_deletes_the_pod_with_its_grace_period_and_reports_cancelled() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(6);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    watch.push("ADDED", live_pod(&a, running())).await;
    serve_log(&mut server, &a, true, &[]).await;
    backend
        .cancel(a.job, Fence(6))
        .await
        .expect("another fence is ignored");
    backend.cancel(a.job, a.fence).await.expect("cancel");
    let delete = server
        .expect(Method::DELETE, &pod_path(&render::pod_name(&a)))
        .await;
    assert_eq!(delete.json()["gracePeriodSeconds"], json!(7));
    let mut deleting = live_pod(&a, running());
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::chrono::DateTime::from_timestamp(1_700_000_100, 0).expect("time"),
        ));
    delete.respond(once(
        StatusCode::OK,
        serde_json::to_value(&deleting).expect("json"),
    ));
    // Terminating because we asked: not an eviction, and not over until the pod is gone.
    watch.push("MODIFIED", deleting.clone()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(finished_outcome(&events.events_of(a.job, a.fence)), None);
    watch.push("DELETED", deleting).await;
    let (_, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(outcome, Outcome::Failed(FailureClass::Cancelled));
    server.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_agent_restart_adopts_the_existing_pod_instead_of_creating_a_second() {
    let a = job_assignment(8);
    let existing = live_pod(&a, running());
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(std::slice::from_ref(&existing)).await;
    let events = Collector::new();
    let sink: Arc<dyn RunnerEvents> = events.clone();
    let recovering = tokio::spawn({
        let backend = backend.clone();
        async move { backend.recover(sink).await }
    });
    let get = server
        .expect(
            Method::GET,
            &format!("/api/v1/namespaces/{NS}/secrets/{}", render::pod_name(&a)),
        )
        .await;
    let secret = render::spec_secret(&config(), &cell(), &a, Some("uid-8"));
    get.respond(once(
        StatusCode::OK,
        serde_json::to_value(secret).expect("json"),
    ));
    let recovered = recovering.await.expect("task").expect("recover");
    assert_eq!(
        recovered,
        vec![a.clone()],
        "the agent learns what it still runs"
    );
    // The federator sends the assignment again: it is already running, no second pod.
    let again = backend.start(a.clone(), events.clone()).await;
    assert!(
        matches!(again, Err(RunnerError::AlreadyRunning { .. })),
        "{again:?}"
    );
    serve_log(
        &mut server,
        &a,
        true,
        &[Record::Line {
            ts: 20,
            s: WireStream::Stdout,
            step: Some(0),
            t: "still here".into(),
        }],
    )
    .await;
    events
        .wait_for_line(a.job, a.fence, "still here", WAIT)
        .await;
    watch
        .push(
            "MODIFIED",
            live_pod(&a, terminated(0, "Completed", Some(Outcome::Succeeded))),
        )
        .await;
    let (_, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(outcome, Outcome::Succeeded);
    expect_reaped(&mut server, &backend, &a).await;
}

#[tokio::test]
async fn a_create_that_conflicts_takes_over_the_pod_that_exists() {
    let a = job_assignment(9);
    let existing = live_pod(&a, pending());
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(std::slice::from_ref(&existing)).await;
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    server
        .expect(Method::POST, &pods_path())
        .await
        .respond(status_error(409, "AlreadyExists"));
    let secret = server
        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"))
        .await;
    let sent: Secret = serde_json::from_value(secret.json()).expect("a Secret");
    assert_eq!(
        sent.metadata.owner_references.expect("owned")[0].uid,
        "uid-9",
        "owned by the pod that exists"
    );
    secret.respond(status_error(409, "AlreadyExists"));
    watch
        .push(
            "MODIFIED",
            live_pod(&a, terminated(0, "Completed", Some(Outcome::Succeeded))),
        )
        .await;
    // Ended before it was ever followed: the whole log is read once.
    serve_log(
        &mut server,
        &a,
        false,
        &[Record::Line {
            ts: 30,
            s: WireStream::Stdout,
            step: Some(0),
            t: "done".into(),
        }],
    )
    .await;
    let (all, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert!(
        flotilla_cell_agent::backend::conformance::output_lines(&all)
            .iter()
            .any(|(_, _, t)| t == "done"),
        "{all:#?}"
    );
    expect_reaped(&mut server, &backend, &a).await;
}

#[tokio::test]
async fn a_pod_no_attempt_owns_is_deleted_once_the_agent_has_recovered() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let events = Collector::new();
    assert!(backend.recover(events).await.expect("recover").is_empty());
    let stray = job_assignment(10);
    watch.push("ADDED", live_pod(&stray, running())).await;
    let delete = server
        .expect(Method::DELETE, &pod_path(&render::pod_name(&stray)))
        .await;
    delete.respond(status_error(404, "NotFound"));
}

#[tokio::test]
async fn shutdown_leaves_pods_running_for_the_next_agent_and_refuses_new_work() {
    let (backend, mut server) = setup();
    let mut watch = server.list_and_watch(&[]).await;
    let a = job_assignment(11);
    let events = Collector::new();
    backend
        .start(a.clone(), events.clone())
        .await
        .expect("accepted");
    expect_create(&mut server, &a).await;
    watch.push("ADDED", live_pod(&a, pending())).await;
    tokio::time::timeout(WAIT, backend.shutdown())
        .await
        .expect("shutdown is prompt");
    server.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        finished_outcome(&events.events_of(a.job, a.fence)),
        None,
        "the pod runs on; the next agent reports it"
    );
    let refused = backend.start(job_assignment(12), events.clone()).await;
    assert!(
        matches!(refused, Err(RunnerError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(backend.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn a_spec_that_cannot_be_read_just_now_fails_recovery_without_deleting_the_pod() {
    let a = job_assignment(13);
    let existing = live_pod(&a, running());
    let (backend, mut server) = setup();
    let _watch = server.list_and_watch(std::slice::from_ref(&existing)).await;
    let events = Collector::new();
    let secret_path = format!("/api/v1/namespaces/{NS}/secrets/{}", render::pod_name(&a));
    let first = tokio::spawn({
        let backend = backend.clone();
        let sink: Arc<dyn RunnerEvents> = events.clone();
        async move { backend.recover(sink).await }
    });
    server
        .expect(Method::GET, &secret_path)
        .await
        .respond(status_error(503, "ServiceUnavailable"));
    let failed = first.await.expect("task");
    assert!(
        matches!(failed, Err(RunnerError::Unavailable(_))),
        "{failed:?}"
    );
    // The pod may be a running job: nothing deletes it.
    server.expect_silence(Duration::from_millis(200)).await;
    // The agent tries again, and this time the spec is there.
    let second = tokio::spawn({
        let backend = backend.clone();
        let sink: Arc<dyn RunnerEvents> = events.clone();
        async move { backend.recover(sink).await }
    });
    let secret = render::spec_secret(&config(), &cell(), &a, Some("uid-13"));
    server.expect(Method::GET, &secret_path).await.respond(once(
        StatusCode::OK,
        serde_json::to_value(secret).expect("json"),
    ));
    assert_eq!(second.await.expect("task").expect("recovered"), vec![a]);
}

// ---------------------------------------------------------------------------------------------
// Warm pools: warm pods made before their jobs, handed a job through their standby, and the
// cell's pre-pull DaemonSet.

use flotilla_cell_agent::backend::kubernetes::{PoolPods, WarmPods};
use flotilla_core::autoscale::RunnerId;
use flotilla_core::pipeline::Resources;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::PodCondition;
use std::collections::BTreeMap;

const LARGE: Resources = Resources {
    cpu_millis: 2000,
    memory_bytes: 4 << 30,
};

fn warm_pools(prepull: &[&str]) -> BTreeMap<String, PoolPods> {
    BTreeMap::from([(
        "large".to_owned(),
        PoolPods {
            warm: Some(WarmPods {
                image: "rust:1.83".into(),
                resources: LARGE,
            }),
            prepull: prepull.iter().map(|s| (*s).to_owned()).collect(),
        },
    )])
}

fn setup_with_pools(
    cfg: KubeConfig,
    pools: BTreeMap<String, PoolPods>,
) -> (KubeBackend, ApiServer) {
    let (service, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<TestBody>>();
    let client = kube::Client::new(service, NS);
    let backend = KubeBackend::with_pools(client, cfg, cell(), pools).expect("backend");
    (backend, ApiServer { handle })
}

fn daemonset_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/daemonsets/flotilla-prepull-cell-a")
}

impl ApiServer {
    /// The watcher's list, then its watch and the pre-pull DaemonSet request in whichever
    /// order they come (two tasks start together); returns the watch and the DaemonSet
    /// request, unanswered.
    async fn list_watch_and_prepull(&mut self, pods: &[Pod]) -> (Watch, Exchange) {
        let list = self.expect(Method::GET, &pods_path()).await;
        list.respond(once(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": pods}),
        ));
        let mut watch = None;
        let mut prepull = None;
        while watch.is_none() || prepull.is_none() {
            let x = self.next().await;
            if x.path == pods_path() && x.query.contains("watch=true") {
                let (response, tx) = streaming();
                x.respond(response);
                watch = Some(Watch { tx, rv: 100 });
            } else {
                assert_eq!(
                    x.path,
                    daemonset_path(),
                    "unexpected {} {}",
                    x.method,
                    x.path
                );
                prepull = Some(x);
            }
        }
        (watch.expect("watch"), prepull.expect("daemonset request"))
    }
}

/// A standby that records what the agent sends it and accepts it (202), as the real
/// `flotilla runner standby` does for a valid job (its own tests cover it).
struct FakeStandby {
    port: u16,
    received: mpsc::Receiver<(Option<String>, Bytes)>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeStandby {
    async fn start() -> Self {
        let (tx, received) = mpsc::channel(8);
        let app = axum::Router::new().route(
            "/v1/assign",
            axum::routing::post(move |headers: http::HeaderMap, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let auth = headers
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let _ = tx.send((auth, body)).await;
                    StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        FakeStandby {
            port,
            received,
            _server: server,
        }
    }
}

/// Prepares warm runner `runner` of pool `large` in a task (it waits for the pod to be ready).
fn spawn_prepare(
    backend: &KubeBackend,
    runner: RunnerId,
) -> tokio::task::JoinHandle<Result<(), RunnerError>> {
    let backend = backend.clone();
    tokio::spawn(async move { backend.warm().expect("warm").prepare("large", runner).await })
}

/// A warm pod as the API server returns it, with `status`.
fn live_warm_pod(sent: &Pod, status: PodStatus) -> Pod {
    let mut pod = sent.clone();
    pod.metadata.uid = Some("uid-warm".into());
    pod.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::chrono::Utc::now() - k8s_openapi::chrono::Duration::seconds(90),
    ));
    pod.status = Some(status);
    pod
}

fn container_running(name: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(ContainerState {
            running: Some(ContainerStateRunning { started_at: None }),
            ..ContainerState::default()
        }),
        ..ContainerStatus::default()
    }
}

/// Both containers running; `ready` when the standby answers its probe.
fn warm_running(ready: bool) -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some("127.0.0.1".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..PodCondition::default()
        }]),
        container_statuses: Some(vec![
            container_running(render::STANDBY_CONTAINER),
            container_running(render::JOB_CONTAINER),
        ]),
        ..PodStatus::default()
    }
}

/// Expects a warm pod's creation and its Secret's; returns the pod as sent, and the token.
async fn expect_warm_create(
    server: &mut ApiServer,
    cfg: &KubeConfig,
    runner: RunnerId,
) -> (Pod, String) {
    let create = server.expect(Method::POST, &pods_path()).await;
    let sent: Pod = serde_json::from_value(create.json()).expect("a Pod");
    let name = sent.metadata.name.clone().expect("named");
    let suffix = format!("-large-{}", runner.0);
    let instance = name
        .strip_prefix("flotilla-w")
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("a warm pod's name says pool and runner: {name}"));
    let spec = warm_pools(&[])["large"].warm.clone().expect("warm");
    assert_eq!(
        sent,
        render::warm_pod(cfg, &cell(), "large", runner, instance, &spec),
        "the created pod is the rendered warm pod"
    );
    create.respond(once(
        StatusCode::CREATED,
        serde_json::to_value(live_warm_pod(&sent, pending())).expect("json"),
    ));
    let secret = server
        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"))
        .await;
    let secret_sent: Secret = serde_json::from_value(secret.json()).expect("a Secret");
    assert_eq!(secret_sent.metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(
        secret_sent
            .metadata
            .owner_references
            .as_ref()
            .expect("owned")[0]
            .uid,
        "uid-warm",
        "the token goes with its pod"
    );
    let token = String::from_utf8(
        secret_sent.data.as_ref().expect("data")[render::TOKEN_KEY]
            .0
            .clone(),
    )
    .expect("utf-8");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "a 256-bit random token: {token}"
    );
    secret.respond(once(
        StatusCode::CREATED,
        serde_json::to_value(&secret_sent).expect("json"),
    ));
    (sent, token)
}

#[tokio::test]
async fn a_warm_pod_is_ready_before_its_job_takes_the_job_through_its_standby_and_runs_it() {
    let mut standby = FakeStandby::start().await;
    let cfg = KubeConfig {
        standby_port: standby.port,
        ..config()
    };
    let (backend, mut server) = setup_with_pools(cfg.clone(), warm_pools(&[]));
    let (mut watch, prepull) = server.list_watch_and_prepull(&[]).await;
    // No pool pre-pulls anything: a DaemonSet left by an earlier configuration goes.
    assert_eq!(prepull.method, Method::DELETE);
    prepull.respond(status_error(404, "NotFound"));

    let warm = backend.warm().expect("warm pools on kubernetes");
    let mut a = job_assignment(21);
    a.pool = "large".into();
    a.resources = LARGE;
    assert!(warm.fits("large", &a));
    let runner = RunnerId(1);
    let preparing = spawn_prepare(&backend, runner);
    let (sent, token) = expect_warm_create(&mut server, &cfg, runner).await;
    let name = sent.metadata.name.clone().expect("named");
    watch.push("ADDED", live_warm_pod(&sent, pending())).await;
    watch
        .push("MODIFIED", live_warm_pod(&sent, warm_running(false)))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !preparing.is_finished(),
        "running is not enough: the standby must answer its probe"
    );
    watch
        .push("MODIFIED", live_warm_pod(&sent, warm_running(true)))
        .await;
    tokio::time::timeout(WAIT, preparing)
        .await
        .expect("prepare resolves once the pod is ready")
        .expect("task")
        .expect("the warm pod is ready");
    assert!(
        backend.list().await.expect("list").is_empty(),
        "no attempt yet"
    );

    // The job arrives.
    let events = Collector::new();
    let sink: Arc<dyn RunnerEvents> = events.clone();
    warm.start_on("large", runner, a.clone(), sink)
        .await
        .expect("handed over");
    let patch = server
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        )
        .await;
    let recorded: Assignment = serde_json::from_slice(&base64_decode(
        patch.json()["data"][render::ATTEMPT_KEY]
            .as_str()
            .expect("b64"),
    ))
    .expect("the job, for a restarted agent");
    assert_eq!(recorded, a);
    patch.respond(once(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}),
    ));
    let patch = server.expect(Method::PATCH, &pod_path(&name)).await;
    let body = patch.json();
    assert_eq!(body["metadata"]["labels"][render::LABEL_JOB], json!("21"));
    assert_eq!(body["metadata"]["labels"][render::LABEL_FENCE], json!("7"));
    let deadline = body["spec"]["activeDeadlineSeconds"]
        .as_i64()
        .expect("deadline");
    let from_now = (a.timeout_secs + cfg.startup_allowance.as_secs()) as i64;
    assert!(
        (from_now + 89..=from_now + 92).contains(&deadline),
        "the job's timeout plus the allowance, counted from the pod's start 90 s ago: {deadline}"
    );
    let mut labelled = live_warm_pod(&sent, warm_running(true));
    labelled
        .metadata
        .labels
        .as_mut()
        .expect("labels")
        .extend(render::labels(&cfg, &cell(), &a));
    patch.respond(once(
        StatusCode::OK,
        serde_json::to_value(&labelled).expect("json"),
    ));

    let (auth, body) = tokio::time::timeout(WAIT, standby.received.recv())
        .await
        .expect("the standby is sent the job")
        .expect("open");
    assert_eq!(auth, None, "the token itself never crosses the network");
    assert!(
        !body.windows(8).any(|w| w == b"rust:1.8"),
        "the job is sealed on the wire"
    );
    let opened = flotilla_cell_agent::runner::sealed::open(token.as_bytes(), &body)
        .expect("sealed with the pod's token");
    let got: Assignment = serde_json::from_slice(&opened).expect("an assignment");
    assert_eq!(got, a, "the whole assignment, checkout included");

    // The job container was already running (waiting for the hand-off): only the wrapper's
    // `started` record starts the attempt.
    let log = server
        .expect(Method::GET, &format!("{}/log", pod_path(&name)))
        .await;
    assert!(
        log.query.contains("container=job") && log.query.contains("follow=true"),
        "{}",
        log.query
    );
    let (response, tx) = streaming();
    log.respond(response);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        events.events_of(a.job, a.fence).is_empty(),
        "not started before the steps: {:?}",
        events.events_of(a.job, a.fence)
    );
    tx.send(record_lines(&[
        Record::Started { ts: 40 },
        Record::Line {
            ts: 41,
            s: WireStream::Stdout,
            step: Some(0),
            t: "warm hello".into(),
        },
        Record::Finished {
            ts: 42,
            outcome: Outcome::Succeeded,
        },
    ]))
    .await
    .expect("log open");
    drop(tx); // The container exited: its log ends.
    events
        .wait_for_line(a.job, a.fence, "warm hello", WAIT)
        .await;
    let mut done = labelled.clone();
    done.status = Some(PodStatus {
        phase: Some("Succeeded".into()),
        ..terminated(0, "Completed", Some(Outcome::Succeeded))
    });
    watch.push("MODIFIED", done).await;
    let (all, outcome) = events.wait_finished(a.job, a.fence, WAIT).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert!(
        matches!(all.first(), Some(RunnerEvent::Started { at_ms: 40.. })),
        "{all:#?}"
    );
    // Kept until the report is acknowledged, then deleted like any finished runner.
    server.expect_silence(Duration::from_millis(150)).await;
    backend.reported(a.job, a.fence);
    server
        .expect(Method::DELETE, &pod_path(&name))
        .await
        .respond(status_error(404, "NotFound"));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

#[tokio::test]
async fn a_job_with_another_image_or_more_resources_does_not_fit_the_warm_pods() {
    let (backend, mut server) = setup_with_pools(config(), warm_pools(&[]));
    let (_watch, prepull) = server.list_watch_and_prepull(&[]).await;
    prepull.respond(status_error(404, "NotFound"));
    let warm = backend.warm().expect("warm");
    let mut a = job_assignment(22);
    a.pool = "large".into();
    a.resources = LARGE;
    assert!(warm.fits("large", &a));
    let mut other = a.clone();
    other.image = "node:22".into();
    assert!(!warm.fits("large", &other), "another image");
    let mut bigger = a.clone();
    bigger.resources.memory_bytes = 8 << 30;
    assert!(
        !warm.fits("large", &bigger),
        "more memory than the warm pods have"
    );
    assert!(!warm.fits("default", &a), "a pool without warm pods");
    // Without pools, the backend has no warm runners at all.
    let (plain, _server) = setup();
    assert!(plain.warm().is_none());
}

#[tokio::test]
async fn retiring_an_idle_warm_pod_deletes_it_and_a_pod_that_cannot_pull_is_not_kept() {
    let cfg = config();
    let (backend, mut server) = setup_with_pools(cfg.clone(), warm_pools(&[]));
    let (mut watch, prepull) = server.list_watch_and_prepull(&[]).await;
    prepull.respond(status_error(404, "NotFound"));
    let preparing = spawn_prepare(&backend, RunnerId(1));
    let (sent, _) = expect_warm_create(&mut server, &cfg, RunnerId(1)).await;
    watch
        .push("MODIFIED", live_warm_pod(&sent, warm_running(true)))
        .await;
    preparing.await.expect("task").expect("ready");
    let warm = backend.warm().expect("warm");
    assert_eq!(
        warm.retire("large", RunnerId(1)).await.expect("retire"),
        None
    );
    let name = sent.metadata.name.clone().expect("named");
    server
        .expect(Method::DELETE, &pod_path(&name))
        .await
        .respond(status_error(404, "NotFound"));
    assert!(
        warm.start_on("large", RunnerId(1), job_assignment(23), Collector::new())
            .await
            .is_err(),
        "a retired runner takes no job"
    );

    // Runner 2's image cannot be pulled: past the deadline it is given up and deleted.
    let preparing = spawn_prepare(&backend, RunnerId(2));
    let (sent, _) = expect_warm_create(&mut server, &cfg, RunnerId(2)).await;
    let mut failing = warm_running(false);
    failing.container_statuses = Some(vec![ContainerStatus {
        name: render::JOB_CONTAINER.into(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("Back-off pulling image \"rust:1.83\"".into()),
            }),
            ..ContainerState::default()
        }),
        ..ContainerStatus::default()
    }]);
    watch.push("MODIFIED", live_warm_pod(&sent, failing)).await;
    let err = tokio::time::timeout(WAIT, preparing)
        .await
        .expect("gives up after the pull deadline")
        .expect("task")
        .expect_err("not ready");
    assert!(err.to_string().contains("ImagePullBackOff"), "{err}");
    server
        .expect(
            Method::DELETE,
            &pod_path(&sent.metadata.name.expect("named")),
        )
        .await
        .respond(status_error(404, "NotFound"));
}

#[tokio::test]
async fn the_pools_pre_pull_lists_become_the_cells_daemonset_on_the_runner_nodes() {
    let cfg = KubeConfig {
        node_selector: BTreeMap::from([("pool".to_owned(), "ci".to_owned())]),
        ..config()
    };
    let mut pools = warm_pools(&["rust:1.83", "node:22"]);
    pools.insert(
        "small".into(),
        PoolPods {
            warm: None,
            prepull: vec!["node:22".into(), "debian:12".into()],
        },
    );
    let (_backend, mut server) = setup_with_pools(cfg.clone(), pools);
    let (_watch, apply) = server.list_watch_and_prepull(&[]).await;
    assert_eq!(apply.method, Method::PATCH);
    assert!(
        apply.query.contains("fieldManager=flotilla-agent") && apply.query.contains("force=true"),
        "server-side apply: {}",
        apply.query
    );
    let raw = apply.json();
    assert_eq!(
        (raw["apiVersion"].as_str(), raw["kind"].as_str()),
        (Some("apps/v1"), Some("DaemonSet")),
        "server-side apply needs both"
    );
    let ds: DaemonSet = serde_json::from_value(raw).expect("a DaemonSet");
    let spec = ds
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    let pulled: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .skip(1)
        .map(|c| c.image.as_deref().expect("image"))
        .collect();
    assert_eq!(
        pulled,
        ["rust:1.83", "node:22", "debian:12"],
        "each image once"
    );
    assert_eq!(
        spec.node_selector,
        Some(cfg.node_selector.clone()),
        "on the runner nodes"
    );
    assert_eq!(spec.runtime_class_name, cfg.runtime_class);
    let labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(
        !labels.contains_key(render::LABEL_CELL),
        "not selected by the agent's pod watcher (it would delete them as strays)"
    );
    let pod = Pod {
        metadata: Default::default(),
        spec: Some(spec.clone()),
        status: None,
    };
    assert_eq!(render::restricted_violations(&pod), Vec::<String>::new());
    apply.respond(once(
        StatusCode::OK,
        serde_json::to_value(&ds).expect("json"),
    ));
    server.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_ready_warm_pod_that_dies_before_its_job_is_reported_lost_and_takes_no_job() {
    let cfg = config();
    let (backend, mut server) = setup_with_pools(cfg.clone(), warm_pools(&[]));
    let (mut watch, prepull) = server.list_watch_and_prepull(&[]).await;
    prepull.respond(status_error(404, "NotFound"));
    let warm = backend.warm().expect("warm");
    let preparing = spawn_prepare(&backend, RunnerId(4));
    let (sent, _) = expect_warm_create(&mut server, &cfg, RunnerId(4)).await;
    watch
        .push("MODIFIED", live_warm_pod(&sent, warm_running(true)))
        .await;
    preparing.await.expect("task").expect("ready");
    assert!(warm.take_lost().is_empty(), "alive and well");
    // The node goes: the pod is deleted under the agent.
    watch
        .push("DELETED", live_warm_pod(&sent, warm_running(false)))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let lost = loop {
        let lost = warm.take_lost();
        if !lost.is_empty() {
            break lost;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported lost"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lost, [("large".to_owned(), RunnerId(4))]);
    assert!(warm.take_lost().is_empty(), "reported once");
    assert!(
        warm.start_on("large", RunnerId(4), job_assignment(24), Collector::new())
            .await
            .is_err(),
        "a lost runner takes no job"
    );
    server.expect_silence(Duration::from_millis(150)).await;
}
