//! The properties a run must keep, each with the evidence of its breach.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use haven_ha::Time;

/// A broken invariant and its evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A resource that may run once was running on two or more nodes at once.
    RunningTwice {
        resource: String,
        nodes: Vec<String>,
        at: Time,
    },
    /// After every fault was healed and the cluster had time to converge, a resource
    /// was not running exactly once.
    NotRecovered {
        resource: String,
        running_on: Vec<String>,
        at: Time,
    },
    /// A resource started on `node` while `peer`, out of touch with the coordinator
    /// that ordered the start and not fenced since, had run it meanwhile: recovery
    /// did not wait for the fence.
    NotFencedFirst {
        resource: String,
        node: String,
        peer: String,
        at: Time,
    },
    /// A node fenced and not yet allowed back by the operator ran resources, or a
    /// coordinator counted it in.
    FencedNodeBack {
        node: String,
        running: Vec<String>,
        let_in_by: Vec<String>,
        at: Time,
    },
    /// A restarted daemon told the cluster a resource was not running on its node
    /// without having probed it.
    StoppedUnprobed {
        resource: String,
        node: String,
        at: Time,
    },
    /// Both nodes of a two-node cluster were fenced at once: the fence delays did not
    /// decide the race.
    BothFenced { at: Time },
    /// Two-node: the node that won a fencing race (the switch powered its peer off on
    /// its order) was fenced afterwards although it had stayed up and in touch with
    /// every running daemon since: a mark made before the race outlived it.
    WinnerFenced { winner: String, at: Time },
}

impl Violation {
    /// What makes two reports the same breach (reported once per run).
    pub fn key(&self) -> String {
        match self {
            Violation::RunningTwice { resource, .. } => format!("twice {resource}"),
            Violation::NotRecovered { resource, .. } => format!("unrecovered {resource}"),
            Violation::NotFencedFirst {
                resource,
                node,
                peer,
                ..
            } => format!("unfenced {resource} {node} {peer}"),
            Violation::FencedNodeBack { node, .. } => format!("back {node}"),
            Violation::StoppedUnprobed { resource, node, .. } => {
                format!("unprobed {resource} {node}")
            }
            Violation::BothFenced { .. } => "both fenced".to_string(),
            Violation::WinnerFenced { winner, .. } => format!("winner {winner}"),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::RunningTwice {
                resource,
                nodes,
                at,
            } => write!(
                f,
                "{at}: {resource} running on {} at once",
                nodes.join(", ")
            ),
            Violation::NotRecovered {
                resource,
                running_on,
                at,
            } => write!(
                f,
                "{at}: {resource} not running exactly once after healing (running on [{}])",
                running_on.join(", ")
            ),
            Violation::NotFencedFirst {
                resource,
                node,
                peer,
                at,
            } => write!(
                f,
                "{at}: {resource} started on {node} while {peer}, out of touch with the coordinator that ordered it and not fenced since, had run it"
            ),
            Violation::FencedNodeBack {
                node,
                running,
                let_in_by,
                at,
            } => write!(
                f,
                "{at}: {node} was fenced and not allowed back, yet runs [{}] and is counted in by [{}]",
                running.join(", "),
                let_in_by.join(", ")
            ),
            Violation::StoppedUnprobed { resource, node, at } => write!(
                f,
                "{at}: {node}'s restarted daemon reported {resource} not running without probing it"
            ),
            Violation::BothFenced { at } => {
                write!(f, "{at}: both nodes of the two-node cluster were fenced")
            }
            Violation::WinnerFenced { winner, at } => write!(
                f,
                "{at}: {winner} won its fencing race and stayed up and in touch since, yet was fenced"
            ),
        }
    }
}

/// Where each resource really runs: resource → nodes.
pub type Truth = BTreeMap<String, BTreeSet<String>>;

