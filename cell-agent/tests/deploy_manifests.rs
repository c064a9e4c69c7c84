//! The Kubernetes manifests of a cell (`deploy/kubernetes/`) are valid, and keep the properties
//! the cell's security rests on (ARCHITECTURE §8, §10).
//!
//! Every `*.yaml` file there is read (a new file is checked without touching this test), split
//! into its documents, and each document is read as the `k8s-openapi` type its `apiVersion` and
//! `kind` name. An unknown kind fails. k8s-openapi ignores fields it does not know, so a
//! misspelt field (`runAsNonRot: true`) would read "successfully" and quietly drop a security
//! setting: each typed object is therefore written back to JSON and compared with what the file
//! says, and any field that does not survive the round trip fails the test with its path.
//!
//! Then one test per property: what the agent's Role grants, that nothing is cluster-wide, what
//! runner pods may reach, the gVisor RuntimeClass, the agent Deployment's shape and security
//! context, and that the agent's configuration agrees with the objects around it.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use flotilla_cell_agent::config::{AgentFile, AuthFile, BackendFile};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSecurityContext, SecurityContext, ServiceAccount,
};
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the agent runs.
const AGENT_NAMESPACE: &str = "flotilla-system";
/// Where runner pods run.
const RUNNER_NAMESPACE: &str = "flotilla-runners";
/// The agent's name: its ServiceAccount, Role, RoleBinding, ConfigMap and Deployment.
const AGENT: &str = "flotilla-agent";
/// The label the agent puts on every runner pod.
const RUNNER_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "flotilla");
const KUSTOMIZATION: &str = "kustomization.yaml";

// ---------------------------------------------------------------------------------------------
// Reading the manifests
// ---------------------------------------------------------------------------------------------

/// The workspace root. Read from `CARGO_MANIFEST_DIR` at run time when cargo sets it (clones
/// sharing one target directory may run each other's test binaries; see
/// `flotilla_tests::workspace_root`), else the path this file was compiled at.
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("cell-agent/ sits in the workspace")
        .to_path_buf()
}

fn manifest_dir() -> PathBuf {
    workspace_root().join("deploy").join("kubernetes")
}

/// Every YAML file in `deploy/kubernetes/` (`*.yaml`, and `*.yml` so that one cannot slip past
/// the checks), by name, with its text.
fn yaml_files() -> BTreeMap<String, String> {
    let dir = manifest_dir();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files = BTreeMap::new();
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        if !is_yaml || !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        files.insert(name, text);
    }
    assert!(
        files.len() > 1,
        "{} holds no manifests besides the kustomization",
        dir.display()
    );
    files
}

/// One YAML document of a manifest file, as JSON.
struct Document {
    file: String,
    /// 1-based position among the file's non-empty documents.
    index: usize,
    value: Value,
}

impl Document {
    fn str_at(&self, pointer: &str) -> Option<&str> {
        self.value.pointer(pointer).and_then(Value::as_str)
    }

    fn kind(&self) -> &str {
        self.str_at("/kind").unwrap_or("<no kind>")
    }

    /// `file (document n, Kind name)`, for messages.
    fn describe(&self) -> String {
        let name = self.str_at("/metadata/name").unwrap_or("<no name>");
        format!(
            "{} (document {}, {} {name})",
            self.file,
            self.index,
            self.kind()
        )
    }
}

/// Splits one file's text into its documents (empty documents, such as a file of comments, are
/// skipped by serde-saphyr).
fn split_documents(file: &str, text: &str) -> Result<Vec<Document>, String> {
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("{file}: not valid YAML: {e}"))?;
    let mut documents = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        if !value.is_object() {
            return Err(format!(
                "{file} (document {}): a manifest is a mapping, found {value}",
                i + 1
            ));
        }
        documents.push(Document {
            file: file.to_owned(),
            index: i + 1,
            value,
        });
    }
    Ok(documents)
}

