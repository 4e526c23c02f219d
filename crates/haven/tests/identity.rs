//! Each node's certificate speaks for that node only: a 3-node lab of real daemons,
//! and requests made with one node's certificate that claim to come from another.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Lab, lock, ok};
use haven_net::{CertRole, PeerIdentity, RpcClient, RpcError, TlsIdentity};
use serde_json::{Value, json};

fn node_identity(lab: &Lab, node: &str) -> TlsIdentity {
    let dir = lab.dir.join(node);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("node file");
    TlsIdentity::from_pem(
        &read("ca.pem"),
        &read("node.pem"),
        &read("node-key.pem"),
        node,
    )
    .expect("node identity")
}

fn first_addr(lab: &Lab, node: &str) -> String {
    let text = std::fs::read_to_string(lab.dir.join(node).join("node.toml")).expect("node.toml");
    let t: toml::Table = toml::from_str(&text).expect("node.toml parses");
    t["addrs"][0].as_str().expect("an address").to_string()
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&ok(lab.run(&["status", "--json"]))).expect("status JSON")
}

/// A refusal (403) whose message names both the claim and the real sender.
fn assert_refused(r: Result<Value, RpcError>, what: &str, claimed: &str, real: &str) {
    match r {
        Err(RpcError::Remote {
            status, message, ..
        }) => {
            assert_eq!(status, 403, "{what}: {message}");
            assert!(
                message.contains(claimed) && message.contains(real),
                "{what}: the refusal should name {claimed} and {real}: {message}"
            );
        }
        other => panic!("{what} was not refused: {other:?}"),
    }
}

