//! The node agent: runs the operations the coordinator asks for, one at a time per
//! resource, and keeps recurring monitors going for what runs here.
//!
//! It is the pure half of Pacemaker's executor (lrmd): it decides *what* to run and
//! *when*; the daemon runs it (haven-exec) and feeds the outcome back. Requested
//! operations are always reported; recurring monitors are reported only when their
//! outcome changes, so a healthy cluster is quiet.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::time::Time;

/// An operation on a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Start,
    Stop,
    /// A one-off status check (Pacemaker's probe, or a recurring monitor's run).
    Monitor,
    Promote,
    Demote,
    MigrateTo,
    MigrateFrom,
}

/// How an operation ended, reduced to what the cluster decides on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpOutcome {
    /// Success; for a monitor: running (unpromoted).
    Ok,
    /// For a monitor: cleanly not running.
    NotRunning,
    /// For a monitor: running promoted.
    RunningPromoted,
    /// Failed with the agent's exit code and a short reason.
    Failed { rc: i32, reason: String },
    /// Did not finish within its timeout (and was killed).
    TimedOut,
}

/// An operation the coordinator wants run on this node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpRequest {
    /// The coordinator's sequence number; the report carries it back.
    pub seq: u64,
    pub resource: String,
    pub op: OpKind,
    pub timeout: Duration,
    /// After a successful start/promote/demote/migrate_from, monitor at this interval.
    pub monitor_interval: Option<Duration>,
    /// Timeout of each recurring monitor run.
    pub monitor_timeout: Duration,
    /// The peer node of a migration.
    pub peer: Option<String>,
    /// For a promote: the nodes the coordinator knows are down (fenced, or assumed down
    /// with stonith disabled). A replicated volume may be promoted without reaching
    /// these peers (DRBD's resource-and-stonith), and only these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
}

/// What the agent tells the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpReport {
    /// The request's sequence number; `None` for a recurring monitor.
    pub seq: Option<u64>,
    pub resource: String,
    pub op: OpKind,
    pub outcome: OpOutcome,
    pub at: Time,
}

/// What the agent wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// Run `op` on `resource`; answer with `handle_op_done(token, ..)`.
    Run {
        token: u64,
        resource: String,
        op: OpKind,
        timeout: Duration,
        peer: Option<String>,
        /// [`OpRequest::fenced`], for a promote.
        fenced: Vec<String>,
        /// A recurring monitor's interval; `None` for a probe and every other operation
        /// (OCF agents tell the two apart by it).
        interval: Option<Duration>,
    },
    /// Send this report to the coordinator.
    Report(OpReport),
}

#[derive(Clone, Debug)]
struct Monitor {
    interval: Duration,
    timeout: Duration,
    due: Time,
    /// The last outcome seen; starts as the healthy one (Ok, or RunningPromoted when
    /// promoted) so only a change is reported.
    last: Option<OpOutcome>,
}

#[derive(Clone, Debug)]
enum Running {
    Requested(OpRequest),
    RecurringMonitor,
}

#[derive(Clone, Debug, Default)]
struct ResourceSlot {
    busy: Option<(u64, Running)>,
    queue: VecDeque<OpRequest>,
    monitor: Option<Monitor>,
}

/// Sans-IO node agent.
#[derive(Clone, Debug, Default)]
pub struct NodeAgent {
    resources: BTreeMap<String, ResourceSlot>,
    next_token: u64,
    commands: VecDeque<AgentCommand>,
}

impl NodeAgent {
    pub fn new() -> Self {
        Self::default()
    }

    /// The coordinator asks for an operation. It runs when the resource's previous
    /// operation has finished: an agent must never run two at once on one resource.
    pub fn handle_request(&mut self, req: OpRequest, now: Time) {
        let slot = self.resources.entry(req.resource.clone()).or_default();
        slot.queue.push_back(req);
        self.dispatch(now);
    }

