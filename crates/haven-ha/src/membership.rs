//! Failure detection: which nodes are alive, judged from heartbeats on every link.
//!
//! A node is alive while any of its links has carried a heartbeat within `dead_after`.
//! Losing one link is reported but is not a node failure — that is why the seeds run a
//! separate heartbeat network. A node never heard since this detector started watching
//! it is `Pending` until one `dead_after` has passed, so a freshly elected coordinator
//! does not declare the whole cluster dead before it has had a chance to hear it, nor
//! a node that has just joined before its daemon could send a first heartbeat.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::time::Time;

/// How quickly a silent node or link is declared down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How often nodes send heartbeats on each link.
    pub heartbeat_interval: Duration,
    /// Silence after which a link (and, with all links silent, the node) is down.
    pub dead_after: Duration,
}

impl Default for Timeouts {
    /// About a second to detect a dead node on a LAN (issue 3).
    fn default() -> Self {
        Timeouts {
            heartbeat_interval: Duration::from_millis(200),
            dead_after: Duration::from_millis(1000),
        }
    }
}

/// What the detector believes about a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Not heard yet, and the start-up grace period is not over.
    Pending,
    /// Heard on at least one link within `dead_after`.
    Alive,
    /// Silent on every link for `dead_after` (since the given time).
    Lost { since: Time },
}

/// A change the detector noticed, in the order it noticed them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    NodeAlive { node: String },
    NodeLost { node: String },
    LinkUp { node: String, link: String },
    LinkDown { node: String, link: String },
}

#[derive(Clone, Debug)]
struct LinkHealth {
    last_heard: Option<Time>,
    up: bool,
}

#[derive(Clone, Debug)]
struct NodeHealth {
    links: BTreeMap<String, LinkHealth>,
    liveness: Liveness,
    /// When this detector started watching the node: its grace runs from here.
    watched_since: Time,
}

/// Sans-IO failure detector: `handle_*` feeds it, `poll_*` drains it.
#[derive(Clone, Debug)]
pub struct Membership {
    timeouts: Timeouts,
    /// The latest time it was fed: when a node added now starts being watched.
    latest: Time,
    nodes: BTreeMap<String, NodeHealth>,
    events: VecDeque<MembershipEvent>,
}

impl Membership {
    /// A detector that starts watching at `now`. The local node should be registered
    /// and fed its own heartbeats like any other (it is trivially alive).
    pub fn new(timeouts: Timeouts, now: Time) -> Self {
        Membership {
            timeouts,
            latest: now,
            nodes: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Sets the nodes and links to watch. Nodes and links no longer listed are
    /// forgotten; new ones start `Pending` / down, with a grace from the latest time
    /// the detector was fed.
    pub fn set_members<'a>(&mut self, members: impl IntoIterator<Item = (&'a str, Vec<String>)>) {
        let mut next = BTreeMap::new();
        for (name, links) in members {
            let mut health = self.nodes.remove(name).unwrap_or(NodeHealth {
                links: BTreeMap::new(),
                liveness: Liveness::Pending,
                watched_since: self.latest,
            });
            let mut kept = BTreeMap::new();
            for link in links {
                let h = health.links.remove(&link).unwrap_or(LinkHealth {
                    last_heard: None,
                    up: false,
                });
                kept.insert(link, h);
            }
            health.links = kept;
            next.insert(name.to_string(), health);
        }
        self.nodes = next;
    }

    /// A heartbeat from `node` arrived over `link` at `now`.
    pub fn handle_heartbeat(&mut self, node: &str, link: &str, now: Time) {
        self.latest = self.latest.max(now);
        let Some(health) = self.nodes.get_mut(node) else {
            return; // not a member (yet): ignore rather than trust it
        };
        let Some(l) = health.links.get_mut(link) else {
            return;
        };
        l.last_heard = Some(now);
        if !l.up {
            l.up = true;
            self.events.push_back(MembershipEvent::LinkUp {
                node: node.to_string(),
                link: link.to_string(),
            });
        }
        if health.liveness != Liveness::Alive {
            health.liveness = Liveness::Alive;
            self.events.push_back(MembershipEvent::NodeAlive {
                node: node.to_string(),
            });
        }
    }