#[test]
fn a_node_certificate_cannot_speak_for_another_node() {
    let _one = lock();
    let lab = Lab::up();
    let s = status(&lab);
    let leader = s["leader"].as_str().expect("a leader").to_string();
    let id_of = |n: &str| -> u64 {
        s["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|x| x["name"] == n))
            .and_then(|x| x["id"].as_u64())
            .expect("node id")
    };
    // The impersonator, the node it pretends to be, and where it sends.
    let others: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let (liar, target) = (others[0], others[1]);
    let victim = leader.as_str();
    assert_eq!(
        node_identity(&lab, liar).identity(),
        Some(PeerIdentity::new("lab", CertRole::Node, liar)),
        "the lab's node certificate names its node"
    );
    let rpc = RpcClient::new(
        node_identity(&lab, liar)
            .client_config()
            .expect("client TLS"),
        Duration::from_secs(10),
    );
    let target_addr = first_addr(&lab, target);
    let leader_addr = first_addr(&lab, victim);
    let real = format!("node {liar:?}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Its own heartbeat is answered; one claiming to be the leader is not.
        let own: Value = rpc
            .call(&target_addr, "/hb", &json!({"from": liar, "link": "link0"}))
            .await
            .expect("a node's own heartbeat is accepted");
        assert_eq!(own["name"], target);
        let r = rpc
            .call(
                &target_addr,
                "/hb",
                &json!({"from": victim, "link": "link0"}),
            )
            .await;
        assert_refused(
            r,
            "a heartbeat for another node",
            &format!("{victim:?}"),
            &real,
        );

        // An operation result reported for another node.
        let report = json!({"node": victim, "report": haven_ha::OpReport {
            seq: Some(1),
            resource: "web".into(),
            op: haven_ha::OpKind::Monitor,
            outcome: haven_ha::OpOutcome::NotRunning,
            at: haven_ha::time::Time::from_millis(0),
        }});
        let r = rpc.call(&leader_addr, "/ha/report", &report).await;
        assert_refused(
            r,
            "a report for another node",
            &format!("{victim:?}"),
            &real,
        );

        // A fence result claiming another executor.
        let done = json!({"token": 1, "victim": target, "device": "power",
            "executor": victim, "ok": true, "detail": "forged"});
        let r = rpc.call(&leader_addr, "/ha/fence-done", &done).await;
        assert_refused(
            r,
            "a fence result for another executor",
            &format!("{victim:?}"),
            &real,
        );

        // A Raft vote request in the leader's name (its node id).
        let vote = openraft::raft::VoteRequest::<u64>::new(
            openraft::Vote::new(1_000, id_of(victim)),
            None,
        );
        let r = rpc.call(&target_addr, "/raft/vote", &vote).await;
        assert_refused(
            r,
            "a Raft vote in another node's name",
            &format!("node id {}", id_of(victim)),
            &real,
        );

        // Promotion of another node.
        let r = rpc
            .call(&target_addr, "/api/promote", &json!({"id": id_of(victim)}))
            .await;
        assert_refused(r, "promoting another node", &format!("{victim:?}"), &real);

        // Orders to run an operation come from the leader only.
        let op = haven_ha::OpRequest {
            seq: 1,
            resource: "web".into(),
            op: haven_ha::OpKind::Stop,
            timeout: Duration::from_secs(10),
            monitor_interval: None,
            monitor_timeout: Duration::from_secs(10),
            peer: None,
            fenced: Vec::new(),
        };
        let r = rpc.call(&target_addr, "/ha/op", &op).await;
        assert_refused(
            r,
            "an operation order from a follower",
            &format!("{victim:?}"),
            &real,
        );

        // Operator endpoints want an operator's (client) certificate.
        let r = rpc
            .call(
                &target_addr,
                "/api/config/apply",
                &json!({"based_on": 1, "text": ""}),
            )
            .await;
        assert_refused(
            r,
            "config apply with a node certificate",
            "for operators",
            &real,
        );
    });

    // The refusal is in the target's log, with both names.
    let log = std::fs::read_to_string(lab.dir.join(target).join("daemon.log")).expect("log");
    assert!(
        log.lines().any(|l| l.contains("refused /hb")
            && l.contains(&real)
            && l.contains(&format!("{victim:?}"))),
        "the refused heartbeat is not logged:\n{log}"
    );

    // The operator's client certificate runs status and config apply.
    let show = ok(lab.run(&["config", "show"]));
    let version: u64 = show
        .lines()
        .find_map(|l| l.strip_prefix("# haven-config-version: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("version line");
    let file = lab.dir.join("same.toml");
    std::fs::write(&file, &show).expect("write config");
    ok(lab.run(&[
        "config",
        "apply",
        file.to_str().expect("utf-8"),
        "--based-on",
        &version.to_string(),
    ]));
    assert_eq!(status(&lab)["config_version"].as_u64(), Some(version + 1));
    // The cluster is whole: the refusals changed nothing it believes.
    let s = status(&lab);
    assert_eq!(s["quorate"], true, "{s}");
    assert!(
        s["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["state"] == "online"),
        "{s}"
    );
}

fn join(lab: &Lab, dir: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    let token = ok(lab.run(&["cluster", "join-token"])).trim().to_string();
    join_with(lab, dir, name, &token, extra)
}

fn join_with(
    lab: &Lab,
    dir: &Path,
    name: &str,
    token: &str,
    extra: &[&str],
) -> std::process::Output {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = l.local_addr().expect("address").to_string();
    drop(l);
    let seed = first_addr(lab, "n1");
    let mut args = vec![
        "cluster",
        "join",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--name",
        name,
        "--addr",
        &addr,
    ];
    args.extend_from_slice(extra);
    args.push(&seed);
    args.push(token);
    common::haven(&args, None)
}

fn issued_identity(dir: &Path) -> Option<PeerIdentity> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("joined node file");
    TlsIdentity::from_pem(
        &read("ca.pem"),
        &read("node.pem"),
        &read("node-key.pem"),
        "joined",
    )
    .expect("joined identity")
    .identity()
}

#[test]
fn a_join_issues_a_certificate_for_its_name_and_never_a_members_name_twice() {
    let _one = lock();
    let lab = Lab::up();
    let tmp = tempfile::tempdir().expect("tempdir");

    // n2 is a member: no second certificate for it, and the token is not spent.
    let token = ok(lab.run(&["cluster", "join-token"])).trim().to_string();
    let out = join_with(&lab, &tmp.path().join("fake-n2"), "n2", &token, &[]);
    assert!(!out.status.success(), "a member's name was issued again");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"n2\" is already a member"),
        "the refusal should say n2 is a member: {err}"
    );
    assert!(!tmp.path().join("fake-n2").join("node.pem").exists());

    // The same token admits a new name, whose certificate names it.
    let n4 = tmp.path().join("n4");
    ok(join_with(&lab, &n4, "n4", &token, &["--learner"]));
    assert_eq!(
        issued_identity(&n4),
        Some(PeerIdentity::new("lab", CertRole::Node, "n4"))
    );
    // A witness's certificate says so.
    let w = tmp.path().join("w1");
    ok(join(&lab, &w, "w1", &["--witness"]));
    assert_eq!(
        issued_identity(&w),
        Some(PeerIdentity::new("lab", CertRole::Witness, "w1"))
    );
    // And the new name is now taken too.
    let out = join(&lab, &tmp.path().join("again"), "n4", &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"n4\" is already a member"),
        "{out:?}"
    );
}

