//! What a node does on its own when it loses quorum: no-quorum-policy.
//!
//! The quorate side may recover a lost node's resources once it is fenced — or, with a
//! watchdog as its fence device, once the node's lease plus a margin has passed without
//! a word from it. For that to be safe, the cut-off node must have stopped (or reset
//! itself) by the end of its lease, counted from the last moment it knew it was
//! quorate. This machine decides when; the daemon does it and feeds the watchdog only
//! while this machine says so.
//!
//! A watch starts without a lease: a node that (re)starts has no idea how long it has
//! been cut off, so it starts nothing and feeds no watchdog until it has been part of a
//! quorate partition, and acts on its policy at once if it is not.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::membership::Timeouts;
use crate::time::Time;

/// A node's lease: how long it may keep running after it last knew it was quorate.
/// Twice the failure-detection time, so it is over before the quorate side has both
/// declared the node lost and waited out a watchdog.
pub fn lease(timeouts: Timeouts) -> Duration {
    timeouts.dead_after * 2
}

/// What the quorate side adds to a lost node's lease (and its hardware watchdog's
/// timeout) before it counts a watchdog as having fired: the node's own view of quorum
/// lags the others' by up to a detection time of its own, plus scheduling slack.
pub const WATCHDOG_MARGIN: Duration = Duration::from_secs(1);

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
    /// The last moment this node knew it was quorate; `None` until it first does.
    last_quorate: Option<Time>,
    quorate: bool,
    acted: bool,
    actions: Vec<QuorumAction>,
}

impl QuorumWatch {
    /// A watch with no lease: not quorate until `handle_quorum(true)`.
    pub fn new(policy: NoQuorumPolicy, lease: Duration) -> Self {
        QuorumWatch {
            policy,
            lease,
            last_quorate: None,
            quorate: false,
            acted: false,
            actions: Vec::new(),
        }
    }

    /// A watch that keeps the lease of `previous` (the policy changed, the node did not
    /// restart).
    pub fn with_policy(previous: &QuorumWatch, policy: NoQuorumPolicy) -> Self {
        QuorumWatch {
            policy,
            actions: Vec::new(),
            ..previous.clone()
        }
    }

    fn lease_over(&self, now: Time) -> bool {
        self.last_quorate.is_none_or(|t| now >= t + self.lease)
    }

    /// The node's current knowledge: is it part of a quorate partition?
    pub fn handle_quorum(&mut self, quorate: bool, now: Time) {
        if quorate {
            self.last_quorate = Some(now);
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
        if !self.lease_over(now) {
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
    /// Never before the node was first quorate: feeding would give it a lease.
    pub fn may_feed_watchdog(&self, now: Time) -> bool {
        self.quorate || (self.last_quorate.is_some() && !self.lease_over(now))
    }

    /// Whether this node may start anything: it holds a lease.
    pub fn has_lease(&self, now: Time) -> bool {
        self.may_feed_watchdog(now) || self.policy == NoQuorumPolicy::Ignore
    }

    pub fn poll_action(&mut self) -> Option<QuorumAction> {
        if self.actions.is_empty() {
            None
        } else {
            Some(self.actions.remove(0))
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        if self.quorate || self.acted {
            return None;
        }
        Some(self.last_quorate.map_or(Time::ZERO, |t| t + self.lease))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_policy_stops_at_the_end_of_the_lease_counted_from_last_quorate() {
        let mut q = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2));
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
            let mut q = QuorumWatch::new(policy, Duration::from_secs(1));
            q.handle_quorum(true, Time(0));
            q.handle_quorum(false, Time(0));
            q.handle_timeout(Time(1_000));
            assert_eq!(q.poll_action(), expect, "{policy:?}");
        }
    }

    #[test]
    fn a_restarted_node_has_no_lease_until_it_is_quorate() {
        // Restarted on the minority side: no fresh lease, so it acts at once and never
        // feeds its watchdog or starts anything.
        let mut q = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2));
        assert!(!q.may_feed_watchdog(Time(50_000)));
        assert!(!q.has_lease(Time(50_000)));
        q.handle_quorum(false, Time(50_000));
        assert_eq!(q.poll_action(), Some(QuorumAction::StopAll));
        assert!(!q.may_feed_watchdog(Time(50_001)));
        q.handle_quorum(true, Time(51_000));
        assert_eq!(q.poll_action(), Some(QuorumAction::Resume));
        assert!(q.may_feed_watchdog(Time(51_000)) && q.has_lease(Time(51_000)));
        // A policy change keeps the lease it has, and gives none.
        let mut fresh = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2));
        fresh = QuorumWatch::with_policy(&fresh, NoQuorumPolicy::Freeze);
        assert!(!fresh.has_lease(Time(0)));
        let kept = QuorumWatch::with_policy(&q, NoQuorumPolicy::Freeze);
        assert!(kept.has_lease(Time(51_500)));
    }

    #[test]
    fn brief_loss_within_the_lease_does_nothing() {
        let mut q = QuorumWatch::new(NoQuorumPolicy::Stop, Duration::from_secs(2));
        q.handle_quorum(true, Time(0));
        q.handle_quorum(false, Time(100));
        q.handle_quorum(true, Time(1_900));
        q.handle_timeout(Time(5_000));
        assert_eq!(q.poll_action(), None);
    }
}
