//! Running a short-lived helper (an OCF/LSB agent, `systemctl`, a fence agent) under a
//! deadline, with its output captured up to a bound.
//!
//! Every helper gets its own process group so that a timeout can kill everything it
//! forked; agents are shell scripts and the grandchildren are what hang.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// How much of each output stream is kept; agents can be chatty (`meta-data` is a few
/// KiB, a debug trace can be megabytes) and results travel to the coordinator.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// After a kill, how long the output readers may take to see end-of-file. A grandchild
/// that left the process group can hold the pipe open forever.
const DRAIN_BOUND: Duration = Duration::from_secs(2);
/// After a normal exit, the same; shorter, because a daemon the agent started (and
/// that kept the agent's stdout) is normal and must not slow every start down.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(300);

/// A helper to run. Not `Debug`: stdin may carry a password.
#[derive(Clone)]
pub(crate) struct Invocation {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: BTreeMap<String, String>,
    /// Written to the helper's stdin, which is then closed. `None`: stdin is /dev/null.
    pub stdin: Option<Vec<u8>>,
}

/// How a helper ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    /// Killed by a signal it did not get from us.
    Signal(i32),
    /// Still running at the deadline; its process group was killed.
    TimedOut,
    /// Could not be started at all.
    SpawnFailed(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub exit: Exit,
    pub duration: Duration,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `inv` and waits at most `timeout` for it to exit.
pub(crate) async fn run(inv: &Invocation, timeout: Duration) -> Finished {
    let started = Instant::now();
    let mut cmd = Command::new(&inv.program);
    cmd.args(&inv.args)
        .envs(&inv.env)
        .stdin(if inv.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Finished {
                exit: Exit::SpawnFailed(format!("{}: {e}", inv.program.display())),
                duration: started.elapsed(),
                stdout: String::new(),
                stderr: String::new(),
            };
        }
    };
    // If the caller abandons the operation (drops this future), the helper and all it
    // forked must not run on unsupervised.
    let mut guard = GroupGuard(child.id());
    if let (Some(data), Some(mut stdin)) = (inv.stdin.clone(), child.stdin.take()) {
        // A helper that never reads stdin must not block us: write in the background
        // and let a broken pipe be its problem.
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
            let _ = stdin.shutdown().await;
        });
    }
    let out = child.stdout.take().map(Capture::start);
    let err = child.stderr.take().map(Capture::start);

    let exit = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => exit_of(status),
        Ok(Err(e)) => Exit::SpawnFailed(format!("waiting for {}: {e}", inv.program.display())),
        Err(_) => {
            if let Some(pid) = guard.0 {
                kill_group(pid);
            }
            let _ = tokio::time::timeout(DRAIN_BOUND, child.wait()).await;
            Exit::TimedOut
        }
    };
    // A normal exit may leave daemons it started in the group: they are the service.
    let drain = if exit == Exit::TimedOut {
        DRAIN_BOUND
    } else {
        DRAIN_AFTER_EXIT
    };
    guard.0 = None;
    let stdout = Capture::finish(out, drain).await;
    let stderr = Capture::finish(err, drain).await;
    Finished {
        exit,
        duration: started.elapsed(),
        stdout,
        stderr,
    }
}

/// Kills a helper's process group when dropped, unless disarmed.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill_group(pid);
        }
    }
}

/// One output stream, read in the background into a buffer the caller can take at any
/// time, so a stream that never closes costs a bounded wait, not the output.
struct Capture {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Capture {
    fn start<R: AsyncRead + Unpin + Send + 'static>(r: R) -> Capture {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn(read_bounded(r, buf.clone()));
        Capture { buf, task }
    }

    async fn finish(c: Option<Capture>, bound: Duration) -> String {
        let Some(mut c) = c else {
            return String::new();
        };
        // A daemon the helper started may hold the pipe open forever.
        let closed = tokio::time::timeout(bound, &mut c.task).await.is_ok();
        c.task.abort();
        let bytes = c.buf.lock().map(|b| b.clone()).unwrap_or_default();
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if !closed {
            s.push_str("\n[stream still held open by a process the agent left behind]");
        }
        s
    }
}

