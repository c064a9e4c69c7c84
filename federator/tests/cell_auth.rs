//! Who may open a cell session: mutual TLS with the cell id in the client certificate, the
//! bootstrap token, and the leader hint a follower gives. Real gRPC on loopback, certificates
//! made by rcgen at test time.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use flotilla_cell_agent::backend::{LocalBackend, LocalConfig};
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_consensus::TlsConfig;
use flotilla_core::ids::CellId;
use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::repo::{RepoConfig, RoutedSource};
use flotilla_federator::service::{Deps, Federator, Listeners};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn leaf(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

fn agent(cell: &str, federator: String, auth: AgentAuth, dir: &std::path::Path) -> Agent {
    let backend = LocalBackend::new(LocalConfig::new(dir.join(cell))).unwrap();
    let mut config = AgentConfig::new(
        CellId::new(cell).unwrap(),
        vec![federator],
        auth,
        dir.join("logs"),
    );
    config.max_backoff = Duration::from_millis(200);
    Agent::start(config, Arc::new(backend))
}

async fn connected(fed: &Federator, cell: &str, within: Duration) -> bool {
    let id = CellId::new(cell).unwrap();
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if fed.cells().connected().contains(&id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_certificate_admits_only_the_cell_it_names() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cells and federators");
    let stranger = Ca::new("someone else");
    let (server_cert, server_key) = ca.leaf(&["127.0.0.1"]);
    let cell_tls =
        TlsConfig::from_pem(server_cert, server_key, ca.issuer.pem().into_bytes()).unwrap();
    let mut config = FederatorConfig::new(1, dir.path().join("fed"));
    config.cluster.bootstrap = true;
    let raft = TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.raft_listen = raft.local_addr().unwrap();
    let fed = Federator::start(
        config,
        Listeners {
            raft,
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            cells: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        },
        Deps {
            clock: Arc::new(SystemClock),
            repos: Arc::new(
                RoutedSource::new(dir.path().join("repos"), &RepoConfig::default()).unwrap(),
            ),
            tls: None,
            cell_tls: Some(cell_tls),
        },
    )
    .await
    .unwrap();
    fed.node()
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let addr = fed.cells_addr().unwrap().to_string();
    // Agents trust the federators' CA; their own certificate comes from `issuer`.
    let tls = |issuer: &Ca, names: &[&str]| {
        let (cert, key) = issuer.leaf(names);
        AgentAuth::Tls {
            cert_chain_pem: cert,
            private_key_pem: key,
            ca_pem: ca.issuer.pem().into_bytes(),
            server_name: None,
        }
    };

    // The right certificate: admitted and registered.
    let good = agent("eu-1a", addr.clone(), tls(&ca, &["eu-1a"]), dir.path());
    assert!(connected(&fed, "eu-1a", Duration::from_secs(10)).await);

    // A certificate for another cell, from the right CA: refused.
    let impostor = agent("eu-1b", addr.clone(), tls(&ca, &["eu-1a"]), dir.path());
    // A certificate from another CA: the handshake fails.
    let foreign = agent(
        "eu-1c",
        addr.clone(),
        tls(&stranger, &["eu-1c"]),
        dir.path(),
    );
    // No certificate, and no bootstrap token configured: refused.
    let tokened = agent(
        "eu-1d",
        addr.clone(),
        AgentAuth::Token("guess".into()),
        dir.path(),
    );
    for cell in ["eu-1b", "eu-1c", "eu-1d"] {
        assert!(
            !connected(&fed, cell, Duration::from_secs(2)).await,
            "{cell} was admitted"
        );
    }
    let registered: Vec<String> = fed
        .node()
        .read(|m| m.state().cells.keys().map(|c| c.to_string()).collect());
    assert_eq!(registered, ["eu-1a"]);
    assert!(good.stats().sessions.load(Ordering::Relaxed) >= 1);
    assert_eq!(impostor.stats().sessions.load(Ordering::Relaxed), 0);

    for a in [good, impostor, foreign, tokened] {
        a.shutdown().await;
    }
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dials_a_follower_is_sent_to_the_leader() {
    let c = Cluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let leader = c.leader_index().unwrap();
    let follower = (leader + 1) % 3;
    let a = agent(
        "cell-1",
        c.cells_addr(follower),
        AgentAuth::Token(CELL_TOKEN.into()),
        dir.path(),
    );
    assert!(connected(c.fed(leader), "cell-1", Duration::from_secs(10)).await);
    assert!(
        c.fed(follower).cells().connected().is_empty(),
        "a follower holds no sessions"
    );
    // A wrong token is refused even with the right cell id.
    let b = agent(
        "cell-2",
        c.cells_addr(leader),
        AgentAuth::Token("not-the-token".into()),
        dir.path(),
    );
    assert!(!connected(c.fed(leader), "cell-2", Duration::from_secs(2)).await);
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}
