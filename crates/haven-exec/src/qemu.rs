//! placeholder
use crate::agent::{AgentSpec, Op, OpCode, OpResult};
use std::time::Duration;
pub(crate) async fn run(_spec: &AgentSpec, _op: &Op, _timeout: Duration) -> OpResult {
    OpResult::new(OpCode::Unimplemented, Duration::ZERO)
}
