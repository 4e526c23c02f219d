use std::path::PathBuf;

use crate::daemon::api;
use crate::daemon::client::Client;
use crate::daemon::protocol::{Empty, StatusReport};

#[derive(clap::Args)]
pub struct Args {
    /// client.toml (default: $HAVEN_CONFIG)
    #[arg(long, env = "HAVEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn fetch(config: Option<PathBuf>) -> anyhow::Result<StatusReport> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async { Client::from_arg(config)?.call(api::STATUS, &Empty {}).await })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = fetch(args.config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The crm_mon-like text view.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "Cluster {} (as seen by {})", r.cluster, r.reported_by);
    let _ = writeln!(
        out,
        "Quorum: {}   Leader: {}   Term: {}   Configuration version: {}",
        if r.quorate { "yes" } else { "NO" },
        r.leader.as_deref().unwrap_or("none"),
        r.term,
        r.config_version
    );
    let _ = writeln!(out, "\nNodes:");
    for n in &r.nodes {
        let links: Vec<String> = n
            .links
            .iter()
            .map(|l| format!("{} {} {}", l.name, l.addr, if l.up { "up" } else { "DOWN" }))
            .collect();
        let _ = writeln!(
            out,
            "  {:<12} {:<12} {:<8} {}",
            n.name,
            n.state,
            n.role,
            links.join(", ")
        );
        if let Some(detail) = &n.detail {
            let _ = writeln!(out, "  {:<12} {detail}", "");
        }
    }
    let _ = writeln!(out, "\nResources:");
    if r.resources.is_empty() {
        let _ = writeln!(out, "  (none configured)");
    }
    for res in &r.resources {
        let mut place = Vec::new();
        if !res.running_on.is_empty() {
            // Between a node going silent and the leader marking it unclean, the last
            // report still says the resource runs there: say the node is not answering
            // rather than let the line read like a healthy placement.
            let on: Vec<String> = res
                .running_on
                .iter()
                .map(|node| match r.nodes.iter().find(|n| &n.name == node) {
                    Some(n) if n.state == "offline" => format!("{node} (node offline)"),
                    _ => node.clone(),
                })
                .collect();
            if res.promoted_on.is_empty() {
                place.push(format!("Started {}", on.join(", ")));
            } else {
                // crm_mon's view of a promotable clone: which copy is Promoted.
                let (promoted, unpromoted): (Vec<_>, Vec<_>) = res
                    .running_on
                    .iter()
                    .zip(&on)
                    .partition(|(node, _)| res.promoted_on.contains(node));
                let names = |v: Vec<(&String, &String)>| {
                    v.into_iter()
                        .map(|(_, shown)| shown.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                place.push(format!("Promoted {}", names(promoted)));
                if !unpromoted.is_empty() {
                    place.push(format!("Unpromoted {}", names(unpromoted)));
                }
            }
        }
        if !res.in_doubt_on.is_empty() {
            place.push(format!("IN DOUBT on {}", res.in_doubt_on.join(", ")));
        }
        if place.is_empty() {
            place.push("Stopped".to_string());
        }
        let _ = writeln!(
            out,
            "  {:<16} ({})  {}",
            res.id,
            res.agent,
            place.join("; ")
        );
        if let Some(why) = &res.frozen {
            let _ = writeln!(out, "  {:<16} {why}", "");
        }
        for (node, why) in &res.unpromotable {
            let _ = writeln!(out, "    not promotable on {node}: {why}");
        }
    }
    if !r.failed_actions.is_empty() {
        let _ = writeln!(out, "\nFailed actions:");
        for f in &r.failed_actions {
            let _ = writeln!(out, "  {} on {}: {}", f.resource, f.node, f.detail);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::{NodeStatus, ResourceStatus};

    #[test]
    fn a_resource_in_doubt_shows_where_and_why_it_is_frozen() {
        let r = StatusReport {
            cluster: "c".into(),
            reported_by: "n1".into(),
            quorate: true,
            leader: Some("n1".into()),
            term: 1,
            config_version: 1,
            nodes: vec![NodeStatus {
                name: "n2".into(),
                id: 2,
                state: "unclean".into(),
                role: "voter".into(),
                links: vec![],
                detail: Some("in doubt (it stopped heartbeating): waiting".into()),
            }],
            resources: vec![ResourceStatus {
                id: "svc".into(),
                agent: "process:svc".into(),
                running_on: vec![],
                in_doubt_on: vec!["n2".into()],
                frozen: Some("frozen until n2 is confirmed down: waiting".into()),
                failcounts: Default::default(),
                unpromotable: Default::default(),
                promoted_on: vec![],
            }],
            failed_actions: vec![],
        };
        let text = render(&r);
        assert!(text.contains("IN DOUBT on n2"), "{text}");
        assert!(!text.contains("node offline"), "{text}");
        assert!(!text.contains("Stopped"), "{text}");
        assert!(text.contains("frozen until n2 is confirmed down"), "{text}");
        assert!(
            text.contains("in doubt (it stopped heartbeating)"),
            "{text}"
        );
    }
    #[test]
    fn a_resource_last_reported_on_a_silent_node_says_the_node_is_offline() {
        let node = |name: &str, state: &str| NodeStatus {
            name: name.into(),
            id: 1,
            state: state.into(),
            role: "voter".into(),
            links: vec![],
            detail: None,
        };
        let res = |id: &str, on: &str| ResourceStatus {
            id: id.into(),
            agent: "process:x".into(),
            running_on: vec![on.into()],
            in_doubt_on: vec![],
            frozen: None,
            failcounts: Default::default(),
            unpromotable: Default::default(),
            promoted_on: vec![],
        };
        let r = StatusReport {
            cluster: "c".into(),
            reported_by: "n2".into(),
            quorate: true,
            leader: Some("n2".into()),
            term: 1,
            config_version: 1,
            nodes: vec![node("n1", "offline"), node("n2", "online")],
            resources: vec![res("db", "n1"), res("web", "n2"), {
                let mut vol = res("vol", "n1");
                vol.running_on.push("n2".into());
                vol.promoted_on.push("n2".into());
                vol
            }],
            failed_actions: vec![],
        };
        let text = render(&r);
        assert!(
            text.contains("Promoted n2; Unpromoted n1 (node offline)"),
            "{text}"
        );
        assert!(text.contains("Started n1 (node offline)"), "{text}");
        assert!(text.contains("Started n2\n"), "{text}");
    }
}