    /// An operation started by `AgentCommand::Run { token, .. }` ended.
    pub fn handle_op_done(&mut self, token: u64, outcome: OpOutcome, now: Time) {
        let Some((name, slot)) = self
            .resources
            .iter_mut()
            .find(|(_, s)| s.busy.as_ref().is_some_and(|(t, _)| *t == token))
        else {
            return; // stale token: the slot was reset meanwhile
        };
        let Some((_, running)) = slot.busy.take() else {
            return;
        };
        match running {
            Running::Requested(req) => {
                Self::after_request(slot, &req, &outcome, now);
                self.commands.push_back(AgentCommand::Report(OpReport {
                    seq: Some(req.seq),
                    resource: name.clone(),
                    op: req.op,
                    outcome,
                    at: now,
                }));
            }
            Running::RecurringMonitor => {
                if let Some(m) = slot.monitor.as_mut() {
                    let changed = m.last.as_ref() != Some(&outcome);
                    m.last = Some(outcome.clone());
                    m.due = now + m.interval;
                    // Healthy results are only news when they end a failure; a failing
                    // monitor keeps running so the coordinator also learns when the
                    // resource comes back by itself. Recovery is its decision.
                    if changed {
                        self.commands.push_back(AgentCommand::Report(OpReport {
                            seq: None,
                            resource: name.clone(),
                            op: OpKind::Monitor,
                            outcome,
                            at: now,
                        }));
                    }
                }
            }
        }
        self.dispatch(now);
    }

    fn after_request(slot: &mut ResourceSlot, req: &OpRequest, outcome: &OpOutcome, now: Time) {
        let succeeded = *outcome == OpOutcome::Ok;
        let expect = match req.op {
            OpKind::Start | OpKind::MigrateFrom | OpKind::Demote if succeeded => {
                Some(OpOutcome::Ok)
            }
            OpKind::Promote if succeeded => Some(OpOutcome::RunningPromoted),
            OpKind::Stop | OpKind::MigrateTo if succeeded => {
                slot.monitor = None;
                None
            }
            // A probe that finds the resource active (after a restart of this daemon,
            // a new coordinator, a node joining) keeps watching it as a start would:
            // otherwise a later failure there would go unseen.
            OpKind::Monitor => match outcome {
                OpOutcome::Ok | OpOutcome::RunningPromoted => Some(outcome.clone()),
                OpOutcome::NotRunning => {
                    slot.monitor = None;
                    None
                }
                _ => None,
            },
            _ => None,
        };
        if let (Some(expect), Some(interval)) = (expect, req.monitor_interval) {
            slot.monitor = Some(Monitor {
                interval,
                timeout: req.monitor_timeout,
                due: now + interval,
                last: Some(expect),
            });
        }
    }

    /// Runs recurring monitors that are due.
    pub fn handle_timeout(&mut self, now: Time) {
        self.dispatch(now);
    }

    /// Forgets every resource: after the node was fenced or its agent restarted, the
    /// coordinator re-probes and re-requests.
    pub fn reset(&mut self) {
        self.resources.clear();
    }

    fn dispatch(&mut self, now: Time) {
        for (name, slot) in &mut self.resources {
            if slot.busy.is_some() {
                continue;
            }
            if let Some(req) = slot.queue.pop_front() {
                let token = self.next_token;
                self.next_token += 1;
                self.commands.push_back(AgentCommand::Run {
                    token,
                    resource: name.clone(),
                    op: req.op,
                    timeout: req.timeout,
                    peer: req.peer.clone(),
                    fenced: req.fenced.clone(),
                    interval: None,
                });
                slot.busy = Some((token, Running::Requested(req)));
            } else if let Some(m) = slot.monitor.as_ref().filter(|m| m.due <= now) {
                let token = self.next_token;
                self.next_token += 1;
                self.commands.push_back(AgentCommand::Run {
                    token,
                    resource: name.clone(),
                    op: OpKind::Monitor,
                    timeout: m.timeout,
                    peer: None,
                    fenced: Vec::new(),
                    interval: Some(m.interval),
                });
                slot.busy = Some((token, Running::RecurringMonitor));
            }
        }
    }

    pub fn poll_command(&mut self) -> Option<AgentCommand> {
        self.commands.pop_front()
    }