/// Safety: never two copies. Reports each resource once per breach, not per tick.
pub fn check_at_most_once(truth: &Truth, at: Time, seen: &mut BTreeSet<String>) -> Vec<Violation> {
    let mut out = Vec::new();
    for (resource, nodes) in truth {
        if nodes.len() > 1 {
            if seen.insert(resource.clone()) {
                out.push(Violation::RunningTwice {
                    resource: resource.clone(),
                    nodes: nodes.iter().cloned().collect(),
                    at,
                });
            }
        } else {
            seen.remove(resource);
        }
    }
    out
}

/// Liveness: after healing, exactly one copy of each configured resource.
pub fn check_exactly_once<'a>(
    truth: &Truth,
    resources: impl IntoIterator<Item = &'a String>,
    at: Time,
) -> Vec<Violation> {
    resources
        .into_iter()
        .filter_map(|r| {
            let nodes = truth.get(r).cloned().unwrap_or_default();
            (nodes.len() != 1).then(|| Violation::NotRecovered {
                resource: r.clone(),
                running_on: nodes.into_iter().collect(),
                at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(entries: &[(&str, &[&str])]) -> Truth {
        entries
            .iter()
            .map(|(r, ns)| (r.to_string(), ns.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    #[test]
    fn two_copies_are_caught_once_per_breach() {
        let mut seen = BTreeSet::new();
        let t = truth(&[("vm1", &["n1", "n2"]), ("vm2", &["n3"])]);
        let v = check_at_most_once(&t, Time(5), &mut seen);
        assert_eq!(
            v,
            vec![Violation::RunningTwice {
                resource: "vm1".into(),
                nodes: vec!["n1".into(), "n2".into()],
                at: Time(5)
            }]
        );
        assert!(check_at_most_once(&t, Time(6), &mut seen).is_empty());
        let healed = truth(&[("vm1", &["n1"])]);
        assert!(check_at_most_once(&healed, Time(7), &mut seen).is_empty());
        assert_eq!(check_at_most_once(&t, Time(8), &mut seen).len(), 1);
    }

    #[test]
    fn each_breach_has_a_key_of_its_own() {
        let at = Time(1);
        let all = [
            Violation::RunningTwice {
                resource: "r1".into(),
                nodes: vec!["n1".into(), "n2".into()],
                at,
            },
            Violation::NotRecovered {
                resource: "r1".into(),
                running_on: vec![],
                at,
            },
            Violation::NotFencedFirst {
                resource: "r1".into(),
                node: "n1".into(),
                peer: "n2".into(),
                at,
            },
            Violation::NotFencedFirst {
                resource: "r1".into(),
                node: "n2".into(),
                peer: "n1".into(),
                at,
            },
            Violation::FencedNodeBack {
                node: "n1".into(),
                running: vec![],
                let_in_by: vec!["n2".into()],
                at,
            },
            Violation::StoppedUnprobed {
                resource: "r1".into(),
                node: "n1".into(),
                at,
            },
            Violation::BothFenced { at },
        ];
        let keys: BTreeSet<String> = all.iter().map(Violation::key).collect();
        assert_eq!(keys.len(), all.len());
        // The same breach seen later is the same breach.
        let later = Violation::StoppedUnprobed {
            resource: "r1".into(),
            node: "n1".into(),
            at: Time(9),
        };
        assert!(keys.contains(&later.key()));
        assert!(later.to_string().contains("without probing"));
    }

    #[test]
    fn missing_and_doubled_resources_are_not_recovered() {
        let t = truth(&[("vm1", &["n1"]), ("vm2", &["n1", "n2"])]);
        let all = ["vm1".to_string(), "vm2".to_string(), "vm3".to_string()];
        let v = check_exactly_once(&t, all.iter(), Time(0));
        let names: Vec<_> = v
            .iter()
            .map(|v| match v {
                Violation::NotRecovered { resource, .. } => resource.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(names, vec!["vm2", "vm3"]);
    }
}
