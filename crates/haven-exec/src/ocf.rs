//! OCF resource agents: `OCF_ROOT/resource.d/PROVIDER/TYPE ACTION`, configured through
//! the environment.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::agent::{AgentSpec, Op, OpCode, OpResult};
use crate::run::{Invocation, run as run_helper};

pub(crate) async fn run(
    spec: &AgentSpec,
    provider: &str,
    kind: &str,
    op: &Op,
    timeout: Duration,
) -> OpResult {
    let env = match environment(spec, provider, kind, op, timeout) {
        Ok(env) => env,
        Err(note) => return OpResult::new(OpCode::NotConfigured, Duration::ZERO).note(note),
    };
    let program = spec.ocf_root.join("resource.d").join(provider).join(kind);
    if !program.is_file() {
        return OpResult::new(OpCode::NotInstalled, Duration::ZERO)
            .note(format!("OCF agent {} is not installed", program.display()));
    }
    let inv = Invocation {
        program,
        args: vec![op.action().into()],
        env,
        stdin: None,
    };
    OpResult::from_finished(run_helper(&inv, timeout).await, OpCode::from_exit_code)
}

/// The environment an OCF agent reads its instructions from.
fn environment(
    spec: &AgentSpec,
    provider: &str,
    kind: &str,
    op: &Op,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    env.insert("OCF_ROOT".into(), spec.ocf_root.display().to_string());
    env.insert("OCF_RA_VERSION_MAJOR".into(), "1".into());
    env.insert("OCF_RA_VERSION_MINOR".into(), "1".into());
    env.insert("OCF_RESOURCE_INSTANCE".into(), spec.instance.clone());
    env.insert("OCF_RESOURCE_PROVIDER".into(), provider.into());
    env.insert("OCF_RESOURCE_TYPE".into(), kind.into());
    for (k, v) in &spec.params {
        env_name("parameter", k)?;
        env.insert(format!("OCF_RESKEY_{k}"), v.clone());
    }
    for (k, v) in &spec.meta {
        env_name("meta attribute", k)?;
        env.insert(format!("OCF_RESKEY_CRM_meta_{k}"), v.clone());
    }
    env.insert(
        "OCF_RESKEY_CRM_meta_timeout".into(),
        timeout.as_millis().to_string(),
    );
    let interval = match op {
        Op::Monitor { interval } => interval.as_millis(),
        _ => 0,
    };
    env.insert("OCF_RESKEY_CRM_meta_interval".into(), interval.to_string());
    match op {
        Op::MigrateTo(m) => {
            env.insert("OCF_RESKEY_CRM_meta_migrate_target".into(), m.peer.clone());
        }
        Op::MigrateFrom(m) => {
            env.insert("OCF_RESKEY_CRM_meta_migrate_source".into(), m.peer.clone());
        }
        _ => {}
    }
    Ok(env)
}

/// Names become part of environment variable names, which shells only accept this way.
pub(crate) fn env_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?}: names may contain only ASCII letters, digits and '_', and must not start with a digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentClass, Migration};

    fn spec() -> AgentSpec {
        AgentSpec::new(
            "r1",
            "ocf:heartbeat:Dummy".parse::<AgentClass>().unwrap(),
            "/tmp",
        )
        .param("state", "/tmp/x")
    }

    #[test]
    fn environment_carries_params_meta_and_timing() {
        let op = Op::Monitor {
            interval: Duration::from_secs(10),
        };
        let env = environment(&spec(), "heartbeat", "Dummy", &op, Duration::from_secs(20)).unwrap();
        assert_eq!(env["OCF_RESKEY_state"], "/tmp/x");
        assert_eq!(env["OCF_RESOURCE_INSTANCE"], "r1");
        assert_eq!(env["OCF_RESKEY_CRM_meta_timeout"], "20000");
        assert_eq!(env["OCF_RESKEY_CRM_meta_interval"], "10000");
        let m = Migration {
            peer: "n2".into(),
            address: "127.0.0.1:4444".into(),
        };
        let env = environment(
            &spec(),
            "heartbeat",
            "Dummy",
            &Op::MigrateTo(m),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(env["OCF_RESKEY_CRM_meta_migrate_target"], "n2");
    }

    #[test]
    fn a_parameter_name_unfit_for_the_environment_is_refused() {
        let s = spec().param("bad-name", "x");
        let e =
            environment(&s, "heartbeat", "Dummy", &Op::Start, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("\"bad-name\""), "{e}");
    }
}
