//! `flotilla federator` replicas as real processes, inspected and changed with `flotilla raft`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::Duration;

use flotilla_tests::flotilla;

/// A replica process, killed when dropped.
struct Replica {
    id: u64,
    addr: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn spawn(id: u64, addr: &str, dir: &Path, how: &[&str]) -> Replica {
    let child = flotilla()
        .args(["federator", "--node-id", &id.to_string(), "--listen", addr])
        .args(["--http", &free_addr()])
        .arg("--data-dir")
        .arg(dir.join(format!("r{id}")))
        .args(how)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Replica {
        id,
        addr: addr.to_owned(),
        child,
    }
}

fn status(addr: &str) -> Option<serde_json::Value> {
    let out = flotilla()
        .args(["raft", "status", "--json", "--addr", addr])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Polls `addr` until `check` holds, for up to `secs` seconds.
fn wait_for(
    addr: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..secs * 10 {
        if let Some(s) = status(addr).filter(|s| check(s)) {
            return s;
        }
        sleep(Duration::from_millis(100));
    }
    panic!(
        "{addr}: {what} did not happen; last status {:?}",
        status(addr)
    );
}

fn voters(s: &serde_json::Value) -> Vec<u64> {
    s["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn three_replicas_form_a_cluster_survive_losing_the_leader_and_admit_a_fourth() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let members = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut replicas: Vec<Replica> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            spawn(
                i as u64 + 1,
                a,
                dir.path(),
                &["--initial-members", &members],
            )
        })
        .collect();

    let s = wait_for(&addrs[1], 20, "a leader", |s| s["leader_id"].is_u64());
    assert_eq!(voters(&s), vec![1, 2, 3]);
    let leader = s["leader_id"].as_u64().unwrap();

    // SIGKILL the leader: the other two elect a new one.
    replicas.retain(|r| r.id != leader);
    let survivor = replicas[0].addr.clone();
    let s = wait_for(&survivor, 10, "a new leader", |s| {
        s["leader_id"].as_u64().is_some_and(|l| l != leader)
    });
    assert_eq!(s["term"].as_u64().map(|t| t >= 2), Some(true));

    // A fourth replica joins through a follower and becomes a voter.
    let fourth = free_addr();
    replicas.push(spawn(4, &fourth, dir.path(), &["--join", &survivor]));
    let s = wait_for(&survivor, 30, "node 4 to become a voter", |s| {
        voters(s).contains(&4)
    });
    assert_eq!(voters(&s).len(), 4);
}

#[test]
fn a_new_replica_without_a_cluster_to_join_explains_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla()
        .args(["federator", "--node-id", "1", "--listen", &free_addr()])
        .arg("--data-dir")
        .arg(dir.path().join("fresh"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pass --bootstrap, --initial-members or --join"),
        "{err}"
    );
}

#[test]
fn an_initial_member_list_without_this_replica_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla()
        .args(["federator", "--node-id", "9", "--listen", "127.0.0.1:1"])
        .args(["--initial-members", "1=127.0.0.1:2,2=127.0.0.1:3"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not list this replica (node 9)"), "{err}");
}