    /// Re-evaluates every link and node at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.latest = self.latest.max(now);
        let dead_after = self.timeouts.dead_after;
        for (name, health) in &mut self.nodes {
            let grace_over = now.saturating_since(health.watched_since) >= dead_after;
            let mut any_up = false;
            let mut latest: Option<Time> = None;
            for (link, l) in &mut health.links {
                let fresh = l
                    .last_heard
                    .is_some_and(|t| now.saturating_since(t) < dead_after);
                latest = latest.max(l.last_heard);
                if l.up && !fresh {
                    l.up = false;
                    self.events.push_back(MembershipEvent::LinkDown {
                        node: name.clone(),
                        link: link.clone(),
                    });
                }
                any_up |= fresh;
            }
            let lost = match health.liveness {
                Liveness::Alive => !any_up,
                Liveness::Pending => grace_over && !any_up,
                Liveness::Lost { .. } => false,
            };
            if lost {
                let since = latest.map_or(health.watched_since, |t| t + dead_after);
                health.liveness = Liveness::Lost { since };
                self.events
                    .push_back(MembershipEvent::NodeLost { node: name.clone() });
            }
        }
    }

    /// The next time `handle_timeout` may change something.
    pub fn poll_timeout(&self) -> Option<Time> {
        let dead_after = self.timeouts.dead_after;
        let mut next: Option<Time> = None;
        for health in self.nodes.values() {
            if health.liveness == Liveness::Pending {
                let t = health.watched_since + dead_after;
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            for l in health.links.values() {
                if let (true, Some(heard)) = (l.up, l.last_heard) {
                    let t = heard + dead_after;
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        next
    }

    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    pub fn liveness(&self, node: &str) -> Option<Liveness> {
        self.nodes.get(node).map(|h| h.liveness)
    }

    /// Each link of `node` and whether it is up.
    pub fn links(&self, node: &str) -> Vec<(String, bool)> {
        self.nodes
            .get(node)
            .map(|h| h.links.iter().map(|(k, l)| (k.clone(), l.up)).collect())
            .unwrap_or_default()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&str, Liveness)> {
        self.nodes.iter().map(|(k, h)| (k.as_str(), h.liveness))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Time {
        Time(v)
    }

    fn detector() -> Membership {
        let mut m = Membership::new(Timeouts::default(), ms(0));
        m.set_members([
            ("n1", vec!["ring0".to_string(), "ring1".to_string()]),
            ("n2", vec!["ring0".to_string(), "ring1".to_string()]),
        ]);
        m
    }

    fn drain(m: &mut Membership) -> Vec<MembershipEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    #[test]
    fn silent_node_is_pending_until_grace_then_lost() {
        let mut m = detector();
        m.handle_heartbeat("n1", "ring0", ms(100));
        m.handle_timeout(ms(500));
        assert_eq!(m.liveness("n2"), Some(Liveness::Pending));
        m.handle_timeout(ms(1000));
        assert_eq!(m.liveness("n2"), Some(Liveness::Lost { since: ms(0) }));
        assert_eq!(m.liveness("n1"), Some(Liveness::Alive));
        let ev = drain(&mut m);
        assert!(ev.contains(&MembershipEvent::NodeLost { node: "n2".into() }));
        assert!(!ev.contains(&MembershipEvent::NodeLost { node: "n1".into() }));
    }

    #[test]
    fn a_node_added_later_gets_its_own_grace() {
        let mut m = detector();
        m.handle_heartbeat("n1", "ring0", ms(5000));
        m.handle_timeout(ms(5000));
        let mut members: Vec<(&str, Vec<String>)> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| (*n, vec!["ring0".to_string()]))
            .collect();
        m.set_members(members.drain(..));
        m.handle_timeout(ms(5100));
        assert_eq!(m.liveness("n3"), Some(Liveness::Pending));
        assert_eq!(m.poll_timeout(), Some(ms(6000)));
        m.handle_timeout(ms(6000));
        assert_eq!(m.liveness("n3"), Some(Liveness::Lost { since: ms(5000) }));
    }

    #[test]
    fn one_link_down_is_not_a_node_failure() {
        let mut m = detector();
        for t in (0..3000).step_by(200) {
            m.handle_heartbeat("n1", "ring0", ms(t));
            m.handle_heartbeat("n2", "ring0", ms(t));
            if t < 400 {
                m.handle_heartbeat("n2", "ring1", ms(t));
            }
            m.handle_timeout(ms(t));
        }
        assert_eq!(m.liveness("n2"), Some(Liveness::Alive));
        assert_eq!(
            m.links("n2"),
            vec![("ring0".to_string(), true), ("ring1".to_string(), false)]
        );
        let ev = drain(&mut m);
        assert!(ev.contains(&MembershipEvent::LinkDown {
            node: "n2".into(),
            link: "ring1".into()
        }));
    }

    #[test]
    fn node_silent_on_all_links_is_lost_after_dead_after_and_returns() {
        let mut m = detector();
        m.handle_heartbeat("n2", "ring0", ms(0));
        m.handle_heartbeat("n2", "ring1", ms(0));
        assert_eq!(m.poll_timeout(), Some(ms(1000)));
        m.handle_timeout(ms(999));
        assert_eq!(m.liveness("n2"), Some(Liveness::Alive));
        m.handle_timeout(ms(1000));
        assert_eq!(m.liveness("n2"), Some(Liveness::Lost { since: ms(1000) }));
        m.handle_heartbeat("n2", "ring1", ms(5000));
        assert_eq!(m.liveness("n2"), Some(Liveness::Alive));
    }

    #[test]
    fn heartbeat_from_unknown_node_or_link_is_ignored() {
        let mut m = detector();
        m.handle_heartbeat("intruder", "ring0", ms(0));
        m.handle_heartbeat("n1", "ring9", ms(0));
        assert_eq!(m.liveness("intruder"), None);
        assert_eq!(m.liveness("n1"), Some(Liveness::Pending));
        assert!(drain(&mut m).is_empty());
    }
}
