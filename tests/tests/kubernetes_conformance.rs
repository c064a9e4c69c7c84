//! The Kubernetes runner backend passes the runner conformance suite against a fake cluster:
//! an in-process API server (the pod, Secret, log and watch endpoints the backend uses) with a
//! fake kubelet that really runs each pod — the checkout init container and the job container
//! execute the pod's own commands with the real `flotilla` binary, with the pod's volumes
//! mapped to directories on this machine. Deleting a pod sends SIGTERM to the container's main
//! process, SIGKILL after the grace period, and tears the container down (every process left
//! in it dies) as a container runtime does.
//!
//! What it cannot show: gVisor, Pod Security admission, image pulls, scheduling. The mock API
//! server tests in the cell agent crate cover those paths; docs/kubernetes.md has the opt-in
//! run against a real cluster.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_cell_agent::backend::conformance::{self, Harness, RepoFixture};
use flotilla_cell_agent::backend::kubernetes::{KubeBackend, KubeConfig, render};
use flotilla_core::ids::CellId;
use flotilla_core::runner::RunnerBackend;
use flotilla_core::{Fence, JobId};
use flotilla_tests::flotilla_bin;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
    Pod, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

const NS: &str = "runners";

fn now() -> Time {
    Time(k8s_openapi::chrono::Utc::now())
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).expect("json")))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).expect("code"),
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                "message": message, "code": code}),
    )
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, BoxError>(http_body::Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response")
}

/// A container's output as kubelet keeps it: everything written so far, and whether the
/// container has exited.
#[derive(Default)]
struct Log {
    data: Mutex<Vec<u8>>,
    /// (bytes written, done)
    progress: Option<watch::Sender<(usize, bool)>>,
}

impl Log {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::default(),
            progress: Some(watch::channel((0, false)).0),
        })
    }

    fn append(&self, bytes: &[u8]) {
        let len = {
            let mut data = self.data.lock().expect("log");
            data.extend_from_slice(bytes);
            data.len()
        };
        if let Some(p) = &self.progress {
            p.send_modify(|(n, _)| *n = len);
        }
    }

    fn close(&self) {
        if let Some(p) = &self.progress {
            p.send_modify(|(_, done)| *done = true);
        }
    }

    /// Streams the log from the start; with `follow`, until the container exits.
    fn stream(self: &Arc<Self>, follow: bool) -> Response<Body> {
        let (tx, rx) = mpsc::channel(64);
        let log = self.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            let mut progress = log.progress.as_ref().expect("progress").subscribe();
            loop {
                let chunk = {
                    let data = log.data.lock().expect("log");
                    data[sent..].to_vec()
                };
                if !chunk.is_empty() {
                    sent += chunk.len();
                    if tx.send(Bytes::from(chunk)).await.is_err() {
                        return;
                    }
                }
                let (len, done) = *progress.borrow_and_update();
                if !follow || (done && len == sent) {
                    return;
                }
                if len == sent && progress.changed().await.is_err() {
                    return;
                }
            }
        });
        streaming(rx)
    }
}

struct PodEntry {
    pod: Pod,
    log: Arc<Log>,
    /// Set when the API server has been asked to delete the pod: the grace period.
    delete: watch::Sender<Option<Duration>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<String, PodEntry>,
    secrets: BTreeMap<String, Secret>,
    watchers: Vec<mpsc::Sender<Bytes>>,
    /// Warm pods get addresses 127.0.0.11 and up, so each one's standby has its own.
    next_ip: u32,
}

/// The fake cluster: API server and kubelet.
#[derive(Clone)]
struct FakeCluster {
    state: Arc<Mutex<State>>,
    root: PathBuf,
}

