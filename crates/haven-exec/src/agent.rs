//! The resource-agent interface: what to run ([`AgentSpec`], [`Op`]) and how it ended
//! ([`OpResult`], [`OpCode`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::run::{Exit, Finished};

/// Where Debian installs OCF agents.
pub const DEFAULT_OCF_ROOT: &str = "/usr/lib/ocf";
/// Where LSB init scripts live.
pub const DEFAULT_INIT_DIR: &str = "/etc/init.d";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentClassError {
    #[error(
        "agent class {0:?}: expected ocf:PROVIDER:TYPE, lsb:NAME, systemd:UNIT, process, qemu or volume"
    )]
    Unknown(String),
    #[error(
        "agent class {class:?}: {part} {value:?} must be non-empty and contain only letters, digits, '-', '_', '.' and '@'"
    )]
    BadName {
        class: String,
        part: &'static str,
        value: String,
    },
}

/// The kind of agent that manages a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentClass {
    /// `ocf:PROVIDER:TYPE`: `OCF_ROOT/resource.d/PROVIDER/TYPE ACTION`.
    Ocf { provider: String, kind: String },
    /// `lsb:NAME`: `INIT_DIR/NAME start|stop|status`.
    Lsb { name: String },
    /// `systemd:UNIT`: through `systemctl`.
    Systemd { unit: String },
    /// A supervised command (param `command`), see [`crate::process`].
    Process,
    /// A QEMU guest driven over QMP, see [`crate::qemu`].
    Qemu,
    /// This node's replica of a replicated volume, see [`crate::volume`].
    Volume,
}

impl FromStr for AgentClass {
    type Err = AgentClassError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let check = |part: &'static str, value: &str| {
            let ok = !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
                // '..' would let a provider name walk out of the OCF root.
                && !value.contains("..");
            if ok {
                Ok(value.to_string())
            } else {
                Err(AgentClassError::BadName {
                    class: s.to_string(),
                    part,
                    value: value.to_string(),
                })
            }
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["ocf", provider, kind] => Ok(AgentClass::Ocf {
                provider: check("provider", provider)?,
                kind: check("type", kind)?,
            }),
            ["lsb", name] => Ok(AgentClass::Lsb {
                name: check("name", name)?,
            }),
            ["systemd", unit] => Ok(AgentClass::Systemd {
                unit: check("unit", unit)?,
            }),
            ["process"] => Ok(AgentClass::Process),
            ["qemu"] => Ok(AgentClass::Qemu),
            ["volume"] => Ok(AgentClass::Volume),
            _ => Err(AgentClassError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for AgentClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentClass::Ocf { provider, kind } => write!(f, "ocf:{provider}:{kind}"),
            AgentClass::Lsb { name } => write!(f, "lsb:{name}"),
            AgentClass::Systemd { unit } => write!(f, "systemd:{unit}"),
            AgentClass::Process => f.write_str("process"),
            AgentClass::Qemu => f.write_str("qemu"),
            AgentClass::Volume => f.write_str("volume"),
        }
    }
}

/// One resource as this node runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// The resource id (`OCF_RESOURCE_INSTANCE`; names pidfiles and sockets).
    pub instance: String,
    pub class: AgentClass,
    /// Instance parameters (`OCF_RESKEY_<name>` for OCF agents).
    pub params: BTreeMap<String, String>,
    /// Meta attributes passed to OCF agents as `OCF_RESKEY_CRM_meta_<name>`.
    pub meta: BTreeMap<String, String>,
    /// Where `process` and `qemu` keep pidfiles, sockets and logs; must persist across
    /// agent restarts (it is how a restarted agent finds what it started).
    pub state_dir: PathBuf,
    pub ocf_root: PathBuf,
    pub init_dir: PathBuf,
}

impl AgentSpec {
    /// A spec with no parameters and the default OCF root and init directory.
    pub fn new(
        instance: impl Into<String>,
        class: AgentClass,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        AgentSpec {
            instance: instance.into(),
            class,
            params: BTreeMap::new(),
            meta: BTreeMap::new(),
            state_dir: state_dir.into(),
            ocf_root: DEFAULT_OCF_ROOT.into(),
            init_dir: DEFAULT_INIT_DIR.into(),
        }
    }

    /// Adds an instance parameter (builder style).
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }
}

/// The other end of a live migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The peer node's name (`migrate_target` / `migrate_source` for OCF agents).
    pub peer: String,
    /// `HOST:PORT` the destination listens on for the migration stream (used by `qemu`).
    pub address: String,
}

