//! `haven fence ls|node|ack|history`: the fencing subsystem as `fence_tool` and
//! `stonith_admin` show it.

use std::path::PathBuf;

use clap::Subcommand;
use haven_store::FenceRecord;

use crate::daemon::client::Client;
use crate::daemon::fence::{
    Acked, FENCE_ACK, FENCE_HISTORY, FENCE_LS, FENCE_NODE, FenceLs, NodeName,
};
use crate::daemon::protocol::Empty;

#[derive(clap::Args)]
pub struct Args {
    /// client.toml (default: $HAVEN_CONFIG)
    #[arg(long, env = "HAVEN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Members, victims, the victim being fenced now, and the wait state
    Ls,
    /// Fence NODE now (test-fence on demand): its resources are recovered elsewhere
    Node { node: String },
    /// Confirm by hand that NODE is down (power pulled): ends its fencing
    Ack { node: String },
    /// Fence attempts and confirmations committed to the cluster, oldest first
    History,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = Client::from_arg(args.config)?;
    match args.command {
        Command::Ls => {
            let ls: FenceLs = rt.block_on(client.call(FENCE_LS, &Empty {}))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ls)?);
            } else {
                print!("{}", render_ls(&ls));
            }
        }
        Command::Node { node } => {
            let _: Empty =
                rt.block_on(client.call(FENCE_NODE, &NodeName { node: node.clone() }))?;
            println!("{node}: fencing requested (see `haven fence ls` and `haven fence history`)");
        }
        Command::Ack { node } => {
            let a: Acked = rt.block_on(client.call(FENCE_ACK, &NodeName { node: node.clone() }))?;
            if args.json {
                println!("{}", serde_json::json!({ "node": node, "acked": a.acked }));
            } else if a.acked {
                println!("{node}: acknowledged as down; its resources may now be recovered");
            } else {
                anyhow::bail!("{node} is not being fenced: there is nothing to acknowledge");
            }
        }
        Command::History => {
            let h: Vec<FenceRecord> = rt.block_on(client.call(FENCE_HISTORY, &Empty {}))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print!("{}", render_history(&h));
            }
        }
    }
    Ok(())
}

fn render_ls(ls: &FenceLs) -> String {
    let mut s = format!("fence domain (coordinator on {})\n", ls.leader);
    let members: Vec<String> = ls
        .members
        .iter()
        .map(|(n, st)| format!("{n}:{st}"))
        .collect();
    s.push_str(&format!("members     {}\n", members.join(" ")));
    s.push_str(&format!("heard       {}\n", ls.heard.join(" ")));
    s.push_str(&format!(
        "victim now  {}\n",
        ls.victim_now.as_deref().unwrap_or("-")
    ));
    s.push_str(&format!("wait state  {}\n", ls.wait_state));
    if !ls.frozen.is_empty() {
        // What waits for the fence: it may still run on the victim.
        let frozen: Vec<String> = ls.frozen.iter().map(|(r, n)| format!("{r}@{n}")).collect();
        s.push_str(&format!("frozen      {}\n", frozen.join(" ")));
    }
    s.push_str(&format!("victims     {}\n", ls.victims.len()));
    for v in &ls.victims {
        s.push_str(&format!(
            "  {} {}: {} (reason: {})\n",
            v.name, v.state, v.detail, v.reason
        ));
    }
    s
}

fn render_history(h: &[FenceRecord]) -> String {
    if h.is_empty() {
        return "no fencing has happened\n".to_string();
    }
    let mut s = String::new();
    for r in h {
        let when = chrono_like(r.at_ms);
        s.push_str(&format!(
            "{when}  {} {} by {} with {}: {}\n",
            r.victim,
            if r.ok { "fenced" } else { "FAILED" },
            r.executor,
            r.device,
            r.detail
        ));
    }
    s
}

/// UTC `YYYY-MM-DD HH:MM:SS.mmm` from Unix milliseconds (civil-from-days).
fn chrono_like(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_and_history_render_like_fence_tool() {
        let ls = FenceLs {
            leader: "n1".into(),
            members: vec![
                ("n1".into(), "online".into()),
                ("n2".into(), "unclean".into()),
            ],
            heard: vec!["n1".into()],
            victims: vec![crate::daemon::fence::VictimInfo {
                name: "n2".into(),
                reason: "it stopped heartbeating".into(),
                state: "waiting-ack".into(),
                detail: "level 1: waiting for `haven fence ack n2`".into(),
            }],
            victim_now: Some("n2".into()),
            wait_state: "fencing".into(),
            frozen: vec![("svc".into(), "n2".into())],
        };
        let text = render_ls(&ls);
        assert!(text.contains("frozen      svc@n2"), "{text}");
        assert!(text.contains("members     n1:online n2:unclean"), "{text}");
        assert!(text.contains("victim now  n2"), "{text}");
        assert!(text.contains("wait state  fencing"), "{text}");
        let h = render_history(&[FenceRecord {
            victim: "n2".into(),
            device: "ipmi".into(),
            executor: "n3".into(),
            ok: false,
            at_ms: 0,
            started_ms: 0,
            detail: "fence_ipmilan off: Timeout".into(),
        }]);
        assert_eq!(
            h,
            "1970-01-01 00:00:00.000  n2 FAILED by n3 with ipmi: fence_ipmilan off: Timeout\n"
        );
        assert_eq!(render_history(&[]), "no fencing has happened\n");
    }

    #[test]
    fn history_times_are_utc() {
        assert_eq!(chrono_like(0), "1970-01-01 00:00:00.000");
        assert_eq!(chrono_like(1_795_000_000_123), "2026-11-18 11:06:40.123");
    }
}
