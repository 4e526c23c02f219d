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
    fn missing_and_doubled_resources_are_not_recovered() {
        let t = truth(&[("vm1", &["n1"]), ("vm2", &["n1", "n2"])]);
        let all = ["vm1".to_string(), "vm2".to_string(), "vm3".to_string()];
        let v = check_exactly_once(&t, all.iter(), Time(0));
        let names: Vec<_> = v
            .iter()
            .map(|v| match v {
                Violation::NotRecovered { resource, .. } => resource.as_str(),
                Violation::RunningTwice { .. } => "",
            })
            .collect();
        assert_eq!(names, vec!["vm2", "vm3"]);
    }
}