/// The lines of `node`'s daemon log that contain every one of `parts`.
fn log_has(lab: &Lab, node: &str, parts: &[&str]) -> bool {
    std::fs::read_to_string(lab.dir.join(node).join("daemon.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

#[test]
fn a_node_running_with_another_nodes_certificate_is_taken_for_neither() {
    let _one = lock();
    let lab = Lab::up();
    let s = status(&lab);
    let leader = s["leader"].as_str().expect("a leader").to_string();
    // A follower restarted with a third node's certificate and key.
    let others: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let (imposter, owner) = (others[0], others[1]);
    ok(common::haven(
        &["lab", "kill", imposter, "--dir", lab.dir_str()],
        None,
    ));
    let dir = lab.dir.join(imposter);
    let saved = tempfile::tempdir().expect("tempdir");
    for f in ["node.pem", "node-key.pem"] {
        std::fs::copy(dir.join(f), saved.path().join(f)).expect("save");
        std::fs::copy(lab.dir.join(owner).join(f), dir.join(f)).expect("swap");
    }
    ok(common::haven(
        &["lab", "start", imposter, "--dir", lab.dir_str()],
        None,
    ));

    // The leader refuses its heartbeats (they claim one node, the certificate
    // another), and does not take its answers for the node it dialled.
    let claim = format!("{imposter:?}");
    let cert = format!("node {owner:?}");
    common::wait_for("the leader to refuse the imposter's heartbeat", || {
        log_has(&lab, &leader, &["refused /hb", &claim, &cert]).then_some(())
    });
    common::wait_for("the leader to refuse the imposter's answers", || {
        log_has(
            &lab,
            &leader,
            &[&format!("should be node {claim}"), &format!("is {cert}")],
        )
        .then_some(())
    });
    // Heard by no one, the imposter is lost; the node whose certificate it holds is not.
    let state = |s: &Value, n: &str| {
        s["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|x| x["name"] == n))
            .map(|x| x["state"].clone())
    };
    let s = common::wait_for("the imposter to be lost", || {
        let s = status(&lab);
        (state(&s, imposter) != Some(json!("online"))).then_some(s)
    });
    assert_eq!(state(&s, owner), Some(json!("online")), "{s}");

    // With its own certificate back, it is heard again.
    ok(common::haven(
        &["lab", "kill", imposter, "--dir", lab.dir_str()],
        None,
    ));
    for f in ["node.pem", "node-key.pem"] {
        std::fs::copy(saved.path().join(f), dir.join(f)).expect("restore");
    }
    ok(common::haven(
        &["lab", "start", imposter, "--dir", lab.dir_str()],
        None,
    ));
    ok(lab.run(&["node", "online", imposter]));
    common::wait_for("the node to be online with its own certificate", || {
        let s = status(&lab);
        s["nodes"]
            .as_array()?
            .iter()
            .all(|n| n["state"] == "online")
            .then_some(())
    });
}