/// An operation on a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    /// `interval` zero is a one-off probe; otherwise the recurring monitor's period
    /// (agents may do deeper checks on some intervals).
    Monitor {
        interval: Duration,
    },
    /// `fenced`: the nodes the cluster confirmed fenced (or knows are down). A
    /// replicated volume may be promoted without reaching these peers, and only these
    /// (DRBD's resource-and-stonith); other classes ignore it.
    /// `migration_source`: promote beside that node's primary for a live migration
    /// (a volume's dual-primary window); `None` for an ordinary promote.
    Promote {
        fenced: Vec<String>,
        migration_source: Option<String>,
    },
    Demote,
    /// Run on the source. For `qemu` this may start before the destination listens: the
    /// `migrate` command is retried until it connects or the timeout passes, so the two
    /// halves can be dispatched at the same time.
    MigrateTo(Migration),
    /// Run on the destination: for `qemu`, starts the incoming guest and waits until the
    /// migration has completed and the guest runs.
    MigrateFrom(Migration),
    Reload,
    MetaData,
    ValidateAll,
}

impl Op {
    /// The OCF action name.
    pub fn action(&self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Monitor { .. } => "monitor",
            Op::Promote { .. } => "promote",
            Op::Demote => "demote",
            Op::MigrateTo(_) => "migrate_to",
            Op::MigrateFrom(_) => "migrate_from",
            Op::Reload => "reload",
            Op::MetaData => "meta-data",
            Op::ValidateAll => "validate-all",
        }
    }
}

/// How an operation ended: the OCF exit codes, plus what can happen around an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Success,
    Error,
    InvalidArgs,
    Unimplemented,
    InsufficientPriv,
    NotInstalled,
    NotConfigured,
    NotRunning,
    RunningPromoted,
    FailedPromoted,
    /// An exit code outside 0..=9, or death by a signal we did not send.
    Other(i32),
    /// Still running at the timeout; it (and its process group) was killed.
    Timeout,
    /// The agent could not be started (missing program, exec failure, state dir).
    SpawnFailed,
}

impl OpCode {
    pub fn from_exit_code(code: i32) -> OpCode {
        match code {
            0 => OpCode::Success,
            1 => OpCode::Error,
            2 => OpCode::InvalidArgs,
            3 => OpCode::Unimplemented,
            4 => OpCode::InsufficientPriv,
            5 => OpCode::NotInstalled,
            6 => OpCode::NotConfigured,
            7 => OpCode::NotRunning,
            8 => OpCode::RunningPromoted,
            9 => OpCode::FailedPromoted,
            other => OpCode::Other(other),
        }
    }

    /// The OCF exit code, where there is one.
    pub fn exit_code(self) -> Option<i32> {
        Some(match self {
            OpCode::Success => 0,
            OpCode::Error => 1,
            OpCode::InvalidArgs => 2,
            OpCode::Unimplemented => 3,
            OpCode::InsufficientPriv => 4,
            OpCode::NotInstalled => 5,
            OpCode::NotConfigured => 6,
            OpCode::NotRunning => 7,
            OpCode::RunningPromoted => 8,
            OpCode::FailedPromoted => 9,
            OpCode::Other(c) => c,
            OpCode::Timeout | OpCode::SpawnFailed => return None,
        })
    }
}

/// The result of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    pub code: OpCode,
    pub duration: Duration,
    /// The agent's output, each stream cut at [`crate::OUTPUT_LIMIT`] bytes.
    pub stdout: String,
    pub stderr: String,
    /// What Haven itself has to say: why it failed to spawn, a fallback from KVM to TCG,
    /// a stop that needed SIGKILL. One sentence per entry.
    pub notes: Vec<String>,
}

impl OpResult {
    /// One line saying why, for a failure report: Haven's notes, else the agent's last
    /// line of stderr (or stdout), cut to 200 characters.
    pub fn reason(&self) -> String {
        let last_line = |s: &str| {
            s.lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        };
        let r = if self.notes.is_empty() {
            last_line(&self.stderr)
                .or_else(|| last_line(&self.stdout))
                .unwrap_or_else(|| format!("{:?}", self.code))
        } else {
            self.notes.join("; ")
        };
        r.chars().take(200).collect()
    }