/// Reads a stream to its end, keeping the first [`OUTPUT_LIMIT`] bytes. Draining the
/// rest keeps a verbose helper from blocking on a full pipe.
async fn read_bounded<R: AsyncRead + Unpin>(
    mut r: R,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 8192];
    let mut dropped = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Ok(mut kept) = out.lock() else { return };
                let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                if n > room && !dropped {
                    dropped = true;
                    kept.extend_from_slice(b"\n[output truncated]");
                }
            }
        }
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Signal(0),
    }
}

/// SIGKILL to a whole process group. Failure means it is already gone.
pub(crate) fn kill_group(pgid: u32) {
    signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
}

pub(crate) fn signal_group(pgid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(p) = i32::try_from(pgid)
        && p > 1
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::new(),
            stdin: None,
        }
    }

    #[tokio::test]
    async fn exit_code_and_output_are_reported() {
        let f = run(
            &sh("echo out; echo err >&2; exit 7"),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(f.exit, Exit::Code(7));
        assert_eq!(f.stdout, "out\n");
        assert_eq!(f.stderr, "err\n");
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let f = run(
            &sh("head -c 1000000 /dev/zero | tr '\\0' x"),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(f.exit, Exit::Code(0));
        assert!(f.stdout.len() < OUTPUT_LIMIT + 100);
        assert!(f.stdout.ends_with("[output truncated]"));
    }

    #[tokio::test]
    async fn stdin_is_delivered() {
        let mut inv = sh("read a; read b; echo \"$b$a\"");
        inv.stdin = Some(b"1\n2\n".to_vec());
        let f = run(&inv, Duration::from_secs(10)).await;
        assert_eq!(f.stdout, "21\n");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_failure() {
        let inv = Invocation {
            program: "/nonexistent/agent".into(),
            args: vec![],
            env: BTreeMap::new(),
            stdin: None,
        };
        let f = run(&inv, Duration::from_secs(10)).await;
        assert!(matches!(f.exit, Exit::SpawnFailed(ref m) if m.contains("/nonexistent/agent")));
    }

    #[tokio::test]
    async fn a_daemon_holding_stdout_costs_neither_the_output_nor_its_life() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("daemon.pid");
        let script = format!(
            "echo started; sleep 300 & echo $! > {}; exit 0",
            pidfile.display()
        );
        let f = run(&sh(&script), Duration::from_secs(10)).await;
        assert_eq!(f.exit, Exit::Code(0));
        assert!(f.stdout.starts_with("started\n"), "{:?}", f.stdout);
        assert!(f.stdout.contains("held open"), "{:?}", f.stdout);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            crate::pidfile::is_alive(pid),
            "a service the agent started was killed"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    #[tokio::test]
    async fn an_abandoned_operation_kills_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let inv = sh(&script);
        let op = run(&inv, Duration::from_secs(300));
        // The caller gives up (drops the future) once the child exists.
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::pin!(op);
            loop {
                tokio::select! {
                    _ = &mut op => panic!("a 300 s sleep finished"),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')) {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = (0..200).any(|_| {
            let alive = crate::pidfile::is_alive(pid);
            if alive {
                std::thread::sleep(Duration::from_millis(10));
            }
            !alive
        });
        assert!(gone, "the abandoned operation's child {pid} survived");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // The grandchild writes its pid then sleeps; it must die with its parent.
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let f = run(&sh(&script), Duration::from_millis(500)).await;
        assert_eq!(f.exit, Exit::TimedOut);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is not our child, so once killed it is reaped by init and
        // disappears; bound the wait for that.
        let gone = (0..200).any(|_| {
            let alive = crate::pidfile::is_alive(pid);
            if alive {
                std::thread::sleep(Duration::from_millis(10));
            }
            !alive
        });
        assert!(gone, "grandchild {pid} survived the group kill");
    }
}