/// Every document of every manifest file (all but the kustomization), or the reasons some
/// cannot be read.
fn documents() -> Vec<Document> {
    let mut documents = Vec::new();
    let mut problems = Vec::new();
    for (file, text) in yaml_files() {
        if file == KUSTOMIZATION {
            continue;
        }
        match split_documents(&file, &text) {
            Ok(docs) if docs.is_empty() => problems.push(format!("{file}: no documents")),
            Ok(docs) => documents.extend(docs),
            Err(problem) => problems.push(problem),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    documents
}

/// A manifest document read as its k8s-openapi type.
struct Manifest {
    file: String,
    kind: String,
    name: String,
    namespace: Option<String>,
    object: Box<dyn Any>,
}

impl Manifest {
    fn get<T: 'static>(&self) -> Option<&T> {
        self.object.downcast_ref()
    }
}

fn is<T: Resource>(api_version: &str, kind: &str) -> bool {
    api_version == T::API_VERSION && kind == T::KIND
}

/// Reads a document as the type its `apiVersion` and `kind` name. The kinds a cell's manifests
/// may hold are listed here; anything else (including ClusterRole and ClusterRoleBinding) is
/// refused.
fn parse(doc: &Document) -> Result<Manifest, String> {
    let api_version = doc.str_at("/apiVersion").unwrap_or("<no apiVersion>");
    let kind = doc.kind();
    if is::<Namespace>(api_version, kind) {
        typed::<Namespace>(doc)
    } else if is::<ServiceAccount>(api_version, kind) {
        typed::<ServiceAccount>(doc)
    } else if is::<Role>(api_version, kind) {
        typed::<Role>(doc)
    } else if is::<RoleBinding>(api_version, kind) {
        typed::<RoleBinding>(doc)
    } else if is::<RuntimeClass>(api_version, kind) {
        typed::<RuntimeClass>(doc)
    } else if is::<NetworkPolicy>(api_version, kind) {
        typed::<NetworkPolicy>(doc)
    } else if is::<ConfigMap>(api_version, kind) {
        typed::<ConfigMap>(doc)
    } else if is::<Deployment>(api_version, kind) {
        typed::<Deployment>(doc)
    } else {
        Err(format!(
            "{}: `apiVersion: {api_version}`, `kind: {kind}` is not a kind a cell's manifests \
             hold (known: Namespace, ServiceAccount, Role, RoleBinding, RuntimeClass, \
             NetworkPolicy, ConfigMap, Deployment; add it to `parse` in this test if it belongs)",
            doc.describe()
        ))
    }
}

/// Reads `doc` as a `T`, then checks that writing it back gives the document again (so no field
/// was ignored), that it has a name, and that it has a namespace exactly when `T` is namespaced.
fn typed<T>(doc: &Document) -> Result<Manifest, String>
where
    T: Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned + Serialize + 'static,
{
    let object: T = serde_json::from_value(doc.value.clone())
        .map_err(|e| format!("{}: not a valid {}: {e}", doc.describe(), T::KIND))?;
    let written = serde_json::to_value(&object)
        .map_err(|e| format!("{}: cannot be written back: {e}", doc.describe()))?;
    let mut differences = Vec::new();
    differences_between("", &doc.value, &written, &mut differences);
    if !differences.is_empty() {
        return Err(format!(
            "{}: does not survive reading as a {} and writing back (a misspelt or misplaced \
             field is silently ignored by Kubernetes clients):\n    {}",
            doc.describe(),
            T::KIND,
            differences.join("\n    ")
        ));
    }
    let meta = object.metadata();
    let name = meta.name.clone().filter(|n| !n.is_empty());
    let Some(name) = name else {
        return Err(format!("{}: metadata.name is missing", doc.describe()));
    };
    let namespaced = TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>();
    match (&meta.namespace, namespaced) {
        (None, true) => {
            return Err(format!(
                "{}: a {} is namespaced; say which namespace (kubectl would use the current \
                 context's)",
                doc.describe(),
                T::KIND
            ));
        }
        (Some(ns), false) => {
            return Err(format!(
                "{}: a {} is cluster-scoped, yet has namespace {ns}",
                doc.describe(),
                T::KIND
            ));
        }
        _ => {}
    }
    Ok(Manifest {
        file: doc.file.clone(),
        kind: T::KIND.to_owned(),
        name,
        namespace: meta.namespace.clone(),
        object: Box::new(object),
    })
}

/// Collects where `written` (the typed object written back) differs from `original` (the file),
/// as `path: what` lines.
fn differences_between(path: &str, original: &Value, written: &Value, out: &mut Vec<String>) {
    let at = |key: &dyn std::fmt::Display| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (original, written) {
        (Value::Object(original), Value::Object(written)) => {
            for (key, value) in original {
                match written.get(key) {
                    Some(w) => differences_between(&at(key), value, w, out),
                    None => out.push(format!(
                        "`{}` is not a field here: it was ignored (misspelt, or at the wrong level?)",
                        at(key)
                    )),
                }
            }
            for key in written.keys().filter(|k| !original.contains_key(*k)) {
                out.push(format!("`{}` appears only after the round trip", at(key)));
            }
        }
        (Value::Array(original), Value::Array(written)) if original.len() == written.len() => {
            for (i, (o, w)) in original.iter().zip(written).enumerate() {
                differences_between(&format!("{path}[{i}]"), o, w, out);
            }
        }
        // Resource quantities (`cpu: 1`, `memory: 512`) may be written as bare YAML numbers,
        // which the API server accepts; k8s-openapi's `Quantity` reads a number into its string
        // form and writes that string. So a number that comes back as exactly its own decimal
        // text is the same value. No other type turns numbers into strings (a `String` field
        // refuses a number, and `IntOrString` writes back whichever of the two it read), so this
        // hides nothing else.
        (Value::Number(n), Value::String(s)) if n.to_string() == *s => {}
        (o, w) if o == w => {}
        (o, w) => out.push(format!(
            "`{}`: the file says {o}, read back as {w}",
            if path.is_empty() { "<document>" } else { path }
        )),
    }
}

/// Every manifest read as its type; fails with every problem in every file.
fn manifests() -> Vec<Manifest> {
    let mut manifests = Vec::new();
    let mut problems = Vec::new();
    for doc in documents() {
        match parse(&doc) {
            Ok(manifest) => manifests.push(manifest),
            Err(problem) => problems.push(problem),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    manifests
}

/// The one object of type `T` named `name` (in `namespace`, for namespaced kinds).
fn the<'a, T: Resource + 'static>(
    manifests: &'a [Manifest],
    namespace: Option<&str>,
    name: &str,
) -> &'a T {
    let found: Vec<&T> = manifests
        .iter()
        .filter(|m| m.name == name && m.namespace.as_deref() == namespace)
        .filter_map(Manifest::get::<T>)
        .collect();
    match found.as_slice() {
        [one] => one,
        [] => panic!("no {} {name} in namespace {namespace:?}", T::KIND),
        _ => panic!("{} {name} is defined {} times", T::KIND, found.len()),
    }
}

fn all<T: 'static>(manifests: &[Manifest]) -> impl Iterator<Item = &T> {
    manifests.iter().filter_map(Manifest::get::<T>)
}

/// The agent configuration held by the agent's ConfigMap.
fn agent_config(manifests: &[Manifest]) -> Value {
    let config_map: &ConfigMap = the(manifests, Some(AGENT_NAMESPACE), AGENT);
    let text = config_map
        .data
        .as_ref()
        .and_then(|data| data.get("agent.yaml"))
        .expect("the agent's ConfigMap has the key agent.yaml");
    let config: Value = serde_saphyr::from_str(text)
        .unwrap_or_else(|e| panic!("agent.yaml in the ConfigMap is not valid YAML: {e}"));
    assert!(
        config.is_object(),
        "agent.yaml is a mapping, found {config}"
    );
    config
}

fn config_str<'a>(config: &'a Value, pointer: &str) -> &'a str {
    config
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("agent.yaml has no string at {pointer}"))
}

