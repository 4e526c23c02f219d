//! Real QEMU (TCG) guests built by scripts/build-guest: start, monitor, ACPI stop,
//! a disk counter that survives a restart, and live migration on loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use haven_exec::pidfile;
use haven_exec::{AgentClass, AgentSpec, Migration, Op, OpCode, run_op};

const BOOT: Duration = Duration::from_secs(90);
const PROBE: Op = Op::Monitor {
    interval: Duration::ZERO,
};

fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("HAVEN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file(),
        "no test guest in {}: run scripts/build-guest (or set HAVEN_GUEST_DIR)",
        dir.display()
    );
    assert!(
        which("qemu-system-x86_64"),
        "qemu-system-x86_64 is missing: apt-get install -y --no-install-recommends qemu-system-x86"
    );
    dir
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

fn guest(instance: &str, state: &Path) -> AgentSpec {
    let g = guest_dir();
    AgentSpec::new(instance, AgentClass::Qemu, state)
        .param("kernel", g.join("vmlinux").display().to_string())
        .param("initrd", g.join("initramfs.cpio").display().to_string())
        .param("append", "console=ttyS0 panic=-1 quiet")
        .param("accel", "tcg")
        .param("memory", "128")
        .param("ready_marker", "HAVEN-GUEST-UP")
}

/// Kills, by their pidfiles, whatever a failed test left running.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(Some(t)) = pidfile::read(p)
                && t.alive()
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(t.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn serial(state: &Path, instance: &str) -> String {
    std::fs::read(state.join(format!("{instance}.serial")))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("HAVEN-COUNTER "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Polls `f` every 100 ms for at most `bound`.
async fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + bound;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pid_of(state: &Path, instance: &str) -> pidfile::Tracked {
    pidfile::read(&state.join(format!("{instance}.pid")))
        .unwrap()
        .expect("a running guest has a pidfile")
}

#[tokio::test]
async fn qemu_guest_start_monitor_stop_and_disk_counter_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let _c = Cleanup(vec![state.join("vm1.pid")]);
    let spec = guest("vm1", &state).param("disk", disk.display().to_string());

    assert_eq!(run_op(&spec, PROBE, BOOT).await.code, OpCode::NotRunning);
    let r = run_op(&spec, Op::Start, BOOT).await;
    assert_eq!(
        r.code,
        OpCode::Success,
        "{r:?}\nlog: {:?}",
        std::fs::read_to_string(state.join("vm1.log"))
    );
    assert!(serial(&state, "vm1").contains("HAVEN-GUEST-UP"));
    assert_eq!(run_op(&spec, PROBE, BOOT).await.code, OpCode::Success);
    let t = pid_of(&state, "vm1");
    assert!(
        eventually(BOOT, || counters(&serial(&state, "vm1"))
            .iter()
            .any(|&n| n >= 3))
        .await,
        "the guest never counted to 3: {}",
        serial(&state, "vm1")
    );

    let r = run_op(&spec, Op::Stop, Duration::from_secs(30)).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        r.notes.is_empty(),
        "the guest should power off on ACPI: {:?}",
        r.notes
    );
    assert!(serial(&state, "vm1").contains("HAVEN-GUEST-POWERDOWN"));
    assert!(!t.alive(), "QEMU still runs after stop");
    assert_eq!(run_op(&spec, PROBE, BOOT).await.code, OpCode::NotRunning);
    let last = *counters(&serial(&state, "vm1")).last().unwrap();

    // A new QEMU on the same disk resumes from what the old guest wrote.
    let r = run_op(&spec, Op::Start, BOOT).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        eventually(BOOT, || serial(&state, "vm1").contains("HAVEN-RESUME")).await,
        "{}",
        serial(&state, "vm1")
    );
    let text = serial(&state, "vm1");
    let resumed: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("HAVEN-RESUME "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        resumed >= last.saturating_sub(1) && resumed > 0,
        "resumed at {resumed}, had reached {last}"
    );

    // quit-then-kill path: a guest given no time for ACPI is still stopped.
    let spec_fast = spec.clone().param("powerdown_wait", "0");
    let r = run_op(&spec_fast, Op::Stop, Duration::from_secs(30)).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert_eq!(run_op(&spec, PROBE, BOOT).await.code, OpCode::NotRunning);
}