impl FakeCluster {
    fn new(root: PathBuf) -> Self {
        Self {
            state: Arc::default(),
            root,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pod_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Sends a watch event to every open watch. The caller holds the lock.
    fn emit(state: &mut State, kind: &str, pod: &Pod) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": pod})).expect("json");
        line.push(b'\n');
        let line = Bytes::from(line);
        state
            .watchers
            .retain(|w| w.try_send(line.clone()).is_ok() || !w.is_closed());
    }

    /// Changes a pod's status and tells the watchers.
    fn update(&self, name: &str, change: impl FnOnce(&mut Pod)) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv.to_string();
        let Some(entry) = state.pods.get_mut(name) else {
            return;
        };
        change(&mut entry.pod);
        entry.pod.metadata.resource_version = Some(rv);
        let pod = entry.pod.clone();
        Self::emit(&mut state, "MODIFIED", &pod);
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let pods = format!("/api/v1/namespaces/{NS}/pods");
        let secrets = format!("/api/v1/namespaces/{NS}/secrets");
        let rest = |prefix: &str| path.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'));
        match (&parts.method, path.as_str()) {
            (&Method::GET, p) if p == pods && query.contains("watch=true") => {
                let (tx, rx) = mpsc::channel(1024);
                self.lock().watchers.push(tx);
                streaming(rx)
            }
            (&Method::GET, p) if p == pods => {
                let state = self.lock();
                let items: Vec<&Pod> = state.pods.values().map(|e| &e.pod).collect();
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
                )
            }
            (&Method::POST, p) if p == pods => self.create_pod(&body),
            (&Method::POST, p) if p == secrets => {
                let secret: Secret = serde_json::from_slice(&body).expect("a Secret");
                let name = secret.metadata.name.clone().expect("named");
                let mut state = self.lock();
                if state.secrets.contains_key(&name) {
                    return status(409, "AlreadyExists", "secret exists");
                }
                state.secrets.insert(name, secret.clone());
                json_response(
                    StatusCode::CREATED,
                    &serde_json::to_value(secret).expect("json"),
                )
            }
            (&Method::GET, _) if rest(&secrets).is_some() => {
                let name = rest(&secrets).expect("checked");
                match self.lock().secrets.get(name) {
                    Some(s) => {
                        json_response(StatusCode::OK, &serde_json::to_value(s).expect("json"))
                    }
                    None => status(404, "NotFound", "no such secret"),
                }
            }
            (&Method::PATCH, _) if rest(&secrets).is_some() => {
                // A merge patch of `data` (the warm pod hand-off records the job).
                let name = rest(&secrets).expect("checked");
                let patch: Secret = serde_json::from_slice(&body).expect("a Secret patch");
                let mut state = self.lock();
                let Some(secret) = state.secrets.get_mut(name) else {
                    return status(404, "NotFound", "no such secret");
                };
                secret
                    .data
                    .get_or_insert_default()
                    .extend(patch.data.unwrap_or_default());
                json_response(
                    StatusCode::OK,
                    &serde_json::to_value(&*secret).expect("json"),
                )
            }
            (&Method::PATCH, _) if rest(&pods).is_some() => {
                // A merge patch of labels and annotations (the deadline is not enforced).
                let name = rest(&pods).expect("checked").to_owned();
                let patch: Value = serde_json::from_slice(&body).expect("JSON");
                if !self.lock().pods.contains_key(&name) {
                    return status(404, "NotFound", "no such pod");
                }
                self.update(&name, |p| {
                    for (field, map) in [
                        ("labels", &mut p.metadata.labels),
                        ("annotations", &mut p.metadata.annotations),
                    ] {
                        if let Some(obj) = patch["metadata"][field].as_object() {
                            let map = map.get_or_insert_default();
                            for (k, v) in obj {
                                map.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
                            }
                        }
                    }
                    if let Some(d) = patch["spec"]["activeDeadlineSeconds"].as_i64() {
                        p.spec.get_or_insert_default().active_deadline_seconds = Some(d);
                    }
                });
                let pod = self.lock().pods.get(&name).map(|e| e.pod.clone());
                json_response(StatusCode::OK, &serde_json::to_value(pod).expect("json"))
            }
            (&Method::DELETE, p) if p.starts_with("/apis/apps/v1/") => {
                status(404, "NotFound", "no pre-pull DaemonSet here")
            }
            (&Method::GET, _) if rest(&pods).is_some_and(|r| r.ends_with("/log")) => {
                let name = rest(&pods).expect("checked").trim_end_matches("/log");
                assert!(
                    query.contains("container=job"),
                    "only the job container is read: {query}"
                );
                let log = self.lock().pods.get(name).map(|e| e.log.clone());
                match log {
                    Some(log) => log.stream(query.contains("follow=true")),
                    None => status(404, "NotFound", "no such pod"),
                }
            }
            (&Method::GET, _) if rest(&pods).is_some() => {
                let name = rest(&pods).expect("checked");
                match self.lock().pods.get(name) {
                    Some(e) => {
                        json_response(StatusCode::OK, &serde_json::to_value(&e.pod).expect("json"))
                    }
                    None => status(404, "NotFound", "no such pod"),
                }
            }
            (&Method::DELETE, _) if rest(&pods).is_some() => {
                let name = rest(&pods).expect("checked").to_owned();
                let params: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let grace = params["gracePeriodSeconds"].as_u64().unwrap_or(30);
                match self.delete(&name, Duration::from_secs(grace)) {
                    Some(pod) => {
                        json_response(StatusCode::OK, &serde_json::to_value(pod).expect("json"))
                    }
                    None => status(404, "NotFound", "no such pod"),
                }
            }
            (method, path) => panic!(
                "the backend made a request the fake cluster does not serve: {method} {path}?{query}"
            ),
        }
    }

    /// Deletes a pod as the API server does: a deletion timestamp now, the kubelet stops it
    /// within `grace`, then it is gone.
    fn delete(&self, name: &str, grace: Duration) -> Option<Pod> {
        let pod = {
            let state = self.lock();
            let entry = state.pods.get(name)?;
            if entry.delete.borrow().is_none() {
                entry.delete.send_replace(Some(grace));
            }
            entry.pod.clone()
        };
        self.update(name, |p| {
            p.metadata.deletion_timestamp.get_or_insert_with(now);
        });
        Some(pod)
    }

    fn create_pod(&self, body: &[u8]) -> Response<Body> {
        let mut pod: Pod = serde_json::from_slice(body).expect("a Pod");
        let name = pod.metadata.name.clone().expect("named");
        let mut state = self.lock();
        if state.pods.contains_key(&name) {
            return status(409, "AlreadyExists", "pod exists");
        }
        state.rv += 1;
        pod.metadata.uid = Some(format!("uid-{name}"));
        pod.metadata.resource_version = Some(state.rv.to_string());
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        let (delete, deleted) = watch::channel(None);
        state.pods.insert(
            name.clone(),
            PodEntry {
                pod: pod.clone(),
                log: Log::new(),
                delete,
            },
        );
        Self::emit(&mut state, "ADDED", &pod);
        if render::is_warm(&pod) {
            state.next_ip += 1;
            let ip = format!("127.0.0.{}", 10 + state.next_ip);
            tokio::spawn(self.clone().warm_kubelet(name, ip, deleted));
        } else {
            tokio::spawn(self.clone().kubelet(name, deleted));
        }
        json_response(
            StatusCode::CREATED,
            &serde_json::to_value(pod).expect("json"),
        )
    }

    /// Runs one pod: waits for its Secret, runs the init containers that do work (install is
    /// mapped, not copied), then the job container; honours deletion; removes the pod.
    /// Makes the pod's volumes (a directory each; Secret volumes filled with their items
    /// once the Secret exists, as the kubelet retries the mount until then). `false` when
    /// the pod was deleted first.
    async fn mount_volumes(
        &self,
        name: &str,
        pod_spec: &k8s_openapi::api::core::v1::PodSpec,
        deleted: &watch::Receiver<Option<Duration>>,
    ) -> bool {
        let dir = self.pod_dir(name);
        for volume in pod_spec.volumes.iter().flatten() {
            let vdir = dir.join(&volume.name);
            std::fs::create_dir_all(&vdir).expect("volume dir");
            let Some(source) = &volume.secret else {
                continue;
            };
            let secret_name = source.secret_name.clone().expect("secret name");
            let data = loop {
                if deleted.borrow().is_some() {
                    return false;
                }
                if let Some(s) = self.lock().secrets.get(&secret_name) {
                    break s.data.clone().expect("data");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            for item in source.items.iter().flatten() {
                std::fs::write(vdir.join(&item.path), &data[&item.key].0).expect("secret item");
            }
        }
        true
    }

    /// Sets one container's state in the pod's status.
    fn container_state(&self, name: &str, container: &str, state: ContainerState) {
        self.update(name, |p| {
            let statuses = p
                .status
                .get_or_insert_default()
                .container_statuses
                .get_or_insert_default();
            statuses.retain(|c| c.name != container);
            statuses.push(ContainerStatus {
                name: container.to_owned(),
                ready: state.running.is_some(),
                started: Some(state.running.is_some()),
                state: Some(state),
                ..ContainerStatus::default()
            });
        });
    }

    /// Runs a warm pod: its standby and job containers side by side, on `ip`; Ready once the
    /// standby answers on its port. The phase follows the job container.
    async fn warm_kubelet(
        self,
        name: String,
        ip: String,
        mut deleted: watch::Receiver<Option<Duration>>,
    ) {
        let pod = self
            .lock()
            .pods
            .get(&name)
            .map(|e| e.pod.clone())
            .expect("pod");
        let pod_spec = pod.spec.clone().expect("spec");
        if !self.mount_volumes(&name, &pod_spec, &deleted).await {
            return self.remove(&name);
        }
        self.update(&name, |p| {
            let s = p.status.get_or_insert_default();
            s.phase = Some("Running".into());
            s.pod_ip = Some(ip.clone());
        });
        let standby = pod_spec
            .containers
            .iter()
            .find(|c| c.name == render::STANDBY_CONTAINER)
            .expect("a standby container")
            .clone();
        let job = pod_spec
            .containers
            .iter()
            .find(|c| c.name == render::JOB_CONTAINER)
            .expect("a job container")
            .clone();
        let port = standby.ports.as_ref().expect("ports")[0].container_port;
        let log = self
            .lock()
            .pods
            .get(&name)
            .map(|e| e.log.clone())
            .expect("pod");
        let probe = {
            let this = self.clone();
            let (name, addr) = (name.clone(), format!("{ip}:{port}"));
            tokio::spawn(async move {
                while tokio::net::TcpStream::connect(&addr).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                this.update(&name, |p| {
                    p.status.get_or_insert_default().conditions =
                        Some(vec![k8s_openapi::api::core::v1::PodCondition {
                            type_: "Ready".into(),
                            status: "True".into(),
                            ..Default::default()
                        }]);
                });
            })
        };
        let mut deleted_too = deleted.clone();
        let ((s_code, s_message), (code, message)) = tokio::join!(
            self.run_container(&name, &standby, None, Some(&ip), &mut deleted_too),
            self.run_container(&name, &job, Some(log.clone()), Some(&ip), &mut deleted),
        );
        probe.abort();
        log.close();
        for (c, code, message) in [
            (&standby.name, s_code, s_message),
            (&job.name, code, message.clone()),
        ] {
            self.container_state(&name, c, terminated_state(code, message));
        }
        self.update(&name, |p| {
            let s = p.status.get_or_insert_default();
            s.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
        });
        self.finish_deletion(&name, &mut deleted).await;
    }

    async fn kubelet(self, name: String, mut deleted: watch::Receiver<Option<Duration>>) {
        let pod = self
            .lock()
            .pods
            .get(&name)
            .map(|e| e.pod.clone())
            .expect("pod");
        let pod_spec = pod.spec.clone().expect("spec");
        if !self.mount_volumes(&name, &pod_spec, &deleted).await {
            return self.remove(&name);
        }
        for init in pod_spec.init_containers.iter().flatten() {
            if init.name == render::INSTALL_CONTAINER {
                continue; // /flotilla/bin/flotilla is mapped to the binary under test.
            }
            let (code, message) = self
                .run_container(&name, init, None, None, &mut deleted)
                .await;
            let state = ContainerStatus {
                name: init.name.clone(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                        message,
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            };
            self.update(&name, |p| {
                let s = p.status.get_or_insert_default();
                s.init_container_statuses
                    .get_or_insert_default()
                    .push(state);
                if code != 0 {
                    s.phase = Some("Failed".into());
                }
            });
            if code != 0 || deleted.borrow().is_some() {
                return self.finish_deletion(&name, &mut deleted).await;
            }
        }
        let job = &pod_spec.containers[0];
        let log = self
            .lock()
            .pods
            .get(&name)
            .map(|e| e.log.clone())
            .expect("pod");
        let (code, message) = self
            .run_container(&name, job, Some(log.clone()), None, &mut deleted)
            .await;
        log.close();
        self.update(&name, |p| {
            let s = p.status.get_or_insert_default();
            s.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
            s.container_statuses = Some(vec![ContainerStatus {
                name: job.name.clone(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                        message,
                        finished_at: Some(now()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]);
        });
        self.finish_deletion(&name, &mut deleted).await;
    }

    /// A finished pod stays until it is deleted; then it goes.
    async fn finish_deletion(&self, name: &str, deleted: &mut watch::Receiver<Option<Duration>>) {
        let _ = deleted.wait_for(Option::is_some).await;
        self.remove(name);
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.pod_dir(name));
        let mut state = self.lock();
        state.secrets.remove(name); // Owned by the pod: garbage-collected with it.
        if let Some(entry) = state.pods.remove(name) {
            state.rv += 1;
            let mut pod = entry.pod;
            pod.metadata.resource_version = Some(state.rv.to_string());
            Self::emit(&mut state, "DELETED", &pod);
        }
    }

    /// Runs a container's command on this machine with the pod's volumes mapped to its
    /// directories; returns the exit code and the termination message. A warm pod's
    /// containers (`ip` given) listen on the pod's own address instead of `0.0.0.0`.
    async fn run_container(
        &self,
        name: &str,
        c: &Container,
        log: Option<Arc<Log>>,
        ip: Option<&str>,
        deleted: &mut watch::Receiver<Option<Duration>>,
    ) -> (i32, Option<String>) {
        let dir = self.pod_dir(name);
        let term_file = dir.join(format!("{}.termination-log", c.name));
        // The container's filesystem: its volume mounts, the binary the install container
        // would have copied, and the termination-message file.
        let mut mounts: Vec<(String, PathBuf)> = vec![
            (
                "/usr/local/bin/flotilla".into(),
                flotilla_bin().to_path_buf(),
            ),
            (
                "/flotilla/bin/flotilla".into(),
                flotilla_bin().to_path_buf(),
            ),
            ("/dev/termination-log".into(), term_file.clone()),
        ];
        for m in c.volume_mounts.iter().flatten() {
            mounts.push((m.mount_path.clone(), dir.join(&m.name)));
        }
        let map = |arg: &str| -> String {
            if let (Some(ip), Some(port)) = (ip, arg.strip_prefix("0.0.0.0:")) {
                return format!("{ip}:{port}");
            }
            for (inside, outside) in &mounts {
                if let Some(rest) = arg.strip_prefix(inside.as_str())
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    return format!("{}{rest}", outside.display());
                }
            }
            arg.to_owned()
        };
        let command: Vec<String> = c.command.iter().flatten().map(|a| map(a)).collect();
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(map(c.working_dir.as_deref().unwrap_or("/workspace")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for e in c.env.iter().flatten() {
            cmd.env(&e.name, map(e.value.as_deref().unwrap_or("")));
        }
        let mut child = cmd.spawn().expect("start the container's command");
        let pid = child.id().expect("pid");
        if log.is_some() || ip.is_some() {
            self.update(name, |p| {
                p.status.get_or_insert_default().phase = Some("Running".into());
            });
            self.container_state(
                name,
                &c.name,
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(now()),
                    }),
                    ..ContainerState::default()
                },
            );
        }
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ];
        let mut readers = Vec::new();
        for pipe in pipes.into_iter().flatten() {
            let log = log.clone();
            readers.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut pipe = pipe;
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Some(log) = &log {
                        log.append(&buf[..n]);
                    }
                }
            }));
        }
        let exit = tokio::select! {
            exit = child.wait() => exit.expect("wait"),
            grace = async { *deleted.wait_for(Option::is_some).await.expect("pod entry").as_ref().expect("some") } => {
                // SIGTERM to the container's main process, SIGKILL after the grace period.
                signal(pid, "TERM");
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(exit) => exit.expect("wait"),
                    Err(_) => {
                        kill_container(pid, &dir);
                        child.wait().await.expect("wait")
                    }
                }
            }
        };
        // The container is gone: so is every process still in it. (A warm pod's two
        // containers share the pod's directory: there, only this container's process tree.)
        let scope = if ip.is_some() {
            Path::new("/nonexistent")
        } else {
            dir.as_path()
        };
        kill_container(pid, scope);
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        use std::os::unix::process::ExitStatusExt as _;
        let code = exit
            .code()
            .unwrap_or_else(|| 128 + exit.signal().unwrap_or(9));
        let message = std::fs::read_to_string(&term_file)
            .ok()
            .filter(|m| !m.is_empty());
        (code, message)
    }

    /// Kills what every remaining pod runs (the shutdown case leaves pods running).
    fn kill_everything(&self) {
        let names: Vec<String> = self.lock().pods.keys().cloned().collect();
        for name in names {
            kill_container(0, &self.pod_dir(&name));
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// SIGKILLs the container: its main process, its descendants, and anything whose working
/// directory is inside the pod (what a PID namespace would hold).
fn kill_container(main: u32, pod_dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut parents: HashMap<u32, u32> = HashMap::new();
    let mut inside = Vec::new();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat"))
            && let Some(after) = stat.rsplit_once(')').map(|(_, a)| a.to_owned())
            && let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            parents.insert(pid, ppid);
        }
        if std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(pod_dir)) {
            inside.push(pid);
        }
    }
    let mut doomed = inside;
    if main != 0 {
        doomed.push(main);
        let mut frontier = vec![main];
        while let Some(p) = frontier.pop() {
            for (child, parent) in &parents {
                if *parent == p && !doomed.contains(child) {
                    doomed.push(*child);
                    frontier.push(*child);
                }
            }
        }
    }
    for pid in doomed {
        signal(pid, "KILL");
    }
}