// ---------------------------------------------------------------------------------------------
// Validity
// ---------------------------------------------------------------------------------------------

#[test]
fn every_manifest_is_a_known_kubernetes_object_without_ignored_fields() {
    let manifests = manifests();
    let files: BTreeSet<&str> = manifests.iter().map(|m| m.file.as_str()).collect();
    // Every file besides the kustomization produced at least one object (checked in
    // `documents`); spot-check that the reading is not vacuous.
    assert!(files.contains("agent-deployment.yaml"), "{files:?}");
    let mut seen = BTreeSet::new();
    for m in &manifests {
        let key = (m.kind.clone(), m.namespace.clone(), m.name.clone());
        assert!(
            seen.insert(key),
            "{}: {} {} (namespace {:?}) is defined twice",
            m.file,
            m.kind,
            m.name,
            m.namespace
        );
    }
}

#[test]
fn the_round_trip_check_reports_a_misspelt_field_and_accepts_numeric_quantities() {
    let yaml = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: ns}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: main
          image: example
          resources: {limits: {cpu: 1, memory: 512}}
          securityContext: {runAsNonRot: true}
";
    let docs = split_documents("inline.yaml", yaml).unwrap();
    let Err(problem) = parse(&docs[0]) else {
        panic!("a misspelt runAsNonRoot was not noticed");
    };
    assert!(
        problem.contains("spec.template.spec.containers[0].securityContext.runAsNonRot"),
        "{problem}"
    );
    assert!(!problem.contains("resources"), "{problem}");

    let fixed = yaml.replace("runAsNonRot", "runAsNonRoot");
    let docs = split_documents("inline.yaml", &fixed).unwrap();
    if let Err(problem) = parse(&docs[0]) {
        panic!("{problem}");
    }
}

#[test]
fn an_unknown_kind_is_refused_with_its_file() {
    let yaml = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: x}\n";
    let docs = split_documents("extra.yaml", yaml).unwrap();
    let Err(problem) = parse(&docs[0]) else {
        panic!("a ClusterRole was accepted");
    };
    assert!(problem.starts_with("extra.yaml"), "{problem}");
}

