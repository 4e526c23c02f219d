//! Running things on a node: resource agents (OCF, LSB, systemd), supervised
//! processes, QEMU guests over QMP, and fence agents.
//!
//! This crate does the I/O the pure node agent (`haven_ha::agent`) and fencing
//! sequencer decide on. It holds no policy: every call gets its timeout from the
//! caller, and every outcome is returned, never acted on.
//!
//! # Resource operations
//!
//! [`run_op`]`(&`[`AgentSpec`]`, `[`Op`]`, timeout) -> `[`OpResult`] runs one operation.
//! The result's [`OpCode`] is the OCF exit code (`Success` = 0 … `FailedPromoted` = 9)
//! or what happened around the agent (`Timeout`, `SpawnFailed`, `Other`). It never
//! fails: bad configuration is `NotConfigured`/`InvalidArgs` with a note naming the
//! field. Classes ([`AgentClass`], parsed from `ocf:PROVIDER:TYPE`, `lsb:NAME`,
//! `systemd:UNIT`, `process`, `qemu`, `volume`):
//!
//! - **ocf** runs `OCF_ROOT/resource.d/PROVIDER/TYPE ACTION` with `OCF_RESKEY_<param>`,
//!   `OCF_RESKEY_CRM_meta_<meta>`, `..._timeout`/`..._interval` in milliseconds.
//! - **lsb** runs `/etc/init.d/NAME start|stop|status`; `status` 1–3 map to `NotRunning`.
//! - **systemd** runs `systemctl start|stop|reload`; monitor is `systemctl is-active`.
//! - **process** supervises `command` (see [`process`]): own process group, pidfile
//!   in the spec's `state_dir`, so a restarted agent finds it again.
//! - **qemu** is Haven's QEMU driver (see [`qemu`] for its parameters): start waits for
//!   QMP `running`, stop is ACPI power-down, then `quit`, then SIGKILL; live migration
//!   over TCP with a stall timeout.
//! - **volume** runs this node's replica of a replicated volume (see [`volume`]) for a
//!   promotable clone: monitor tells primary (`RunningPromoted`) from secondary, and
//!   promote carries the peers the cluster confirmed fenced.
//!
//! Helpers run in their own process group; on timeout the whole group is killed.
//! Output is kept up to [`OUTPUT_LIMIT`] bytes per stream.
//!
//! # Fencing
//!
//! [`run_fence`]`(&`[`FenceAgentSpec`]`, `[`FenceAction`]`, target, timeout) ->
//! `[`FenceResult`] runs a fence agent with the fence-agents stdin protocol. The
//! password comes from a [`Secret`] (file or script) at run time and is redacted from
//! the agent's output.

pub mod agent;
pub mod fence;
pub mod pidfile;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod volume;

mod lsb;
mod ocf;
mod run;
mod systemd;

pub use agent::{AgentClass, AgentClassError, AgentSpec, Migration, Op, OpCode, OpResult, run_op};
pub use fence::{
    FenceAction, FenceAgentSpec, FenceConfigError, FenceOutcome, FenceResult, PowerState, Secret,
    run_fence,
};
pub use run::OUTPUT_LIMIT;

/// The daemon runs operations on tokio tasks: the futures must be `Send`.
#[cfg(test)]
mod send_check {
    fn is_send<T: Send>(_: &T) {}

    #[test]
    fn operation_futures_are_send() {
        let spec = crate::AgentSpec::new("x", crate::AgentClass::Qemu, "/nonexistent");
        is_send(&crate::run_op(
            &spec,
            crate::Op::Start,
            std::time::Duration::ZERO,
        ));
        let fence = crate::FenceAgentSpec::new("fence_dummy");
        is_send(&crate::run_fence(
            &fence,
            crate::FenceAction::Status,
            "n1",
            std::time::Duration::ZERO,
        ));
    }
}
