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
    }
    let _ = writeln!(out, "\nResources:");
    if r.resources.is_empty() {
        let _ = writeln!(out, "  (none configured)");
    }
    for res in &r.resources {
        let place = if res.running_on.is_empty() {
            "Stopped".to_string()
        } else {
            format!("Started {}", res.running_on.join(", "))
        };
        let _ = writeln!(out, "  {:<16} ({})  {}", res.id, res.agent, place);
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
