//! Real agents: Debian's resource-agents `Dummy`, an LSB script, supervised processes.

use std::time::Duration;

use haven_exec::{AgentClass, AgentSpec, Op, OpCode, run_op};

const T: Duration = Duration::from_secs(20);
const PROBE: Op = Op::Monitor {
    interval: Duration::ZERO,
};

fn need(path: &str, package: &str) {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: install the Debian package `{package}` (apt-get install -y --no-install-recommends {package})"
    );
}

#[tokio::test]
async fn ocf_dummy_lifecycle() {
    need("/usr/lib/ocf/resource.d/heartbeat/Dummy", "resource-agents");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("dummy.state");
    let spec = AgentSpec::new("dummy1", "ocf:heartbeat:Dummy".parse().unwrap(), dir.path())
        .param("state", state.display().to_string());

    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    let r = run_op(&spec, Op::Start, T).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(state.exists(), "Dummy start must create its state file");
    assert_eq!(
        run_op(
            &spec,
            Op::Monitor {
                interval: Duration::from_secs(10)
            },
            T
        )
        .await
        .code,
        OpCode::Success
    );
    assert_eq!(
        run_op(&spec, Op::Start, T).await.code,
        OpCode::Success,
        "start is idempotent"
    );
    assert_eq!(run_op(&spec, Op::Stop, T).await.code, OpCode::Success);
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    assert_eq!(
        run_op(&spec, Op::Stop, T).await.code,
        OpCode::Success,
        "stop is idempotent"
    );
    assert_eq!(
        run_op(&spec, Op::ValidateAll, T).await.code,
        OpCode::Success
    );

    let md = run_op(&spec, Op::MetaData, T).await;
    assert_eq!(md.code, OpCode::Success);
    assert!(md.stdout.contains("<resource-agent") && md.stdout.contains("name=\"Dummy\""));
}

#[tokio::test]
async fn ocf_missing_agent_is_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    let spec = AgentSpec::new(
        "x",
        "ocf:heartbeat:NoSuchAgent".parse().unwrap(),
        dir.path(),
    );
    let r = run_op(&spec, Op::Start, T).await;
    assert_eq!(r.code, OpCode::NotInstalled);
    assert!(r.notes[0].contains("NoSuchAgent"), "{:?}", r.notes);
}

#[tokio::test]
async fn ocf_agent_that_hangs_is_killed_at_the_timeout() {
    // A real OCF agent layout under a private OCF root, whose start hangs in a child.
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("resource.d/test");
    std::fs::create_dir_all(&agents).unwrap();
    let pidfile = dir.path().join("child.pid");
    let script = format!(
        "#!/bin/sh\nsleep 300 &\necho $! > {}\nwait\n",
        pidfile.display()
    );
    let agent = agents.join("Hang");
    std::fs::write(&agent, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = AgentSpec::new("h", "ocf:test:Hang".parse().unwrap(), dir.path());
    spec.ocf_root = dir.path().to_path_buf();
    let r = run_op(&spec, Op::Start, Duration::from_millis(700)).await;
    assert_eq!(r.code, OpCode::Timeout);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_dead(pid),
        "the agent's child {pid} survived the timeout"
    );
}

#[tokio::test]
async fn lsb_script_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("running");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n start) touch {f} ;;\n stop) rm -f {f} ;;\n status) [ -e {f} ] && exit 0 || exit 3 ;;\n *) exit 3 ;;\nesac\n",
        f = flag.display()
    );
    std::fs::write(dir.path().join("svc"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("svc"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut spec = AgentSpec::new("svc", AgentClass::Lsb { name: "svc".into() }, dir.path());
    spec.init_dir = dir.path().to_path_buf();
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    assert_eq!(run_op(&spec, Op::Start, T).await.code, OpCode::Success);
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::Success);
    assert_eq!(run_op(&spec, Op::Stop, T).await.code, OpCode::Success);
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    assert_eq!(
        run_op(
            &spec,
            Op::Promote {
                fenced: vec![],
                migration_source: None
            },
            T
        )
        .await
        .code,
        OpCode::Unimplemented
    );
}

fn wait_dead(pid: i32) -> bool {
    (0..500).any(|_| {
        let alive = haven_exec::pidfile::is_alive(pid);
        if alive {
            std::thread::sleep(Duration::from_millis(10));
        }
        !alive
    })
}

fn process_spec(dir: &std::path::Path, command: &str) -> AgentSpec {
    AgentSpec::new("p1", AgentClass::Process, dir).param("command", command)
}

#[tokio::test]
async fn process_start_monitor_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spec = process_spec(dir.path(), "sleep 300");
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    let r = run_op(&spec, Op::Start, T).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    let t = haven_exec::pidfile::read(&dir.path().join("p1.pid"))
        .unwrap()
        .unwrap();
    assert!(t.alive());
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::Success);
    assert_eq!(run_op(&spec, Op::Start, T).await.code, OpCode::Success);
    let again = haven_exec::pidfile::read(&dir.path().join("p1.pid"))
        .unwrap()
        .unwrap();
    assert_eq!(again, t, "a second start must not start a second copy");
    let r = run_op(&spec, Op::Stop, T).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(r.notes.is_empty(), "sleep obeys SIGTERM: {:?}", r.notes);
    assert!(wait_dead(t.pid));
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    assert_eq!(run_op(&spec, Op::Stop, T).await.code, OpCode::Success);
}

