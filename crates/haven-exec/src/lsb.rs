//! LSB init scripts: `INIT_DIR/NAME start|stop|status`.
//!
//! Start and stop exit codes follow the same numbering as OCF's (0 success, 1 generic
//! error, 2 invalid arguments, ... 7 not running). `status` has its own: 0 running,
//! 1 dead with a pidfile left, 2 dead with a lock file left, 3 not running, 4 unknown.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::agent::{AgentSpec, Op, OpCode, OpResult};
use crate::run::{Invocation, run as run_helper};

pub(crate) async fn run(spec: &AgentSpec, name: &str, op: &Op, timeout: Duration) -> OpResult {
    let program = spec.init_dir.join(name);
    let (action, map): (&str, fn(i32) -> OpCode) = match op {
        Op::Start => ("start", OpCode::from_exit_code),
        Op::Stop => ("stop", OpCode::from_exit_code),
        Op::Monitor { .. } => ("status", status_code),
        Op::Reload => ("force-reload", OpCode::from_exit_code),
        Op::ValidateAll => {
            let code = if program.is_file() {
                OpCode::Success
            } else {
                OpCode::NotInstalled
            };
            return OpResult::new(code, Duration::ZERO);
        }
        other => {
            return OpResult::new(OpCode::Unimplemented, Duration::ZERO)
                .note(format!("LSB scripts have no {} action", other.action()));
        }
    };
    if !program.is_file() {
        // A probe of a service that is not even installed: it is certainly not running.
        let code = if matches!(op, Op::Monitor { .. } | Op::Stop) {
            if matches!(op, Op::Stop) {
                OpCode::Success
            } else {
                OpCode::NotRunning
            }
        } else {
            OpCode::NotInstalled
        };
        return OpResult::new(code, Duration::ZERO).note(format!(
            "init script {} is not installed",
            program.display()
        ));
    }
    let inv = Invocation {
        program,
        args: vec![action.into()],
        env: BTreeMap::new(),
        stdin: None,
    };
    OpResult::from_finished(run_helper(&inv, timeout).await, map)
}

/// LSB `status` exit codes in OCF terms.
pub(crate) fn status_code(code: i32) -> OpCode {
    match code {
        0 => OpCode::Success,
        // Dead but a pid or lock file remains: for the cluster it is not running.
        1..=3 => OpCode::NotRunning,
        _ => OpCode::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_ocf() {
        assert_eq!(status_code(0), OpCode::Success);
        assert_eq!(status_code(1), OpCode::NotRunning);
        assert_eq!(status_code(3), OpCode::NotRunning);
        assert_eq!(status_code(4), OpCode::Error);
    }
}
