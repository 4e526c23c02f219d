//! Running fence agents (`/usr/sbin/fence_*`) with the fence-agents stdin protocol.
//!
//! Arguments go to the agent's stdin as `key=value` lines, starting with `action=`; the
//! node to fence is passed as `plug=` (or another name, see
//! [`FenceAgentSpec::host_argument`]). A password is never part of the configuration:
//! it is read from a file or printed by a script at run time, written only to the
//! agent's stdin, and removed from everything the agent prints before it is returned.
//! Exit code 0 is success; for `status`, 0 means on and 2 means off.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::run::{Exit, Invocation, run as run_helper};

/// Where Debian's fence-agents installs its agents.
pub const DEFAULT_AGENT_DIR: &str = "/usr/sbin";

/// What replaces a secret in an agent's output.
pub const REDACTED: &str = "[redacted]";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FenceConfigError {
    #[error(
        "fence agent {0:?}: the name must start with `fence_` and contain only letters, digits and '_' (or be an absolute path)"
    )]
    BadAgent(String),
    #[error(
        "fence agent {agent}: parameter {key:?}: names may contain only lowercase letters, digits and '_'"
    )]
    BadKey { agent: String, key: String },
    #[error("fence agent {agent}: parameter {key:?}: values must be a single line")]
    MultilineValue { agent: String, key: String },
    #[error(
        "fence agent {agent}: parameter {key:?}: a password must not be written in the configuration; reference it with a secret file or a password script"
    )]
    InlinePassword { agent: String, key: String },
}

/// Where the agent's password comes from, read at each run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// The file's content, without the trailing newline.
    File(PathBuf),
    /// The first line the program prints (run without arguments, under the same timeout).
    Script(PathBuf),
}

/// A configured fence device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceAgentSpec {
    /// `fence_NAME` (looked up in [`Self::agent_dir`]) or an absolute path.
    pub agent: String,
    /// Everything but the action, the target and the password (`ip`, `username`,
    /// `lanplus`, `status_file`, ...).
    pub params: BTreeMap<String, String>,
    pub secret: Option<Secret>,
    /// The stdin key that names the target; `None` for devices that control exactly one
    /// node (an IPMI BMC). Default `plug`.
    pub host_argument: Option<String>,
    /// Node name → the agent's name for it (outlet number, VM name). Unmapped nodes
    /// are passed by their own name.
    pub host_map: BTreeMap<String, String>,
    pub agent_dir: PathBuf,
}

impl FenceAgentSpec {
    pub fn new(agent: impl Into<String>) -> Self {
        FenceAgentSpec {
            agent: agent.into(),
            params: BTreeMap::new(),
            secret: None,
            host_argument: Some("plug".into()),
            host_map: BTreeMap::new(),
            agent_dir: DEFAULT_AGENT_DIR.into(),
        }
    }

    pub fn param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Checks what can be checked without running anything.
    pub fn validate(&self) -> Result<(), FenceConfigError> {
        self.program()?;
        for (k, v) in &self.params {
            let bad =
                |f: fn(String, String) -> FenceConfigError| Err(f(self.agent.clone(), k.clone()));
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return bad(|agent, key| FenceConfigError::BadKey { agent, key });
            }
            if matches!(k.as_str(), "password" | "passwd") {
                return bad(|agent, key| FenceConfigError::InlinePassword { agent, key });
            }
            if v.contains(['\n', '\r']) {
                return bad(|agent, key| FenceConfigError::MultilineValue { agent, key });
            }
        }
        Ok(())
    }

    fn program(&self) -> Result<PathBuf, FenceConfigError> {
        let p = PathBuf::from(&self.agent);
        if p.is_absolute() {
            return Ok(p);
        }
        let ok = self.agent.starts_with("fence_")
            && self
                .agent
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(self.agent_dir.join(&self.agent))
        } else {
            Err(FenceConfigError::BadAgent(self.agent.clone()))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    Off,
    On,
    Reboot,
    /// Power state of the target: [`FenceResult::power`].
    Status,
    /// Whether the device itself answers.
    Monitor,
    /// The targets the device knows: [`FenceResult::plugs`].
    List,
}