struct Fake {
    backend: Arc<KubeBackend>,
    cluster: FakeCluster,
    repo: RepoFixture,
}

impl Harness for Fake {
    fn backend(&self) -> Arc<dyn RunnerBackend> {
        self.backend.clone()
    }

    fn leftover_processes(&self, marker: &str) -> Option<usize> {
        Some(conformance::processes_named(marker))
    }

    fn workspace_exists(&self, job: JobId, fence: Fence) -> Option<bool> {
        let name = format!("flotilla-j{job}-a1-f{fence}");
        Some(self.cluster.pod_dir(&name).join("workspace").exists())
    }

    fn repo(&self) -> Option<RepoFixture> {
        Some(self.repo.clone())
    }

    fn runners_outlive_the_backend(&self) -> bool {
        true
    }
}

fn fake_backend(cluster: &FakeCluster) -> KubeBackend {
    let service = tower::service_fn({
        let cluster = cluster.clone();
        move |req: Request<kube::client::Body>| {
            let cluster = cluster.clone();
            async move { Ok::<_, Infallible>(cluster.handle(req).await) }
        }
    });
    let client = kube::Client::new(service, NS);
    let cfg = KubeConfig {
        namespace: NS.into(),
        cancel_grace: Duration::from_secs(5),
        ..KubeConfig::default()
    };
    KubeBackend::new(client, cfg, CellId::new("fake").expect("cell")).expect("backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_deleted_by_someone_else_is_an_eviction_not_a_cancel() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::new(tmp.path().to_path_buf());
    let _cleanup = KillOnDrop(cluster.clone());
    let _ = flotilla_bin();
    let backend = fake_backend(&cluster);
    let events = conformance::Collector::new();
    let a = conformance::assignment(JobId(1), Fence(3), &["echo ready; sleep 300"]);
    let sink: Arc<dyn flotilla_core::runner::RunnerEvents> = events.clone();
    backend.start(a.clone(), sink).await.expect("accepted");
    events
        .wait_for_line(a.job, a.fence, "ready", Duration::from_secs(60))
        .await;
    // A node drain: the wrapper gets SIGTERM and stops its step, as it would for a cancel.
    cluster
        .delete(&render::pod_name(&a), Duration::from_secs(5))
        .expect("the pod exists");
    let (all, outcome) = events
        .wait_finished(a.job, a.fence, Duration::from_secs(20))
        .await;
    assert_eq!(
        outcome,
        flotilla_core::job::Outcome::Failed(flotilla_core::job::FailureClass::Infra {
            reason: flotilla_core::job::InfraReason::Evicted
        }),
        "{all:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_backend_passes_the_runner_conformance_suite_on_a_fake_kubelet() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pods_root = tmp.path().join("pods");
    std::fs::create_dir_all(&pods_root).expect("dir");
    let repo_root = tmp.path().join("repo");
    std::fs::create_dir_all(&repo_root).expect("dir");
    let repo = conformance::two_commit_repository(&repo_root);
    // Build the binary before the clock of any case starts.
    let _ = flotilla_bin();
    let cluster = FakeCluster::new(pods_root);
    let backend = fake_backend(&cluster);
    let fake = Fake {
        backend: Arc::new(backend),
        cluster: cluster.clone(),
        repo,
    };
    let _cleanup = KillOnDrop(cluster);
    conformance::run_all(&fake).await;
}

/// Kills what the pods still run when the test ends, passed or not.
struct KillOnDrop(FakeCluster);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill_everything();
    }
}