#[test]
fn the_kustomization_lists_every_manifest_file_and_only_existing_ones() {
    let files = yaml_files();
    let text = files
        .get(KUSTOMIZATION)
        .unwrap_or_else(|| panic!("deploy/kubernetes/{KUSTOMIZATION} is missing"));
    let kustomization: Value = serde_saphyr::from_str(text)
        .unwrap_or_else(|e| panic!("{KUSTOMIZATION}: not valid YAML: {e}"));
    assert_eq!(
        kustomization["apiVersion"], "kustomize.config.k8s.io/v1beta1",
        "{KUSTOMIZATION}"
    );
    assert_eq!(kustomization["kind"], "Kustomization", "{KUSTOMIZATION}");
    // A kustomization-wide `namespace:` would move every object into one namespace, but the
    // agent lives in flotilla-system and its Role, RoleBinding and NetworkPolicy must be in
    // flotilla-runners.
    assert!(
        kustomization.get("namespace").is_none(),
        "{KUSTOMIZATION} must not set `namespace`: the objects span two namespaces"
    );
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{KUSTOMIZATION} has no `resources` list"))
        .iter()
        .map(|r| {
            r.as_str()
                .unwrap_or_else(|| panic!("{KUSTOMIZATION}: resource {r} is not a file name"))
        })
        .collect();
    let listed: BTreeSet<&str> = resources.iter().copied().collect();
    assert_eq!(
        listed.len(),
        resources.len(),
        "{KUSTOMIZATION} lists a file twice"
    );
    for resource in &resources {
        assert!(
            manifest_dir().join(resource).is_file(),
            "{KUSTOMIZATION} lists {resource}, which does not exist"
        );
    }
    let on_disk: BTreeSet<&str> = files
        .keys()
        .map(String::as_str)
        .filter(|f| *f != KUSTOMIZATION)
        .collect();
    let unlisted: Vec<&&str> = on_disk.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "{KUSTOMIZATION} does not list {unlisted:?}: `kubectl apply -k` would skip them"
    );
}

// ---------------------------------------------------------------------------------------------
// What the agent may do
// ---------------------------------------------------------------------------------------------

#[test]
fn the_agent_role_is_namespaced_and_grants_only_pods_pod_logs_secrets_events_and_the_prepull_daemonset()
 {
    let manifests = manifests();
    let role: &Role = the(&manifests, Some(RUNNER_NAMESPACE), AGENT);
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        assert!(
            groups == [String::new()]
                || (groups == ["apps".to_owned()] && resources == ["daemonsets".to_owned()]),
            "rule {i}: only the core API group, and apps for the pre-pull DaemonSet: {groups:?} {resources:?}"
        );
        assert!(
            rule.non_resource_urls.is_none(),
            "rule {i}: no non-resource URLs"
        );
        let resources = rule.resources.as_deref().unwrap_or_default();
        assert!(!resources.is_empty(), "rule {i} names no resources");
        for resource in resources {
            assert!(
                !resource.contains('*'),
                "rule {i}: wildcard resource {resource}"
            );
            for verb in &rule.verbs {
                assert!(!verb.contains('*'), "rule {i}: wildcard verb {verb}");
                granted
                    .entry(resource.clone())
                    .or_default()
                    .insert(verb.clone());
            }
        }
    }
    let expected: BTreeMap<String, BTreeSet<String>> = [
        (
            "pods",
            &[
                "get",
                "list",
                "watch",
                "create",
                "patch",
                "delete",
                "deletecollection",
            ][..],
        ),
        ("pods/log", &["get"][..]),
        ("secrets", &["get", "create", "patch", "delete"][..]),
        ("events", &["get", "list", "watch"][..]),
        ("daemonsets", &["get", "create", "patch", "delete"][..]),
    ]
    .into_iter()
    .map(|(resource, verbs)| {
        (
            resource.to_owned(),
            verbs.iter().map(|v| (*v).to_owned()).collect(),
        )
    })
    .collect();
    assert_eq!(
        granted, expected,
        "the agent's Role grants exactly these; widening it is a security decision"
    );
    assert_eq!(
        all::<Role>(&manifests).count(),
        1,
        "the agent's is the only Role"
    );
}