#[tokio::test]
async fn qemu_start_failure_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = guest("bad", dir.path()).param(
        "kernel",
        dir.path().join("no-such-kernel").display().to_string(),
    );
    let r = run_op(&spec, Op::Start, BOOT).await;
    assert_eq!(r.code, OpCode::Error, "{r:?}");
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("QEMU exited") && n.contains("no-such-kernel")),
        "{:?}",
        r.notes
    );
    assert_eq!(run_op(&spec, PROBE, BOOT).await.code, OpCode::NotRunning);
}

struct NbdServer(std::process::Child);

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn qemu_live_migration_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (src_state, dst_state) = (dir.path().join("src"), dir.path().join("dst"));
    let _c = Cleanup(vec![src_state.join("vm1.pid"), dst_state.join("vm1.pid")]);
    // Both QEMUs use one NBD export, as they would shared storage.
    assert!(
        which("qemu-nbd"),
        "qemu-nbd is missing: apt-get install -y --no-install-recommends qemu-utils"
    );
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let _nbd = NbdServer(
        std::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "--shared=8", "-k"])
            .arg(&sock)
            .arg(&disk)
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(10), || sock.exists()).await,
        "qemu-nbd never listened"
    );

    let src = guest("vm1", &src_state).param("disk_nbd", sock.display().to_string());
    let dst = guest("vm1", &dst_state).param("disk_nbd", sock.display().to_string());
    let r = run_op(&src, Op::Start, BOOT).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(
        eventually(BOOT, || counters(&serial(&src_state, "vm1"))
            .iter()
            .any(|&n| n >= 2))
        .await
    );
    let src_pid = pid_of(&src_state, "vm1");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let to = Op::MigrateTo(Migration {
        peer: "dst".into(),
        address: address.clone(),
    });
    let from = Op::MigrateFrom(Migration {
        peer: "src".into(),
        address,
    });
    // Dispatched together: migrate_to retries until the destination listens.
    let (rt, rf) = tokio::join!(run_op(&src, to, BOOT), run_op(&dst, from, BOOT));
    assert_eq!(rt.code, OpCode::Success, "migrate_to: {rt:?}");
    assert_eq!(rf.code, OpCode::Success, "migrate_from: {rf:?}");

    assert!(
        !src_pid.alive(),
        "the source QEMU still runs after migration"
    );
    assert_eq!(run_op(&src, PROBE, BOOT).await.code, OpCode::NotRunning);
    assert_eq!(run_op(&dst, PROBE, BOOT).await.code, OpCode::Success);
    // The destination's console continues the count the source left.
    let last_src = *counters(&serial(&src_state, "vm1")).last().unwrap();
    assert!(
        eventually(BOOT, || counters(&serial(&dst_state, "vm1"))
            .iter()
            .any(|&n| n > last_src + 1))
        .await,
        "the migrated guest does not count on: source reached {last_src}, destination printed {:?}",
        serial(&dst_state, "vm1")
    );
    assert!(
        !serial(&dst_state, "vm1").contains("HAVEN-GUEST-UP"),
        "the destination must not boot anew"
    );

    let r = run_op(&dst, Op::Stop, Duration::from_secs(30)).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert_eq!(run_op(&dst, PROBE, BOOT).await.code, OpCode::NotRunning);
}

#[tokio::test]
async fn qemu_migration_to_nowhere_times_out_and_the_guest_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let _c = Cleanup(vec![state.join("vm1.pid")]);
    let spec = guest("vm1", &state);
    assert_eq!(run_op(&spec, Op::Start, BOOT).await.code, OpCode::Success);
    // Nobody listens on this port: every attempt fails before sending anything.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = Op::MigrateTo(Migration {
        peer: "x".into(),
        address: format!("127.0.0.1:{port}"),
    });
    let r = run_op(&spec, to, Duration::from_secs(2)).await;
    assert_eq!(r.code, OpCode::Timeout, "{r:?}");
    assert!(r.notes[0].contains("could not start"), "{:?}", r.notes);
    assert_eq!(
        run_op(&spec, PROBE, BOOT).await.code,
        OpCode::Success,
        "the source must keep running"
    );
    assert_eq!(
        run_op(&spec, Op::Stop, Duration::from_secs(30)).await.code,
        OpCode::Success
    );
}