    pub(crate) fn new(code: OpCode, duration: Duration) -> Self {
        OpResult {
            code,
            duration,
            stdout: String::new(),
            stderr: String::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn note(mut self, n: impl Into<String>) -> Self {
        self.notes.push(n.into());
        self
    }

    pub(crate) fn from_finished(f: Finished, map: impl FnOnce(i32) -> OpCode) -> Self {
        let (code, note) = match f.exit {
            Exit::Code(c) => (map(c), None),
            Exit::Signal(s) => (
                OpCode::Other(128 + s),
                Some(format!("the agent died of signal {s}")),
            ),
            Exit::TimedOut => (
                OpCode::Timeout,
                Some(
                    "the agent did not finish in time and was killed with its process group"
                        .to_string(),
                ),
            ),
            Exit::SpawnFailed(why) => (
                OpCode::SpawnFailed,
                Some(format!("cannot run the agent: {why}")),
            ),
        };
        OpResult {
            code,
            duration: f.duration,
            stdout: f.stdout,
            stderr: f.stderr,
            notes: note.into_iter().collect(),
        }
    }
}

/// Runs `op` for the resource `spec` describes, giving it at most `timeout`.
///
/// Never fails: a configuration the class cannot use comes back as
/// [`OpCode::NotConfigured`] or [`OpCode::InvalidArgs`] with a note naming the field.
pub async fn run_op(spec: &AgentSpec, op: Op, timeout: Duration) -> OpResult {
    let started = std::time::Instant::now();
    if let Err(why) = check_instance(&spec.instance) {
        return OpResult::new(OpCode::NotConfigured, started.elapsed()).note(why);
    }
    let mut r = match &spec.class {
        AgentClass::Ocf { provider, kind } => {
            crate::ocf::run(spec, provider, kind, &op, timeout).await
        }
        AgentClass::Lsb { name } => crate::lsb::run(spec, name, &op, timeout).await,
        AgentClass::Systemd { unit } => crate::systemd::run(unit, &op, timeout).await,
        AgentClass::Process => crate::process::run(spec, &op, timeout).await,
        AgentClass::Qemu => crate::qemu::run(spec, &op, timeout).await,
        AgentClass::Volume => crate::volume::run(spec, &op, timeout).await,
    };
    r.duration = started.elapsed();
    tracing::debug!(
        resource = %spec.instance, class = %spec.class, action = op.action(),
        code = ?r.code, ms = r.duration.as_millis() as u64, "operation finished"
    );
    r
}

/// Instance names become file names in the state dir (pidfiles, sockets) and
/// environment values; keep them to a safe alphabet.
pub(crate) fn check_instance(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "resource id {name:?}: must be 1 to 100 characters of letters, digits, '-', '_', '.', ':' or '@', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_instance_name_that_could_escape_the_state_dir_is_refused() {
        let spec = AgentSpec::new("../etc/x", AgentClass::Process, "/tmp").param("command", "true");
        let r = run_op(&spec, Op::Start, Duration::from_secs(1)).await;
        assert_eq!(r.code, OpCode::NotConfigured);
        assert!(r.notes[0].contains("\"../etc/x\""), "{:?}", r.notes);
        assert!(check_instance("vm-1.a:0").is_ok());
    }

    #[test]
    fn classes_parse_and_print() {
        for s in [
            "ocf:heartbeat:Dummy",
            "lsb:ssh",
            "systemd:nginx.service",
            "process",
            "qemu",
            "volume",
        ] {
            assert_eq!(s.parse::<AgentClass>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_classes_are_refused_with_the_rule() {
        assert!(matches!(
            "ocf:heartbeat".parse::<AgentClass>(),
            Err(AgentClassError::Unknown(_))
        ));
        assert!(matches!(
            "docker:x".parse::<AgentClass>(),
            Err(AgentClassError::Unknown(_))
        ));
        let e = "ocf:..:Dummy".parse::<AgentClass>().unwrap_err();
        assert!(
            matches!(
                e,
                AgentClassError::BadName {
                    part: "provider",
                    ..
                }
            ),
            "{e}"
        );
        let e = "lsb:a/b".parse::<AgentClass>().unwrap_err().to_string();
        assert!(e.contains("a/b") && e.contains("only letters"), "{e}");
    }

    #[test]
    fn reason_prefers_notes_then_stderr() {
        let mut r = OpResult::new(OpCode::Error, Duration::ZERO);
        assert_eq!(r.reason(), "Error");
        r.stdout = "out\n".into();
        r.stderr = "first\nERROR: no such device\n\n".into();
        assert_eq!(r.reason(), "ERROR: no such device");
        let r = r.note("cannot run the agent: x");
        assert_eq!(r.reason(), "cannot run the agent: x");
    }

    #[test]
    fn exit_codes_map_both_ways() {
        for c in 0..=9 {
            assert_eq!(OpCode::from_exit_code(c).exit_code(), Some(c));
        }
        assert_eq!(OpCode::from_exit_code(42), OpCode::Other(42));
        assert_eq!(OpCode::Timeout.exit_code(), None);
    }
}