#[test]
fn the_role_is_bound_to_the_agent_service_account_that_the_deployment_runs_as() {
    let manifests = manifests();
    let _: &ServiceAccount = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let binding: &RoleBinding = the(&manifests, Some(RUNNER_NAMESPACE), AGENT);
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.name, AGENT);
    let subjects: Vec<(&str, &str, Option<&str>)> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect();
    assert_eq!(
        subjects,
        [("ServiceAccount", AGENT, Some(AGENT_NAMESPACE))],
        "the binding names the agent's ServiceAccount and nothing else"
    );
    let deployment: &Deployment = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(AGENT));
    assert_eq!(all::<RoleBinding>(&manifests).count(), 1);
}

#[test]
fn nothing_is_granted_cluster_wide() {
    // Read from the raw documents, so the answer does not depend on which kinds `parse` knows.
    let cluster_wide: Vec<String> = documents()
        .iter()
        .filter(|doc| matches!(doc.kind(), "ClusterRole" | "ClusterRoleBinding"))
        .map(Document::describe)
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "the cell's RBAC is namespaced only, found {cluster_wide:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// What runner pods may reach
// ---------------------------------------------------------------------------------------------

/// An address range, parsed from CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    network: u128,
    prefix: u32,
    v6: bool,
}

impl Cidr {
    fn parse(text: &str) -> Cidr {
        let (addr, prefix) = text
            .split_once('/')
            .unwrap_or_else(|| panic!("{text} is not CIDR notation"));
        let prefix: u32 = prefix
            .parse()
            .unwrap_or_else(|_| panic!("bad prefix in {text}"));
        let addr: IpAddr = addr
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {text}"));
        let (bits, v6, width) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), false, 32),
            IpAddr::V6(a) => (u128::from(a), true, 128),
        };
        assert!(prefix <= width, "prefix too long in {text}");
        let cidr = Cidr {
            network: bits,
            prefix,
            v6,
        };
        assert_eq!(
            bits & cidr.mask(),
            bits,
            "{text} has host bits set (Kubernetes refuses it)"
        );
        cidr
    }

    fn width(self) -> u32 {
        if self.v6 { 128 } else { 32 }
    }

    fn mask(self) -> u128 {
        let width = self.width();
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        if self.prefix == 0 {
            0
        } else {
            all & !((1u128 << (width - self.prefix)) - 1)
        }
    }

    /// Whether every address of `other` is in `self`.
    fn contains(self, other: Cidr) -> bool {
        self.v6 == other.v6
            && self.prefix <= other.prefix
            && other.network & self.mask() == self.network
    }

    fn overlaps(self, other: Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }
}

/// Ranges no runner may reach: cloud metadata, link-local, and private networks.
const FORBIDDEN: [&str; 9] = [
    "169.254.169.254/32",
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fd00:ec2::254/128",
    "fc00::/7",
    "fe80::/10",
];

/// The forbidden ranges that an egress `ipBlock` lets through.
fn reachable_forbidden_ranges(block: &IPBlock) -> Vec<&'static str> {
    let cidr = Cidr::parse(&block.cidr);
    let except: Vec<Cidr> = block
        .except
        .iter()
        .flatten()
        .map(|e| {
            let e = Cidr::parse(e);
            assert!(
                cidr.contains(e),
                "except {e:?} is outside {} (Kubernetes refuses it)",
                block.cidr
            );
            e
        })
        .collect();
    FORBIDDEN
        .into_iter()
        .filter(|range| {
            let range = Cidr::parse(range);
            cidr.overlaps(range) && !except.iter().any(|e| e.contains(range))
        })
        .collect()
}

fn selects_runner_pods(policy: &NetworkPolicy) -> bool {
    let spec = policy.spec.as_ref().expect("a NetworkPolicy has a spec");
    spec.pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|labels| labels.get(RUNNER_LABEL.0))
        .is_some_and(|v| v == RUNNER_LABEL.1)
}

/// The label warm runner pods carry on top of [`RUNNER_LABEL`].
const WARM_LABEL: (&str, &str) = ("flotilla.dev/warm", "true");

/// Whether the policy selects only warm runner pods (it may let the agent in).
fn selects_only_warm_pods(policy: &NetworkPolicy) -> bool {
    let spec = policy.spec.as_ref().expect("a NetworkPolicy has a spec");
    spec.pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|labels| labels.get(WARM_LABEL.0))
        .is_some_and(|v| v == WARM_LABEL.1)
}