/// A TCP relay that forwards `budget` bytes from its client to `to`, then stops
/// reading: to the sender, a link that went dead mid-transfer.
async fn stalling_relay(
    budget: usize,
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let Ok((mut inbound, _)) = l.accept().await else {
            return;
        };
        // The destination QEMU may not listen yet.
        let mut outbound = None;
        for _ in 0..200 {
            if let Ok(s) = tokio::net::TcpStream::connect(to).await {
                outbound = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(mut outbound) = outbound else { return };
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = budget;
        while left > 0 {
            let n = match inbound.read(&mut buf[..left.min(64 * 1024)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if outbound.write_all(&buf[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Hold both ends open without reading until the test drops the task.
        std::future::pending::<()>().await;
    });
    (addr, task)
}

#[tokio::test]
async fn qemu_stalled_migration_is_cancelled_and_the_source_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let (src_state, dst_state) = (dir.path().join("src"), dir.path().join("dst"));
    let _c = Cleanup(vec![src_state.join("vm1.pid"), dst_state.join("vm1.pid")]);
    let src = guest("vm1", &src_state).param("migrate_stall_timeout", "1");
    let dst = guest("vm1", &dst_state);
    assert_eq!(run_op(&src, Op::Start, BOOT).await.code, OpCode::Success);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dst_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let from = Op::MigrateFrom(Migration {
        peer: "src".into(),
        address: dst_addr.to_string(),
    });
    let dst_task = {
        let dst = dst.clone();
        tokio::spawn(async move { run_op(&dst, from, Duration::from_secs(20)).await })
    };
    // Wait for the destination to listen before putting the relay in front of it.
    assert!(eventually(BOOT, || dst_state.join("vm1.qmp").exists()).await);
    let (relay, relay_task) = stalling_relay(4 << 20, dst_addr).await;
    let to = Op::MigrateTo(Migration {
        peer: "dst".into(),
        address: relay.to_string(),
    });
    let r = run_op(&src, to, Duration::from_secs(60)).await;
    relay_task.abort();
    assert_eq!(r.code, OpCode::Error, "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("no progress")),
        "{:?}",
        r.notes
    );
    assert_eq!(
        run_op(&src, PROBE, BOOT).await.code,
        OpCode::Success,
        "the source must keep running"
    );

    let rd = dst_task.await.unwrap();
    assert_ne!(
        rd.code,
        OpCode::Success,
        "the destination never got the guest: {rd:?}"
    );
    assert_eq!(
        run_op(&dst, PROBE, BOOT).await.code,
        OpCode::NotRunning,
        "a failed incoming QEMU is cleaned up"
    );
    assert_eq!(
        run_op(&src, Op::Stop, Duration::from_secs(30)).await.code,
        OpCode::Success
    );
}

#[tokio::test]
async fn qemu_accel_auto_runs_the_guest_and_says_which_accelerator() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let _c = Cleanup(vec![state.join("vm1.pid")]);
    let spec = guest("vm1", &state).param("accel", "auto");
    // Half of this goes to KVM when /dev/kvm opens; nested KVMs that hang use all of it.
    let r = run_op(&spec, Op::Start, Duration::from_secs(60)).await;
    assert_eq!(r.code, OpCode::Success, "{r:?}");
    assert!(serial(&state, "vm1").contains("HAVEN-GUEST-UP"));
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens {
        assert!(
            r.notes.iter().any(|n| n.contains("using TCG")),
            "{:?}",
            r.notes
        );
    }
    // What the result says must be what QEMU runs with.
    let said_tcg = r.notes.iter().any(|n| n.contains("TCG"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut q = haven_exec::qmp::Qmp::connect(&state.join("vm1.qmp"), deadline)
        .await
        .unwrap();
    let kvm = q.execute("query-kvm", None, deadline).await.unwrap();
    assert_eq!(
        kvm["enabled"].as_bool(),
        Some(!said_tcg),
        "{kvm} vs {:?}",
        r.notes
    );
    drop(q);
    assert_eq!(
        run_op(&spec, Op::Stop, Duration::from_secs(30)).await.code,
        OpCode::Success
    );
}
