//! `haven simulate` and `haven import` from the command line: the README's example, CIB
//! import round trips, and clear refusals of malformed input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn haven(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("haven runs")
}

fn summary(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| *l != "Transition Summary:")
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn readme_example_fences_then_recovers_on_the_survivor() {
    let out = haven(&[
        "simulate",
        "--config",
        "examples/two-node.toml",
        "--state",
        "examples/two-node-state.json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = summary(&out);
    assert_eq!(
        lines[0],
        "* Fence (reboot) m1 'peer is no longer part of the cluster'"
    );
    assert!(
        lines.contains(&"* Promote disk0:1 ( Unpromoted -> Promoted m2 )".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"* Move vm1 ( m1 -> m2 )".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"* Move ip ( m1 -> m2 )".to_string()),
        "{lines:?}"
    );
}

#[test]
fn json_plan_orders_the_fence_before_the_start() {
    let out = haven(&[
        "simulate",
        "--config",
        "examples/two-node.toml",
        "--state",
        "examples/two-node-state.json",
        "--json",
    ]);
    assert!(out.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let actions = plan["actions"].as_array().expect("actions");
    let fence = actions
        .iter()
        .position(|a| a["action"] == "fence")
        .expect("a fence");
    let start = actions
        .iter()
        .position(|a| a["action"] == "start" && a["resource"] == "vm1")
        .expect("vm1 starts");
    let edges = plan["edges"].as_array().expect("edges");
    assert!(
        edges.iter().any(|e| e[0] == fence && e[1] == start),
        "fence precedes vm1's start"
    );
}

#[test]
fn imported_cib_simulates_the_same_as_the_cib_itself() {
    let cib = repo().join("../shared/conformance/pacemaker/cases/829.xml");
    let cib = cib.to_str().expect("utf-8 path");
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = tmp.path().join("c.toml");
    let s = tmp.path().join("s.json");
    let out = haven(&[
        "import",
        "pacemaker",
        cib,
        "--out-config",
        c.to_str().expect("utf-8"),
        "--out-state",
        s.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let direct = haven(&["simulate", "--cib", cib]);
    let via = haven(&[
        "simulate",
        "--config",
        c.to_str().expect("utf-8"),
        "--state",
        s.to_str().expect("utf-8"),
    ]);
    assert!(direct.status.success() && via.status.success());
    assert!(!summary(&direct).is_empty());
    assert_eq!(summary(&direct), summary(&via));
}

#[test]
fn malformed_inputs_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad_xml = tmp.path().join("bad.xml");
    std::fs::write(&bad_xml, "<cib><configuration><nodes></cib>").expect("write");
    let out = haven(&["simulate", "--cib", bad_xml.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.xml") && err.contains("not well-formed XML"),
        "{err}"
    );

    let bad_toml = tmp.path().join("bad.toml");
    std::fs::write(&bad_toml, "[[nodes]]\nname = \"a\"\n[[constraints.location]]\nid = \"l\"\nrsc = \"ghost\"\nnode = \"a\"\nscore = 1\n").expect("write");
    let state = repo().join("examples/two-node-state.json");
    let out = haven(&[
        "simulate",
        "--config",
        bad_toml.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml: constraints.location[0].rsc: unknown resource `ghost`"),
        "{err}"
    );
}

/// Draining the example's m1 moves the VM live: the volume is promoted on m2 first
/// (its dual-primary window), the VM migrates, the IP follows, m1's replica stops last.
#[test]
fn draining_the_examples_home_node_migrates_the_vm_live() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(repo().join("examples/two-node.toml")).expect("example");
    let drained = text.replacen(
        "name = \"m1\"\naddrs = [\"127.0.0.11\"]",
        "name = \"m1\"\naddrs = [\"127.0.0.11\"]\nstandby = true",
        1,
    );
    assert_ne!(drained, text, "the example's m1 entry changed shape");
    let config = tmp.path().join("drained.toml");
    std::fs::write(&config, drained).expect("write config");
    let state = tmp.path().join("healthy.json");
    std::fs::write(
        &state,
        r#"{ "have_quorum": true,
  "nodes": { "m1": { "state": "online", "attributes": { "master-disk0": "10" } },
             "m2": { "state": "online", "attributes": { "master-disk0": "10" } } },
  "resources": { "disk0": { "m1": { "role": "Promoted" }, "m2": { "role": "Unpromoted" } },
                 "ip": { "m1": { "role": "Started" } }, "vm1": { "m1": { "role": "Started" } } } }"#,
    )
    .expect("write state");
    let out = haven(&[
        "simulate",
        "--config",
        config.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = summary(&out);
    for want in [
        "* Migrate vm1 ( m1 -> m2 )",
        "* Promote disk0:1 ( Unpromoted -> Promoted m2 )",
        "* Move ip ( m1 -> m2 )",
    ] {
        assert!(
            lines.contains(&want.to_string()),
            "{want} missing: {lines:?}"
        );
    }
}

/// `haven resource move vm1 m2` on the example (vm1 has home = m1 with failback): the
/// operator's cli-prefer constraint outranks the failback home while it stands, and
/// once `resource clear` removes it, failback brings the VM home.
#[test]
fn a_move_outranks_the_failback_home_until_it_is_cleared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(repo().join("examples/two-node.toml")).expect("example");
    assert!(
        text.contains("home = \"m1\"\nfailback = true"),
        "the example's vm1 no longer has a failback home"
    );
    let plain = tmp.path().join("plain.toml");
    std::fs::write(&plain, &text).expect("write config");
    let moved = tmp.path().join("moved.toml");
    std::fs::write(
        &moved,
        format!(
            "{text}\n[[constraints.location]]\nid = \"cli-prefer-vm1\"\nrsc = \"vm1\"\nnode = \"m2\"\nscore = \"INFINITY\"\n"
        ),
    )
    .expect("write config");
    let state_on = |node: &str, other: &str| {
        let path = tmp.path().join(format!("on-{node}.json"));
        std::fs::write(
            &path,
            format!(
                r#"{{ "have_quorum": true,
  "nodes": {{ "m1": {{ "state": "online", "attributes": {{ "master-disk0": "10" }} }},
             "m2": {{ "state": "online", "attributes": {{ "master-disk0": "10" }} }} }},
  "resources": {{ "disk0": {{ "{node}": {{ "role": "Promoted" }}, "{other}": {{ "role": "Unpromoted" }} }},
                 "ip": {{ "{node}": {{ "role": "Started" }} }}, "vm1": {{ "{node}": {{ "role": "Started" }} }} }} }}"#
            ),
        )
        .expect("write state");
        path
    };
    let (at_home, away) = (state_on("m1", "m2"), state_on("m2", "m1"));
    let run = |config: &std::path::Path, state: &std::path::Path| {
        let out = haven(&[
            "simulate",
            "--config",
            config.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        summary(&out)
    };

    let lines = run(&moved, &at_home);
    for want in [
        "* Migrate vm1 ( m1 -> m2 )",
        "* Promote disk0:1 ( Unpromoted -> Promoted m2 )",
        "* Move ip ( m1 -> m2 )",
    ] {
        assert!(
            lines.contains(&want.to_string()),
            "move: {want} missing: {lines:?}"
        );
    }
    assert!(
        run(&moved, &away).iter().all(|l| l.trim().is_empty()),
        "while the move stands the VM stays on m2"
    );
    let lines = run(&plain, &away);
    assert!(
        lines.contains(&"* Migrate vm1 ( m2 -> m1 )".to_string()),
        "cleared: failback takes it home: {lines:?}"
    );
}