#[test]
fn only_the_agent_may_connect_to_warm_runner_pods_and_only_on_the_standby_port() {
    let manifests = manifests();
    let config = agent_config(&manifests);
    let port = config
        .pointer("/backend/kubernetes/standby_port")
        .and_then(Value::as_i64)
        .unwrap_or(7171) as i32;
    let warm: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| {
            m.get::<NetworkPolicy>()
                .is_some_and(|p| selects_runner_pods(p) && selects_only_warm_pods(p))
        })
        .collect();
    assert_eq!(warm.len(), 1, "one policy lets the agent reach warm pods");
    assert_eq!(warm[0].namespace.as_deref(), Some(RUNNER_NAMESPACE));
    let spec = warm[0]
        .get::<NetworkPolicy>()
        .unwrap()
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    assert!(spec.egress.is_none(), "it adds no egress");
    let ingress = spec.ingress.as_deref().expect("ingress");
    assert_eq!(ingress.len(), 1);
    let from = ingress[0].from.as_deref().expect("from");
    assert_eq!(from.len(), 1, "only the agent");
    let peer = &from[0];
    assert!(peer.ip_block.is_none());
    let ns = peer
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|l| l.get("kubernetes.io/metadata.name"));
    let pods = peer
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .and_then(|l| l.get("app.kubernetes.io/name"));
    assert_eq!(
        (ns.map(String::as_str), pods.map(String::as_str)),
        (Some(AGENT_NAMESPACE), Some(AGENT))
    );
    let deployment: &Deployment = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let agent_labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .expect("agent pod labels");
    assert_eq!(
        agent_labels
            .get("app.kubernetes.io/name")
            .map(String::as_str),
        Some(AGENT),
        "the selector matches the agent's pods"
    );
    let ports: Vec<(Option<&str>, Option<&IntOrString>)> = ingress[0]
        .ports
        .iter()
        .flatten()
        .map(|p| (p.protocol.as_deref(), p.port.as_ref()))
        .collect();
    assert_eq!(ports, [(Some("TCP"), Some(&IntOrString::Int(port)))]);
}

#[test]
fn runner_pods_accept_no_ingress_and_cannot_reach_cloud_metadata_or_private_networks() {
    let manifests = manifests();
    let runner_policies: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| {
            m.get::<NetworkPolicy>().is_some_and(|p| {
                m.namespace.as_deref() == Some(RUNNER_NAMESPACE)
                    && selects_runner_pods(p)
                    && !selects_only_warm_pods(p)
            })
        })
        .collect();
    assert!(
        !runner_policies.is_empty(),
        "no NetworkPolicy in {RUNNER_NAMESPACE} selects {}={}",
        RUNNER_LABEL.0,
        RUNNER_LABEL.1
    );
    for m in runner_policies {
        let spec = m.get::<NetworkPolicy>().unwrap().spec.as_ref().unwrap();
        let what = format!("{}: NetworkPolicy {}", m.file, m.name);
        let types: BTreeSet<&str> = spec
            .policy_types
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(
            types,
            BTreeSet::from(["Ingress", "Egress"]),
            "{what}: both directions are restricted"
        );
        assert!(
            spec.ingress.as_ref().is_none_or(Vec::is_empty),
            "{what}: nothing may connect to a runner"
        );
        let egress = spec.egress.as_deref().unwrap_or_default();
        assert!(
            !egress.is_empty(),
            "{what}: runners need DNS and the internet"
        );
        let mut excludes_metadata = false;
        for (i, rule) in egress.iter().enumerate() {
            let peers: &[NetworkPolicyPeer] = rule.to.as_deref().unwrap_or_default();
            assert!(
                !peers.is_empty(),
                "{what}: egress rule {i} has no `to`, which allows every destination"
            );
            for peer in peers {
                if let Some(block) = &peer.ip_block {
                    let reachable = reachable_forbidden_ranges(block);
                    assert!(
                        reachable.is_empty(),
                        "{what}: egress rule {i} ({}) lets runners reach {reachable:?}",
                        block.cidr
                    );
                    excludes_metadata |= block
                        .except
                        .iter()
                        .flatten()
                        .any(|e| e == "169.254.169.254/32");
                } else {
                    // A selector peer is only for cluster DNS: kube-dns in kube-system, port 53.
                    let namespace = peer
                        .namespace_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .and_then(|l| l.get("kubernetes.io/metadata.name"));
                    let pods = peer
                        .pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .and_then(|l| l.get("k8s-app"));
                    assert_eq!(
                        (namespace.map(String::as_str), pods.map(String::as_str)),
                        (Some("kube-system"), Some("kube-dns")),
                        "{what}: egress rule {i} may reach cluster pods other than DNS"
                    );
                    let ports: Vec<(Option<&str>, Option<&IntOrString>, Option<i32>)> = rule
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| (p.protocol.as_deref(), p.port.as_ref(), p.end_port))
                        .collect();
                    let dns = IntOrString::Int(53);
                    assert!(
                        ports.len() == 2
                            && ports.contains(&(Some("UDP"), Some(&dns), None))
                            && ports.contains(&(Some("TCP"), Some(&dns), None)),
                        "{what}: egress rule {i} reaches kube-dns on DNS ports only, found {ports:?}"
                    );
                }
            }
        }
        assert!(
            excludes_metadata,
            "{what}: the metadata address 169.254.169.254/32 is excepted explicitly"
        );
    }
}