impl FenceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceAction::Off => "off",
            FenceAction::On => "on",
            FenceAction::Reboot => "reboot",
            FenceAction::Status => "status",
            FenceAction::Monitor => "monitor",
            FenceAction::List => "list",
        }
    }

    fn has_target(self) -> bool {
        !matches!(self, FenceAction::Monitor | FenceAction::List)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The action was done (for `status`: the state is known).
    Success,
    /// The agent exited with this code.
    Failed { code: i32 },
    /// Still running at the timeout; killed with its process group.
    Timeout,
    /// The agent could not be run (configuration, missing program, unreadable secret).
    CannotRun,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceResult {
    pub outcome: FenceOutcome,
    /// For `status`.
    pub power: Option<PowerState>,
    /// For `list`: the first field of each line the agent printed.
    pub plugs: Vec<String>,
    pub duration: Duration,
    /// The agent's output with the secret replaced by [`REDACTED`].
    pub stdout: String,
    pub stderr: String,
    pub notes: Vec<String>,
}

impl FenceResult {
    fn cannot_run(started: Instant, why: String) -> Self {
        FenceResult {
            outcome: FenceOutcome::CannotRun,
            power: None,
            plugs: Vec::new(),
            duration: started.elapsed(),
            stdout: String::new(),
            stderr: String::new(),
            notes: vec![why],
        }
    }
}

/// Runs `action` against `target` (a node name; ignored by `monitor` and `list`),
/// giving the agent, and the password script if any, at most `timeout` in total.
pub async fn run_fence(
    agent: &FenceAgentSpec,
    action: FenceAction,
    target: &str,
    timeout: Duration,
) -> FenceResult {
    let started = Instant::now();
    if let Err(e) = agent.validate() {
        return FenceResult::cannot_run(started, e.to_string());
    }
    let program = match agent.program() {
        Ok(p) => p,
        Err(e) => return FenceResult::cannot_run(started, e.to_string()),
    };
    let secret = match &agent.secret {
        None => None,
        Some(s) => match read_secret(s, timeout).await {
            Ok(p) => Some(p),
            Err(why) => return FenceResult::cannot_run(started, why),
        },
    };
    let mut stdin = format!("action={}\n", action.as_str());
    if action.has_target()
        && let Some(key) = &agent.host_argument
    {
        let plug = agent.host_map.get(target).map_or(target, String::as_str);
        if plug.contains(['\n', '\r']) {
            return FenceResult::cannot_run(
                started,
                format!("target {plug:?} is not a single line"),
            );
        }
        stdin.push_str(&format!("{key}={plug}\n"));
    }
    for (k, v) in &agent.params {
        stdin.push_str(&format!("{k}={v}\n"));
    }
    if let Some(p) = &secret {
        stdin.push_str(&format!("password={p}\n"));
    }
    let inv = Invocation {
        program,
        args: Vec::new(),
        env: BTreeMap::new(),
        stdin: Some(stdin.into_bytes()),
    };
    let left = timeout.saturating_sub(started.elapsed());
    let f = run_helper(&inv, left).await;
    let redact = |s: String| match &secret {
        Some(p) if !p.is_empty() => s.replace(p.as_str(), REDACTED),
        _ => s,
    };
    let stdout = redact(f.stdout);
    let stderr = redact(f.stderr);
    let mut notes = Vec::new();
    let (outcome, power) = match f.exit {
        Exit::Code(0) if action == FenceAction::Status => {
            (FenceOutcome::Success, Some(PowerState::On))
        }
        Exit::Code(2) if action == FenceAction::Status => {
            (FenceOutcome::Success, Some(PowerState::Off))
        }
        Exit::Code(0) => (FenceOutcome::Success, None),
        Exit::Code(code) => (FenceOutcome::Failed { code }, None),
        Exit::Signal(s) => {
            notes.push(format!("the agent died of signal {s}"));
            (FenceOutcome::Failed { code: 128 + s }, None)
        }
        Exit::TimedOut => {
            notes.push(
                "the agent did not finish in time and was killed with its process group".into(),
            );
            (FenceOutcome::Timeout, None)
        }
        Exit::SpawnFailed(why) => {
            notes.push(format!("cannot run the agent: {why}"));
            (FenceOutcome::CannotRun, None)
        }
    };
    let plugs = if action == FenceAction::List && outcome == FenceOutcome::Success {
        parse_list(&stdout)
    } else {
        Vec::new()
    };
    FenceResult {
        outcome,
        power,
        plugs,
        duration: started.elapsed(),
        stdout,
        stderr,
        notes,
    }
}

/// `list` prints `PLUG,ALIAS` per line.
fn parse_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split(',').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads the password. Errors name the source but never include what was read.
async fn read_secret(s: &Secret, timeout: Duration) -> Result<String, String> {
    match s {
        Secret::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("password file {}: {e}", path.display()))?;
            let p = text.strip_suffix('\n').unwrap_or(&text);
            let p = p.strip_suffix('\r').unwrap_or(p);
            if p.contains(['\n', '\r']) {
                return Err(format!(
                    "password file {}: must hold a single line",
                    path.display()
                ));
            }
            Ok(p.to_string())
        }
        Secret::Script(path) => {
            let inv = Invocation {
                program: path.clone(),
                args: Vec::new(),
                env: BTreeMap::new(),
                stdin: None,
            };
            let f = run_helper(&inv, timeout).await;
            match f.exit {
                Exit::Code(0) => Ok(f.stdout.lines().next().unwrap_or("").to_string()),
                Exit::Code(c) => Err(format!(
                    "password script {} exited with {c}",
                    path.display()
                )),
                Exit::Signal(s) => Err(format!(
                    "password script {} died of signal {s}",
                    path.display()
                )),
                Exit::TimedOut => Err(format!(
                    "password script {} did not finish in time",
                    path.display()
                )),
                Exit::SpawnFailed(why) => Err(format!("password script: {why}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_passwords_and_bad_keys_are_refused() {
        let e = FenceAgentSpec::new("fence_ipmilan")
            .param("password", "x")
            .validate();
        assert!(matches!(e, Err(FenceConfigError::InlinePassword { .. })));
        let e = FenceAgentSpec::new("fence_ipmilan")
            .param("ip\nx", "x")
            .validate();
        assert!(matches!(e, Err(FenceConfigError::BadKey { .. })));
        let e = FenceAgentSpec::new("fence_ipmilan")
            .param("ip", "1\naction=on")
            .validate();
        assert!(matches!(e, Err(FenceConfigError::MultilineValue { .. })));
        let e = FenceAgentSpec::new("../../bin/sh").validate();
        assert!(matches!(e, Err(FenceConfigError::BadAgent(_))));
        assert!(
            FenceAgentSpec::new("fence_dummy")
                .param("type", "file")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn list_output_is_parsed() {
        assert_eq!(parse_list("1,node1\n2,node2\n\n"), vec!["1", "2"]);
    }

    #[tokio::test]
    async fn secret_file_is_read_and_script_failure_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(
            read_secret(&Secret::File(f), Duration::from_secs(5))
                .await
                .unwrap(),
            "s3cret"
        );
        let e = read_secret(
            &Secret::Script("/nonexistent/pw".into()),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(e.contains("/nonexistent/pw"), "{e}");
    }
}
