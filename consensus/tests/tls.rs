//! Mutual TLS between replicas: real gRPC over loopback with certificates made at test time by
//! rcgen (a cluster CA, a stranger's CA, and leaf certificates naming `127.0.0.1`).
//!
//! These tests wait on real replicas with deadlines, so they read the wall clock, which the
//! project otherwise bans.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_consensus::kv::{KvCommand, KvStore};
use flotilla_consensus::{Node, NodeConfig, NodeId, TlsConfig, admin_client, join_cluster};
use flotilla_proto::raft::MetricsRequest;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;

type KvNode = Arc<Node<KvStore>>;

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A replica certificate (usable as server and client) for these names, and its key.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla replica");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A replica's TLS configuration: a leaf from this CA naming 127.0.0.1, trusting `trusted`.
    fn replica(&self, trusted: &Ca) -> TlsConfig {
        let (cert, key) = self.leaf(&["127.0.0.1"]);
        TlsConfig::from_pem(cert, key, trusted.pem()).unwrap()
    }
}

fn put(key: impl Into<String>, value: &str) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

struct Replica {
    node: KvNode,
    addr: String,
    _dir: tempfile::TempDir,
}

async fn start(id: NodeId, tls: Option<TlsConfig>) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = NodeConfig::new(id, dir.path(), addr.clone());
    cfg.heartbeat_interval = Duration::from_millis(50);
    cfg.election_timeout = Duration::from_millis(250);
    cfg.tls = tls;
    let node = Node::start(cfg, listener, KvStore::default())
        .await
        .unwrap();
    Replica {
        node: Arc::new(node),
        addr,
        _dir: dir,
    }
}

/// Starts replicas 1..=n of `ca` (each trusting `ca`) and bootstraps them as one cluster.
async fn cluster(ca: &Ca, n: u64) -> BTreeMap<NodeId, Replica> {
    let mut replicas = BTreeMap::new();
    for id in 1..=n {
        replicas.insert(id, start(id, Some(ca.replica(ca))).await);
    }
    let members = replicas
        .iter()
        .map(|(id, r)| (*id, r.addr.clone()))
        .collect();
    replicas[&1].node.bootstrap(members).await.unwrap();
    replicas
}