#[test]
fn the_cidr_check_catches_a_missing_exception() {
    let open = IPBlock {
        cidr: "0.0.0.0/0".into(),
        except: Some(vec!["10.0.0.0/8".into()]),
    };
    let reachable = reachable_forbidden_ranges(&open);
    assert!(reachable.contains(&"169.254.169.254/32"), "{reachable:?}");
    assert!(!reachable.contains(&"10.0.0.0/8"), "{reachable:?}");
    assert!(!reachable.iter().any(|r| r.contains(':')), "{reachable:?}");
    let public = IPBlock {
        cidr: "203.0.113.0/24".into(),
        except: None,
    };
    assert!(reachable_forbidden_ranges(&public).is_empty());
}

#[test]
fn the_runner_namespace_enforces_the_restricted_pod_security_standard() {
    let manifests = manifests();
    let namespace: &Namespace = the(&manifests, None, RUNNER_NAMESPACE);
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    for mode in ["enforce", "warn", "audit"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("restricted"),
            "{RUNNER_NAMESPACE}: pod security {mode}"
        );
    }
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce-version")
            .map(String::as_str),
        Some("latest")
    );
}

#[test]
fn every_namespaced_object_lives_in_a_namespace_the_manifests_create() {
    let manifests = manifests();
    let created: BTreeSet<&str> = manifests
        .iter()
        .filter(|m| m.get::<Namespace>().is_some())
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(created, BTreeSet::from([AGENT_NAMESPACE, RUNNER_NAMESPACE]));
    for m in &manifests {
        if let Some(ns) = &m.namespace {
            assert!(
                created.contains(ns.as_str()),
                "{}: {} {} is in {ns}, which no manifest creates",
                m.file,
                m.kind,
                m.name
            );
        }
    }
}

#[test]
fn the_gvisor_runtime_class_uses_the_runsc_handler() {
    let manifests = manifests();
    let class: &RuntimeClass = the(&manifests, None, "gvisor");
    assert_eq!(class.handler, "runsc");
    let config = agent_config(&manifests);
    assert_eq!(
        config_str(&config, "/backend/kubernetes/runtime_class"),
        "gvisor",
        "runner pods use the RuntimeClass the manifests install"
    );
}

// ---------------------------------------------------------------------------------------------
// The agent's Deployment and configuration
// ---------------------------------------------------------------------------------------------

/// The container's security context with the pod's applied where the container says nothing
/// (the fields the two share).
fn effective(container: &Container, pod: Option<&PodSecurityContext>) -> SecurityContext {
    let mut sc = container.security_context.clone().unwrap_or_default();
    if let Some(pod) = pod {
        sc.run_as_non_root = sc.run_as_non_root.or(pod.run_as_non_root);
        sc.run_as_user = sc.run_as_user.or(pod.run_as_user);
        sc.seccomp_profile = sc.seccomp_profile.or_else(|| pod.seccomp_profile.clone());
    }
    sc
}

#[test]
fn the_agent_deployment_runs_one_replica_recreated_with_a_restricted_security_context() {
    let manifests = manifests();
    let deployment: &Deployment = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1), "exactly one agent per cell");
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate"),
        "the old agent stops before the new one starts"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    for flag in [pod.host_network, pod.host_pid, pod.host_ipc] {
        assert_ne!(flag, Some(true), "no host namespaces");
    }
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for container in containers {
        let name = &container.name;
        let sc = effective(container, pod.security_context.as_ref());
        assert_eq!(sc.run_as_non_root, Some(true), "{name}: runAsNonRoot");
        assert_ne!(sc.run_as_user, Some(0), "{name}: not root");
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{name}: allowPrivilegeEscalation"
        );
        assert_ne!(sc.privileged, Some(true), "{name}: privileged");
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{name}: read-only root"
        );
        let capabilities = sc.capabilities.clone().unwrap_or_default();
        assert_eq!(
            capabilities.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "{name}: drops all capabilities"
        );
        assert!(
            capabilities.add.as_ref().is_none_or(Vec::is_empty),
            "{name}: adds no capability"
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault"),
            "{name}: seccomp"
        );
    }
}

