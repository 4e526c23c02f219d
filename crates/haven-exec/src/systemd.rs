//! systemd units through `systemctl`; status via `systemctl is-active`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::agent::{Op, OpCode, OpResult};
use crate::run::{Exit, Invocation, run as run_helper};

pub(crate) async fn run(unit: &str, op: &Op, timeout: Duration) -> OpResult {
    let unit = full_unit_name(unit);
    let verb = match op {
        Op::Start => "start",
        Op::Stop => "stop",
        Op::Reload => "reload",
        Op::Monitor { .. } => "is-active",
        Op::ValidateAll => "cat",
        other => {
            return OpResult::new(OpCode::Unimplemented, Duration::ZERO)
                .note(format!("systemd units have no {} action", other.action()));
        }
    };
    let inv = Invocation {
        program: "systemctl".into(),
        args: vec![verb.into(), unit.into()],
        env: BTreeMap::new(),
        stdin: None,
    };
    let f = run_helper(&inv, timeout).await;
    match (op, &f.exit) {
        (Op::Monitor { .. }, Exit::Code(_)) => {
            let state = f.stdout.trim().to_string();
            let mut r = OpResult::from_finished(f, |_| active_state(&state));
            r.notes.push(format!("unit state: {state}"));
            r
        }
        // `systemctl cat` fails when no unit file exists.
        (Op::ValidateAll, Exit::Code(c)) if *c != 0 => {
            OpResult::from_finished(f, |_| OpCode::NotInstalled)
        }
        _ => OpResult::from_finished(f, |c| {
            if c == 0 {
                OpCode::Success
            } else {
                OpCode::Error
            }
        }),
    }
}

/// `systemctl` accepts bare names for services; be explicit so a name with a dot in it
/// (`my.app`) is not taken for another unit type.
fn full_unit_name(unit: &str) -> String {
    const TYPES: [&str; 6] = [
        ".service", ".socket", ".target", ".mount", ".timer", ".path",
    ];
    if TYPES.iter().any(|t| unit.ends_with(t)) {
        unit.to_string()
    } else {
        format!("{unit}.service")
    }
}

/// `systemctl is-active` output in OCF terms.
pub(crate) fn active_state(state: &str) -> OpCode {
    match state {
        "active" | "reloading" | "refreshing" => OpCode::Success,
        "inactive" | "deactivating" => OpCode::NotRunning,
        // failed, activating (stuck or crash-looping), unknown: needs the cluster's
        // attention rather than being taken for a clean stop.
        _ => OpCode::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_and_states() {
        assert_eq!(full_unit_name("nginx"), "nginx.service");
        assert_eq!(full_unit_name("my.app"), "my.app.service");
        assert_eq!(full_unit_name("x.socket"), "x.socket");
        assert_eq!(active_state("active"), OpCode::Success);
        assert_eq!(active_state("inactive"), OpCode::NotRunning);
        assert_eq!(active_state("failed"), OpCode::Error);
    }
}
