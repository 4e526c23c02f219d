//! What a node does on its own when it loses quorum: no-quorum-policy.
//!
//! The quorate side may recover a lost node's resources once it is fenced — or, with a
//! watchdog as its fence device, once the node's lease plus a margin has passed without
//! a word from it. For that to be safe, the cut-off node must have stopped (or reset
//! itself) by the end of its lease, counted from the last moment it knew it was
//! quorate. This machine decides when; the daemon does it and feeds the watchdog only
//! while this machine says so.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Time;

/// Pacemaker's no-quorum-policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoQuorumPolicy {
    /// Stop every resource (the default).
    #[default]
    Stop,
    /// Keep what runs, start nothing new.
    Freeze,
    /// Keep running as if quorate (two-node clusters with fencing only).
    Ignore,
    /// Reset the node (self-fence).
    Suicide,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuorumAction {
    /// Stop every resource on this node now.
    StopAll,
    /// Refuse new starts until quorum returns.
    Freeze,
    /// Reset this node (stop feeding the watchdog, or reboot).
    SelfFence,
    /// Quorum is back: normal operation.
    Resume,
}

/// Sans-IO quorum watch of one node.
#[derive(Clone, Debug)]
pub struct QuorumWatch {
    policy: NoQuorumPolicy,
    lease: Duration,
    /// The last moment this node knew it was quorate.
    last_quorate: Time,
    quorate: bool,
    acted: bool,
    actions: Vec<QuorumAction>,
}

impl QuorumWatch {
    pub fn new(policy: NoQuorumPolicy, lease: Duration, now: Time) -> Self {
        QuorumWatch {
            policy,
            lease,
            last_quorate: now,
            quorate: true,
            acted: false,
            actions: Vec::new(),
        }
    }

    /// The node's current knowledge: is it part of a quorate partition?
    pub fn handle_quorum(&mut self, quorate: bool, now: Time) {
        if quorate {
            self.last_quorate = now;
            if !self.quorate && self.acted {
                self.actions.push(QuorumAction::Resume);
            }
            self.quorate = true;
            self.acted = false;
        } else {
            self.quorate = false;
        }
        self.handle_timeout(now);
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if self.quorate || self.acted {
            return;
        }
        if now < self.last_quorate + self.lease {
            return;
        }
        self.acted = true;
        match self.policy {
            NoQuorumPolicy::Stop => self.actions.push(QuorumAction::StopAll),
            NoQuorumPolicy::Freeze => self.actions.push(QuorumAction::Freeze),
            NoQuorumPolicy::Suicide => self.actions.push(QuorumAction::SelfFence),
            NoQuorumPolicy::Ignore => {}
        }
    }

    /// Whether the watchdog may be fed now: while quorate, and until the lease ends.
    pub fn may_feed_watchdog(&self, now: Time) -> bool {
        self.quorate
            || self.policy == NoQuorumPolicy::Ignore
            || now < self.last_quorate + self.lease
    }

    pub fn poll_action(&mut self) -> Option<QuorumAction> {
        if self.actions.is_empty() {
            None
        } else {
            Some(self.actions.remove(0))
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        (!self.quorate && !self.acted).then(|| self.last_quorate + self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_policy_stops_at_the_end_of_the_lease_counted_from_last_quorate() {
        let mut q = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2), Time(0));
        q.handle_quorum(true, Time(1_000));
        q.handle_quorum(false, Time(1_500));
        assert_eq!(q.poll_timeout(), Some(Time(3_000)));
        q.handle_timeout(Time(2_999));
        assert_eq!(q.poll_action(), None);
        assert!(q.may_feed_watchdog(Time(2_999)));
        q.handle_timeout(Time(3_000));
        assert_eq!(q.poll_action(), Some(QuorumAction::StopAll));
        assert!(!q.may_feed_watchdog(Time(3_000)));
        q.handle_timeout(Time(9_000));
        assert_eq!(q.poll_action(), None, "acts once per loss");
        q.handle_quorum(true, Time(10_000));
        assert_eq!(q.poll_action(), Some(QuorumAction::Resume));
    }

    #[test]
    fn each_policy_acts_as_named() {
        for (policy, expect) in [
            (NoQuorumPolicy::Freeze, Some(QuorumAction::Freeze)),
            (NoQuorumPolicy::Suicide, Some(QuorumAction::SelfFence)),
            (NoQuorumPolicy::Ignore, None),
        ] {
            let mut q = QuorumWatch::new(policy, Duration::from_secs(1), Time(0));
            q.handle_quorum(false, Time(0));
            q.handle_timeout(Time(1_000));
            assert_eq!(q.poll_action(), expect, "{policy:?}");
        }
    }

    #[test]
    fn brief_loss_within_the_lease_does_nothing() {
        let mut q = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2), Time(0));
        q.handle_quorum(false, Time(100));
        q.handle_quorum(true, Time(1_900));
        q.handle_timeout(Time(5_000));
        assert_eq!(q.poll_action(), None);
    }
}