#[test]
fn the_agent_reads_the_mounted_config_and_certificate_and_writes_only_its_data_dir() {
    let manifests = manifests();
    let deployment: &Deployment = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let [agent] = pod.containers.as_slice() else {
        panic!("the agent's pod has one container");
    };
    let volumes: BTreeMap<&str, _> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    // mount path -> (volume, read-only)
    let mounts: BTreeMap<&str, (&str, bool)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.as_str(),
                (m.name.as_str(), m.read_only == Some(true)),
            )
        })
        .collect();

    // --config names agent.yaml in the ConfigMap's mount.
    let args = agent.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("cell-agent"));
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("the agent is given --config");
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    assert_eq!(file, "agent.yaml");
    let (volume, read_only) = mounts
        .get(dir)
        .unwrap_or_else(|| panic!("--config {config_path}: nothing is mounted at {dir}"));
    assert!(read_only, "the configuration is mounted read-only");
    let config_map = volumes[volume]
        .config_map
        .as_ref()
        .expect("the config mount is a ConfigMap");
    assert_eq!(config_map.name, AGENT);
    assert!(
        config_map.items.is_none(),
        "the key agent.yaml becomes the file agent.yaml"
    );

    let config = agent_config(&manifests);

    // The certificate, key and CA the config names are in the TLS secret's read-only mount.
    for key in ["cert", "key", "ca"] {
        let path = config_str(&config, &format!("/auth/tls/{key}"));
        let (dir, file) = path.rsplit_once('/').unwrap();
        let (volume, read_only) = mounts
            .get(dir)
            .unwrap_or_else(|| panic!("auth.tls.{key} {path}: nothing is mounted at {dir}"));
        assert!(read_only, "{dir} is mounted read-only");
        let secret = volumes[volume]
            .secret
            .as_ref()
            .expect("the TLS mount is a Secret");
        assert_eq!(secret.secret_name.as_deref(), Some("flotilla-agent-tls"));
        let in_secret = secret.items.iter().flatten().any(|item| item.path == file);
        assert!(
            in_secret,
            "auth.tls.{key}: the secret's items provide {file}"
        );
    }

    // data_dir is the writable emptyDir.
    let data_dir = config_str(&config, "/data_dir");
    let (volume, read_only) = mounts
        .get(data_dir)
        .unwrap_or_else(|| panic!("data_dir {data_dir}: nothing is mounted there"));
    assert!(!read_only, "data_dir is writable");
    assert!(
        volumes[volume].empty_dir.is_some(),
        "data_dir is an emptyDir"
    );

    // Runners take the binary from the agent's own image.
    assert_eq!(
        Some(config_str(&config, "/backend/kubernetes/runner_image")),
        agent.image.as_deref(),
        "runner_image is the agent's image (same version)"
    );
}

#[test]
fn the_agent_config_targets_the_runner_namespace_the_role_and_network_policy_cover() {
    let manifests = manifests();
    let config = agent_config(&manifests);
    let namespace = config_str(&config, "/backend/kubernetes/namespace");
    let role_namespaces: Vec<Option<&str>> = all::<Role>(&manifests)
        .map(|r| r.metadata.namespace.as_deref())
        .collect();
    assert_eq!(role_namespaces, [Some(namespace)], "the agent's Role");
    let policy_namespaces: BTreeSet<Option<&str>> = all::<NetworkPolicy>(&manifests)
        .filter(|p| selects_runner_pods(p))
        .map(|p| p.metadata.namespace.as_deref())
        .collect();
    assert_eq!(
        policy_namespaces,
        BTreeSet::from([Some(namespace)]),
        "the runner NetworkPolicy"
    );
    assert_eq!(namespace, RUNNER_NAMESPACE);
}

#[test]
fn the_agent_config_is_a_file_the_agent_accepts_with_the_kubernetes_backend() {
    let manifests = manifests();
    let config_map: &ConfigMap = the(&manifests, Some(AGENT_NAMESPACE), AGENT);
    let text = &config_map.data.as_ref().expect("the ConfigMap has data")["agent.yaml"];
    // The agent's own reader: unknown fields refused, values validated (cell id, pools,
    // federators, the Kubernetes section), as `flotilla cell-agent --config` does at start.
    let file = AgentFile::from_yaml("agent-config.yaml: agent.yaml", text)
        .unwrap_or_else(|e| panic!("{e}"));
    let BackendFile::Kubernetes(kube) = &file.backend else {
        panic!(
            "a cell in Kubernetes uses the kubernetes backend, found {:?}",
            file.backend
        );
    };
    assert_eq!(kube.namespace, RUNNER_NAMESPACE);
    assert_eq!(kube.runtime_class.as_deref(), Some("gvisor"));
    assert!(
        matches!(file.auth, AuthFile::Tls { .. }),
        "a production cell authenticates with mutual TLS"
    );
}