fn terminated_state(code: i32, message: Option<String>) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            message,
            finished_at: Some(now()),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    }
}

/// A port free on this machine for the warm pods' standby (each pod listens on its own
/// loopback address, all on this port).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pod_is_ready_before_its_job_then_checks_it_out_and_runs_it_with_the_real_wrapper() {
    use flotilla_cell_agent::backend::kubernetes::{PoolPods, WarmPods};
    use flotilla_core::autoscale::RunnerId;
    use flotilla_core::job::Outcome;
    let tmp = tempfile::tempdir().expect("tempdir");
    let pods_root = tmp.path().join("pods");
    std::fs::create_dir_all(&pods_root).expect("dir");
    let repo_root = tmp.path().join("repo");
    std::fs::create_dir_all(&repo_root).expect("dir");
    let repo = conformance::two_commit_repository(&repo_root);
    let _ = flotilla_bin();
    let cluster = FakeCluster::new(pods_root);
    let _cleanup = KillOnDrop(cluster.clone());
    let service = tower::service_fn({
        let cluster = cluster.clone();
        move |req: Request<kube::client::Body>| {
            let cluster = cluster.clone();
            async move { Ok::<_, Infallible>(cluster.handle(req).await) }
        }
    });
    let cfg = KubeConfig {
        namespace: NS.into(),
        cancel_grace: Duration::from_secs(5),
        standby_port: free_port(),
        ..KubeConfig::default()
    };
    let mut a = conformance::assignment(
        JobId(77),
        Fence(5),
        &[&format!("cat '{}'", repo.file), "echo warm-done"],
    );
    a.checkout = Some(repo.checkout.clone());
    a.pool = "large".into();
    let pools = BTreeMap::from([(
        "large".to_owned(),
        PoolPods {
            warm: Some(WarmPods {
                image: a.image.clone(),
                resources: a.resources,
            }),
            prepull: Vec::new(),
        },
    )]);
    let backend = KubeBackend::with_pools(
        kube::Client::new(service, NS),
        cfg,
        CellId::new("fake").expect("cell"),
        pools,
    )
    .expect("backend");
    let warm = backend.warm().expect("warm runners");
    assert!(warm.fits("large", &a));
    tokio::time::timeout(Duration::from_secs(60), warm.prepare("large", RunnerId(1)))
        .await
        .expect("the warm pod gets ready")
        .expect("ready");
    let pods: Vec<Pod> = cluster
        .lock()
        .pods
        .values()
        .map(|e| e.pod.clone())
        .collect();
    assert_eq!(pods.len(), 1, "one warm pod");
    assert!(
        pods[0]
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| !l.contains_key(render::LABEL_JOB)),
        "no job yet"
    );

    let events = conformance::Collector::new();
    let sink: Arc<dyn flotilla_core::runner::RunnerEvents> = events.clone();
    warm.start_on("large", RunnerId(1), a.clone(), sink)
        .await
        .expect("handed over");
    let (all, outcome) = events
        .wait_finished(a.job, a.fence, Duration::from_secs(60))
        .await;
    assert_eq!(outcome, Outcome::Succeeded, "{all:#?}");
    let lines: Vec<String> = conformance::output_lines(&all)
        .into_iter()
        .map(|(_, _, t)| t)
        .collect();
    assert!(
        lines.contains(&repo.contents) && lines.contains(&"warm-done".to_owned()),
        "the steps ran in the checked-out commit: {lines:?}"
    );
    let started = all
        .iter()
        .position(|e| matches!(e, flotilla_core::runner::RunnerEvent::Started { .. }))
        .expect("started");
    let first_output = all
        .iter()
        .position(|e| {
            matches!(
                e,
                flotilla_core::runner::RunnerEvent::Line {
                    stream: flotilla_core::runner::Stream::Stdout,
                    ..
                }
            )
        })
        .expect("output");
    assert!(
        started < first_output,
        "started before the steps' output: {all:#?}"
    );
    let pod = cluster
        .lock()
        .pods
        .values()
        .next()
        .map(|e| e.pod.clone())
        .expect("kept until reported");
    let labels = pod.metadata.labels.expect("labels");
    assert_eq!(
        labels[render::LABEL_JOB],
        "77",
        "the pod carries its job's labels"
    );
    assert_eq!(labels[render::LABEL_FENCE], "5");
    backend.reported(a.job, a.fence);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cluster.lock().pods.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the used warm pod is deleted: {:#?}",
            cluster
                .lock()
                .pods
                .values()
                .map(|e| (
                    e.pod.metadata.name.clone(),
                    e.pod.metadata.deletion_timestamp.clone(),
                    e.pod.status.clone()
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