/// Waits until the replicas agree on a leader; returns it.
async fn leader(replicas: &BTreeMap<NodeId, Replica>) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leaders: BTreeSet<Option<NodeId>> = replicas
            .values()
            .map(|r| r.node.metrics().current_leader)
            .collect();
        if let [Some(l)] = leaders.iter().collect::<Vec<_>>()[..] {
            return *l;
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the replicas have logged and applied the same last index; returns their
/// states. (Equal applied indices alone are not enough: a leader's metrics can trail its
/// answer to the last proposal, while followers have not yet heard that it committed.)
async fn converged(replicas: &BTreeMap<NodeId, Replica>) -> Vec<KvStore> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied: BTreeSet<Option<u64>> = replicas
            .values()
            .map(|r| r.node.metrics().last_applied.map(|l| l.index))
            .collect();
        let logged: BTreeSet<Option<u64>> = replicas
            .values()
            .map(|r| r.node.metrics().last_log_index)
            .collect();
        if applied.len() == 1 && applied == logged {
            return replicas
                .values()
                .map(|r| r.node.read(Clone::clone))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: applied {applied:?}, logged {logged:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(replicas: &BTreeMap<NodeId, Replica>) {
    for r in replicas.values() {
        r.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_over_mutual_tls_elect_a_leader_join_forward_and_replicate() {
    let ca = Ca::new("flotilla test cluster CA");
    // Two replicas form the cluster; the third joins through one of them over TLS.
    let mut replicas = cluster(&ca, 2).await;
    leader(&replicas).await;
    let third = start(3, Some(ca.replica(&ca))).await;
    third
        .node
        .join(&replicas[&2].addr, Duration::from_secs(10))
        .await
        .unwrap();
    replicas.insert(3, third);
    let leader_id = leader(&replicas).await;
    let voters: BTreeSet<NodeId> = replicas[&leader_id]
        .node
        .metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));

    let mut clients = Vec::new();
    for client in 0..10 {
        let leader = replicas[&leader_id].node.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..30 {
                leader
                    .propose(put(format!("k{client}-{i}"), "v"))
                    .await
                    .unwrap();
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // A follower forwards to the leader over TLS too.
    let follower = replicas
        .values()
        .find(|r| r.node.id() != leader_id)
        .unwrap();
    follower
        .node
        .propose_via_leader(put("forwarded", "y"), Duration::from_secs(5))
        .await
        .unwrap();

    let states = converged(&replicas).await;
    assert_eq!(states[0].map.len(), 301);
    assert!(states.iter().all(|s| s == &states[0]), "replicas differ");
    stop(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_with_a_certificate_from_another_ca_is_refused_while_the_others_keep_committing() {
    let ca = Ca::new("flotilla test cluster CA");
    let stranger_ca = Ca::new("some other CA");
    let replicas = cluster(&ca, 3).await;
    let leader_id = leader(&replicas).await;
    let leader = replicas[&leader_id].node.clone();
    let leader_addr = replicas[&leader_id].addr.clone();

    // The intruder trusts the cluster's CA, but its own certificate is from another CA: the
    // servers must refuse it, not the intruder refuse them.
    let intruder_tls = stranger_ca.replica(&ca);
    let intruder = start(4, Some(intruder_tls.clone())).await;

    // Its RPCs are refused...
    let refused = admin_client(&leader_addr, Some(&intruder_tls))
        .unwrap()
        .metrics(MetricsRequest {})
        .await;
    assert!(
        refused.is_err(),
        "a client with a stranger's certificate was served"
    );
    // ...while a client certificate from the cluster's CA is served, on the same address.
    let operator = ca.replica(&ca);
    admin_client(&leader_addr, Some(&operator))
        .unwrap()
        .metrics(MetricsRequest {})
        .await
        .expect("a client with the cluster's certificate is served");

    // ...so it cannot join.
    let joined = intruder
        .node
        .join(&leader_addr, Duration::from_secs(2))
        .await;
    assert!(joined.is_err(), "the intruder joined: {joined:?}");

    // Even added by mistake, it gets nothing: the leader refuses its server certificate.
    leader
        .add_learner(4, &intruder.addr, false)
        .await
        .expect("adding a non-blocking learner commits without it");
    for i in 0..100 {
        leader.propose(put(format!("k{i}"), "v")).await.unwrap();
    }
    let states = converged(&replicas).await;
    let sizes: Vec<usize> = states.iter().map(|s| s.map.len()).collect();
    assert!(
        states.iter().all(|s| s == &states[0]) && sizes[0] == 100,
        "replicas differ or lost writes: sizes {sizes:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = intruder.node.metrics();
    assert_eq!(m.last_log_index, None, "the intruder received log entries");
    assert_eq!(m.current_leader, None, "the intruder heard from the leader");
    let matched = leader
        .metrics()
        .replication
        .and_then(|r| r.get(&4).copied().flatten());
    assert_eq!(matched, None, "the leader replicated to the intruder");
    let voters: BTreeSet<NodeId> = leader
        .metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));

    intruder.node.shutdown().await;
    stop(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused_by_a_tls_server() {
    let ca = Ca::new("flotilla test cluster CA");
    let replicas = cluster(&ca, 1).await;
    leader(&replicas).await;
    let addr = &replicas[&1].addr;

    let plaintext = admin_client(addr, None)
        .unwrap()
        .metrics(MetricsRequest {})
        .await;
    assert!(plaintext.is_err(), "a plaintext client was served");
    let joined = join_cluster(addr, 2, "127.0.0.1:1", Duration::from_secs(1)).await;
    assert!(joined.is_err(), "a plaintext replica joined: {joined:?}");

    // The same server answers a client with a certificate from its CA.
    let m = admin_client(addr, Some(&ca.replica(&ca)))
        .unwrap()
        .metrics(MetricsRequest {})
        .await
        .expect("a TLS client is served")
        .into_inner();
    assert_eq!(m.voters.len(), 1);
    stop(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_is_checked_against_the_dialled_host_or_the_configured_name() {
    let ca = Ca::new("flotilla test cluster CA");
    // This replica's certificate names a DNS name only, not the address it is dialled at.
    let (cert, key) = ca.leaf(&["replica.flotilla.test"]);
    let server_tls = TlsConfig::from_pem(cert, key, ca.pem()).unwrap();
    let replica = start(1, Some(server_tls)).await;
    replica
        .node
        .bootstrap(BTreeMap::from([(1, replica.addr.clone())]))
        .await
        .unwrap();

    let client = ca.replica(&ca);
    let by_host = admin_client(&replica.addr, Some(&client))
        .unwrap()
        .metrics(MetricsRequest {})
        .await;
    assert!(
        by_host.is_err(),
        "a certificate without 127.0.0.1 was accepted for 127.0.0.1"
    );
    let named = client.with_server_name("replica.flotilla.test");
    admin_client(&replica.addr, Some(&named))
        .unwrap()
        .metrics(MetricsRequest {})
        .await
        .expect("the configured server name matches the certificate");
    replica.node.shutdown().await;
}