    /// When the next recurring monitor is due.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.resources
            .values()
            .filter(|s| s.busy.is_none())
            .filter_map(|s| s.monitor.as_ref().map(|m| m.due))
            .min()
    }

    /// Resources with a recurring monitor, i.e. believed active here.
    pub fn monitored(&self) -> impl Iterator<Item = &str> {
        self.resources
            .iter()
            .filter(|(_, s)| s.monitor.is_some())
            .map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(seq: u64, resource: &str, op: OpKind) -> OpRequest {
        OpRequest {
            seq,
            resource: resource.into(),
            op,
            timeout: Duration::from_secs(20),
            monitor_interval: Some(Duration::from_secs(10)),
            monitor_timeout: Duration::from_secs(5),
            peer: None,
            fenced: Vec::new(),
        }
    }

    fn drain(a: &mut NodeAgent) -> Vec<AgentCommand> {
        std::iter::from_fn(|| a.poll_command()).collect()
    }

    fn token_of(cmds: &[AgentCommand]) -> u64 {
        cmds.iter()
            .find_map(|c| match c {
                AgentCommand::Run { token, .. } => Some(*token),
                AgentCommand::Report(_) => None,
            })
            .unwrap_or(u64::MAX)
    }

    #[test]
    fn operations_on_one_resource_are_serialised() {
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "vm1", OpKind::Start), Time(0));
        a.handle_request(req(2, "vm1", OpKind::Stop), Time(0));
        let cmds = drain(&mut a);
        assert_eq!(cmds.len(), 1, "stop must wait for start: {cmds:?}");
        a.handle_op_done(token_of(&cmds), OpOutcome::Ok, Time(100));
        let cmds = drain(&mut a);
        assert!(matches!(&cmds[0], AgentCommand::Report(r) if r.seq == Some(1)));
        assert!(matches!(
            &cmds[1],
            AgentCommand::Run {
                op: OpKind::Stop,
                ..
            }
        ));
    }

    #[test]
    fn start_arms_a_monitor_that_reports_only_changes() {
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "vm1", OpKind::Start), Time(0));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(0));
        drain(&mut a);
        assert_eq!(a.poll_timeout(), Some(Time(10_000)));
        a.handle_timeout(Time(10_000));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(10_010));
        assert!(drain(&mut a).is_empty(), "a healthy monitor is quiet");
        a.handle_timeout(Time(20_010));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::NotRunning, Time(20_020));
        let cmds = drain(&mut a);
        assert!(matches!(&cmds[..], [AgentCommand::Report(r)]
            if r.seq.is_none() && r.outcome == OpOutcome::NotRunning));
    }

    #[test]
    fn recurring_monitors_carry_their_interval_and_probes_none() {
        let interval = |cmds: &[AgentCommand]| {
            cmds.iter().find_map(|c| match c {
                AgentCommand::Run { op, interval, .. } => Some((*op, *interval)),
                AgentCommand::Report(_) => None,
            })
        };
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "vm1", OpKind::Monitor), Time(0));
        let cmds = drain(&mut a);
        assert_eq!(interval(&cmds), Some((OpKind::Monitor, None)), "a probe");
        a.handle_op_done(token_of(&cmds), OpOutcome::NotRunning, Time(1));
        drain(&mut a);
        a.handle_request(req(2, "vm1", OpKind::Start), Time(2));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(3));
        drain(&mut a);
        a.handle_timeout(Time(10_003));
        assert_eq!(
            interval(&drain(&mut a)),
            Some((OpKind::Monitor, Some(Duration::from_secs(10))))
        );
    }

    #[test]
    fn a_probe_that_finds_it_running_keeps_watching_it() {
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "vm1", OpKind::Monitor), Time(0));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::RunningPromoted, Time(1));
        drain(&mut a);
        assert_eq!(a.monitored().collect::<Vec<_>>(), ["vm1"]);
        a.handle_timeout(Time(10_001));
        let t = token_of(&drain(&mut a));
        // Still promoted: quiet. Gone: reported without being asked.
        a.handle_op_done(t, OpOutcome::RunningPromoted, Time(10_002));
        assert!(drain(&mut a).is_empty());
        a.handle_timeout(Time(20_002));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::NotRunning, Time(20_003));
        assert!(matches!(&drain(&mut a)[..], [AgentCommand::Report(r)]
            if r.seq.is_none() && r.outcome == OpOutcome::NotRunning));
        // A probe that finds nothing watches nothing.
        a.handle_request(req(2, "vm1", OpKind::Monitor), Time(30_000));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::NotRunning, Time(30_001));
        drain(&mut a);
        assert_eq!(a.monitored().count(), 0);
    }

    #[test]
    fn stop_cancels_the_monitor() {
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "vm1", OpKind::Start), Time(0));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(0));
        a.handle_request(req(2, "vm1", OpKind::Stop), Time(5));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(10));
        assert_eq!(a.poll_timeout(), None);
        assert_eq!(a.monitored().count(), 0);
    }

    #[test]
    fn promoted_resource_expects_running_promoted() {
        let mut a = NodeAgent::new();
        a.handle_request(req(1, "db", OpKind::Promote), Time(0));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::Ok, Time(0));
        drain(&mut a);
        a.handle_timeout(Time(10_000));
        let t = token_of(&drain(&mut a));
        a.handle_op_done(t, OpOutcome::RunningPromoted, Time(10_000));
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn stale_token_is_ignored() {
        let mut a = NodeAgent::new();
        a.handle_op_done(42, OpOutcome::Ok, Time(0));
        assert!(drain(&mut a).is_empty());
    }
}