#[tokio::test]
async fn process_found_again_by_a_restarted_agent() {
    let dir = tempfile::tempdir().unwrap();
    let spec = process_spec(dir.path(), "sleep 300");
    // Started from one runtime (one agent incarnation) ...
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            assert_eq!(
                rt.block_on(run_op(&spec, Op::Start, T)).code,
                OpCode::Success
            );
        });
    });
    // ... monitored and stopped by another, knowing only the state dir.
    let fresh = process_spec(dir.path(), "sleep 300");
    assert_eq!(run_op(&fresh, PROBE, T).await.code, OpCode::Success);
    assert_eq!(run_op(&fresh, Op::Stop, T).await.code, OpCode::Success);
    assert_eq!(run_op(&fresh, PROBE, T).await.code, OpCode::NotRunning);
}

#[tokio::test]
async fn process_that_ignores_sigterm_is_killed_with_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let child_pid = dir.path().join("child.pid");
    let cmd = format!(
        "/bin/sh -c 'trap \"\" TERM; sleep 300 & echo $! > {}; while :; do sleep 1; done'",
        child_pid.display()
    );
    let spec = process_spec(dir.path(), &cmd);
    assert_eq!(run_op(&spec, Op::Start, T).await.code, OpCode::Success);
    let pid = (0..500)
        .find_map(|_| {
            let p = std::fs::read_to_string(&child_pid)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if p.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            p
        })
        .expect("the supervised shell never wrote its child's pid");
    let r = run_op(&spec, Op::Stop, Duration::from_secs(1)).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("SIGKILL")),
        "{:?}",
        r.notes
    );
    assert!(wait_dead(pid), "the group member {pid} survived");
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
}

#[tokio::test]
async fn process_that_exits_at_once_fails_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let spec = process_spec(dir.path(), "/nonexistent/daemon --flag");
    let r = run_op(&spec, Op::Start, T).await;
    assert_eq!(r.code, OpCode::Error, "{r:?}");
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    let missing = AgentSpec::new("p2", AgentClass::Process, dir.path());
    let r = run_op(&missing, Op::Start, T).await;
    assert_eq!(r.code, OpCode::NotConfigured);
    assert!(r.notes[0].contains("`command`"), "{:?}", r.notes);
}

/// A network namespace this test owns; removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test needs root (it creates a network namespace); CI runs it as root"
        );
        let name = format!("haven-exec-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&[
            "-n", &ns.0, "link", "add", "hv0", "type", "veth", "peer", "name", "hv1",
        ]);
        ip(&["-n", &ns.0, "addr", "add", "10.231.0.1/24", "dev", "hv0"]);
        for dev in ["lo", "hv0", "hv1"] {
            ip(&["-n", &ns.0, "link", "set", dev, "up"]);
        }
        ns
    }

    fn addresses(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.0, "-4", "addr", "show", "dev", "hv0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 `ip` is needed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn ocf_ipaddr2_in_a_network_namespace() {
    need(
        "/usr/lib/ocf/resource.d/heartbeat/IPaddr2",
        "resource-agents",
    );
    let ns = Netns::create();
    let dir = tempfile::tempdir().unwrap();
    let spec = AgentSpec::new("vip", "ocf:heartbeat:IPaddr2".parse().unwrap(), dir.path())
        .param("ip", "10.231.0.10")
        .param("cidr_netmask", "24")
        .param("nic", "hv0")
        .param("network_namespace", ns.0.clone());
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
    let r = run_op(&spec, Op::Start, T).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        ns.addresses().contains("10.231.0.10/24"),
        "{}",
        ns.addresses()
    );
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::Success);
    let r = run_op(&spec, Op::Stop, T).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        !ns.addresses().contains("10.231.0.10"),
        "{}",
        ns.addresses()
    );
    assert_eq!(run_op(&spec, PROBE, T).await.code, OpCode::NotRunning);
}
