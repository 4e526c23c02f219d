//! The `process` class: a supervised long-running command.
//!
//! Parameters: `command` (required; run by `/bin/sh -c "exec COMMAND"`), `cwd`
//! (optional). The process runs detached in its own process group with its output
//! appended to `STATE_DIR/INSTANCE.log`; `STATE_DIR/INSTANCE.pid` records it, so a
//! restarted agent finds it again. `stop` sends SIGTERM to the group, and SIGKILL when
//! most of the timeout has passed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::agent::{AgentSpec, Op, OpCode, OpResult};
use crate::pidfile::{self, Tracked};
use crate::run::signal_group;

/// How often a stop looks whether the process has gone. Reading /proc is cheap; this
/// only bounds how late a stop notices the exit.
const POLL: Duration = Duration::from_millis(20);

pub(crate) async fn run(spec: &AgentSpec, op: &Op, timeout: Duration) -> OpResult {
    let pidfile = spec.state_dir.join(format!("{}.pid", spec.instance));
    match op {
        Op::Start => start(spec, &pidfile, timeout).await,
        Op::Stop => stop(&pidfile, timeout).await,
        Op::Monitor { .. } => monitor(&pidfile),
        Op::ValidateAll => match command(spec) {
            Ok(_) => OpResult::new(OpCode::Success, Duration::ZERO),
            Err(r) => r,
        },
        other => OpResult::new(OpCode::Unimplemented, Duration::ZERO).note(format!(
            "the process class has no {} action",
            other.action()
        )),
    }
}

fn command(spec: &AgentSpec) -> Result<&str, OpResult> {
    match spec.params.get("command").map(|c| c.trim()) {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err(
            OpResult::new(OpCode::NotConfigured, Duration::ZERO).note(format!(
                "resource {}: parameter `command` is required for the process class",
                spec.instance
            )),
        ),
    }
}

/// The running process a pidfile names, if it is still that process.
fn tracked(pidfile: &Path) -> Result<Option<Tracked>, OpResult> {
    match pidfile::read(pidfile) {
        Ok(t) => Ok(t.filter(Tracked::alive)),
        Err(e) => Err(OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string())),
    }
}

fn monitor(pidfile: &Path) -> OpResult {
    match tracked(pidfile) {
        Ok(Some(_)) => OpResult::new(OpCode::Success, Duration::ZERO),
        Ok(None) => OpResult::new(OpCode::NotRunning, Duration::ZERO),
        Err(r) => r,
    }
}

async fn start(spec: &AgentSpec, pidfile: &Path, timeout: Duration) -> OpResult {
    let cmd = match command(spec) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match tracked(pidfile) {
        Ok(Some(_)) => return OpResult::new(OpCode::Success, Duration::ZERO),
        Ok(None) => {}
        Err(r) => return r,
    }
    let log = spec.state_dir.join(format!("{}.log", spec.instance));
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(format!("exec {cmd}"));
    if let Some(cwd) = spec.params.get("cwd") {
        c.current_dir(cwd);
    }
    let mut child = match spawn_detached(c, &spec.state_dir, &log) {
        Ok(c) => c,
        Err(why) => return OpResult::new(OpCode::SpawnFailed, Duration::ZERO).note(why),
    };
    let Some(t) = child.id().and_then(|p| Tracked::of(p as i32)) else {
        return OpResult::new(OpCode::Error, Duration::ZERO)
            .note(format!("`{cmd}` exited at once; see {}", log.display()));
    };
    if let Err(e) = pidfile::write(pidfile, t) {
        signal_group(t.pid as u32, Signal::SIGKILL);
        return OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string());
    }
    // A command that fails at once (bad path, bad flag) should fail the start, not the
    // first monitor; a short look catches most of those.
    let look = (timeout / 10).min(Duration::from_millis(100));
    match tokio::time::timeout(look, child.wait()).await {
        Ok(status) => {
            pidfile::remove(pidfile);
            let how = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            OpResult::new(OpCode::Error, Duration::ZERO).note(format!(
                "`{cmd}` exited during start ({how}); see {}",
                log.display()
            ))
        }
        Err(_) => {
            reap_in_background(child);
            OpResult::new(OpCode::Success, Duration::ZERO)
        }
    }
}

async fn stop(pidfile: &Path, timeout: Duration) -> OpResult {
    let t = match tracked(pidfile) {
        Ok(Some(t)) => t,
        Ok(None) => {
            pidfile::remove(pidfile);
            return OpResult::new(OpCode::Success, Duration::ZERO);
        }
        Err(r) => return r,
    };
    let deadline = Instant::now() + timeout;
    let kill_at = Instant::now() + timeout.mul_f64(0.8);
    match terminate(t, kill_at, deadline).await {
        Stopped::Terminated => {
            pidfile::remove(pidfile);
            OpResult::new(OpCode::Success, Duration::ZERO)
        }
        Stopped::Killed => {
            pidfile::remove(pidfile);
            OpResult::new(OpCode::Success, Duration::ZERO)
                .note("the process ignored SIGTERM and was killed with SIGKILL")
        }
        Stopped::Survived => OpResult::new(OpCode::Timeout, Duration::ZERO)
            .note(format!("process {} survived SIGKILL", t.pid)),
    }
}

pub(crate) enum Stopped {
    Terminated,
    Killed,
    Survived,
}

/// SIGTERM to the group, SIGKILL at `kill_at`, give up at `deadline`.
pub(crate) async fn terminate(t: Tracked, kill_at: Instant, deadline: Instant) -> Stopped {
    signal_group(t.pid as u32, Signal::SIGTERM);
    if wait_gone(t, kill_at).await {
        // The leader is gone; children it left in the group go too.
        signal_group(t.pid as u32, Signal::SIGKILL);
        return Stopped::Terminated;
    }
    signal_group(t.pid as u32, Signal::SIGKILL);
    if wait_gone(t, deadline).await {
        Stopped::Killed
    } else {
        Stopped::Survived
    }
}

/// Waits until `t` has exited or `until` passes; true when it has exited.
pub(crate) async fn wait_gone(t: Tracked, until: Instant) -> bool {
    loop {
        if !t.alive() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Spawns `cmd` in its own process group, stdin from /dev/null, output appended to
/// `log`. The child is not killed when the handle drops: it must outlive the agent.
pub(crate) fn spawn_detached(
    mut cmd: tokio::process::Command,
    state_dir: &Path,
    log: &PathBuf,
) -> Result<tokio::process::Child, String> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("state dir {}: {e}", state_dir.display()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
        .map_err(|e| format!("cannot spawn {:?}: {e}", cmd.as_std().get_program()))
}

/// Collects the exit status when it comes, so the process does not linger as a
/// zombie that looks alive to `kill(pid, 0)`.
pub(crate) fn reap_in_background(mut child: tokio::process::Child) {
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
}
