//! `haven bench scheduler`: Haven's scheduler beside Pacemaker's `crm_simulate -R` on
//! the same generated CIBs (nodes × resources, with location preferences, M/10
//! colocations, M/10 orders, stickiness 100), fresh and with one node lost.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Time the scheduler against crm_simulate on generated clusters
    Scheduler {
        /// Sizes as NODESxRESOURCES (default: 3x100 16x1000 32x10000)
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<String>,
        /// Haven rounds per case (the median is reported)
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Give up on crm_simulate after this many seconds
        #[arg(long, default_value_t = 120)]
        peer_timeout: u64,
        /// Write the generated CIBs here (default: a temporary directory)
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Skip crm_simulate
        #[arg(long)]
        no_peer: bool,
    },
    /// Replicated volumes beside unreplicated qemu-nbd, in one run
    Volume(crate::cmd::volume::BenchArgs),
    /// Time failovers on a fresh lab: power off the node running a resource, until it
    /// runs elsewhere (p50/p95/max, with detection, fencing and start)
    Failover {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Print JSON (every run) instead of the summary
        #[arg(long)]
        json: bool,
        /// Fail over a TCG QEMU guest from this directory (scripts/build-guest) instead
        /// of a process
        #[arg(long)]
        guest_dir: Option<PathBuf>,
    },
    /// Time configuration commits on a fresh lab (p50/p99), then remove it
    Commit {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// Only write a generated CIB
    GenCib {
        nodes: usize,
        resources: usize,
        /// Lose the first node (its resources need recovery)
        #[arg(long)]
        lost: bool,
        out: PathBuf,
    },
}

/// The digest Pacemaker records for an operation of a resource without parameters, so
/// `crm_simulate` sees no definition change in the generated history.
///
/// A deterministic CIB: resource i prefers node (i*7) % N; every tenth resource has a
/// colocation with its predecessor and an order after the one two before it.
/// With `running`, each resource runs where `running[i]` says, and node 0 is lost.
pub fn gen_cib(nodes: usize, resources: usize, running: Option<&[Option<usize>]>) -> String {
    let mut x = String::with_capacity(resources * 400);
    let node = |i: usize| format!("node{i}");
    x.push_str("<cib validate-with=\"pacemaker-3.0\" epoch=\"1\" num_updates=\"0\" admin_epoch=\"0\" have-quorum=\"1\" dc-uuid=\"1\">\n  <configuration>\n    <crm_config>\n      <cluster_property_set id=\"opts\">\n");
    x.push_str("        <nvpair id=\"opt-stonith\" name=\"stonith-enabled\" value=\"true\"/>\n      </cluster_property_set>\n    </crm_config>\n    <nodes>\n");
    for n in 0..nodes {
        let _ = writeln!(x, "      <node id=\"{}\" uname=\"{}\"/>", n + 1, node(n));
    }
    x.push_str("    </nodes>\n    <resources>\n");
    x.push_str("      <primitive id=\"fencing\" class=\"stonith\" type=\"fence_dummy\"/>\n");
    for r in 0..resources {
        let _ = writeln!(
            x,
            "      <primitive id=\"r{r}\" class=\"ocf\" provider=\"heartbeat\" type=\"Dummy\"/>"
        );
    }
    x.push_str("    </resources>\n    <constraints>\n");
    for r in 0..resources {
        let pref = (r * 7) % nodes;
        let score = 10 + (r * 13) % 90;
        let _ = writeln!(
            x,
            "      <rsc_location id=\"l{r}\" rsc=\"r{r}\" node=\"{}\" score=\"{score}\"/>",
            node(pref)
        );
    }
    for r in (10..resources).step_by(10) {
        let _ = writeln!(
            x,
            "      <rsc_colocation id=\"c{r}\" rsc=\"r{r}\" with-rsc=\"r{}\" score=\"INFINITY\"/>",
            r - 1
        );
        let _ = writeln!(
            x,
            "      <rsc_order id=\"o{r}\" first=\"r{}\" then=\"r{r}\" kind=\"Mandatory\"/>",
            r - 2
        );
    }
    x.push_str("    </constraints>\n    <rsc_defaults>\n      <meta_attributes id=\"defaults\">\n        <nvpair id=\"stick\" name=\"resource-stickiness\" value=\"100\"/>\n      </meta_attributes>\n    </rsc_defaults>\n  </configuration>\n  <status>\n");
    for n in 0..nodes {
        let lost = running.is_some() && n == 0;
        if lost {
            let _ = writeln!(
                x,
                "    <node_state id=\"{}\" uname=\"{}\" in_ccm=\"false\" crmd=\"offline\" join=\"down\" expected=\"member\">",
                n + 1,
                node(n)
            );
        } else {
            let _ = writeln!(
                x,
                "    <node_state id=\"{}\" uname=\"{}\" in_ccm=\"true\" crmd=\"online\" join=\"member\" expected=\"member\">",
                n + 1,
                node(n)
            );
        }
        x.push_str("      <lrm id=\"lrm\">\n        <lrm_resources>\n");
        if let Some(run) = running {
            for (r, on) in run.iter().enumerate() {
                if *on != Some(n) {
                    continue;
                }
                let _ = writeln!(
                    x,
                    "          <lrm_resource id=\"r{r}\" class=\"ocf\" provider=\"heartbeat\" type=\"Dummy\">\n            <lrm_rsc_op id=\"r{r}_last_0\" operation_key=\"r{r}_start_0\" operation=\"start\" transition-key=\"{r}:1:0:00000000-0000-0000-0000-000000000000\" transition-magic=\"0:0;{r}:1:0:00000000-0000-0000-0000-000000000000\" call-id=\"{}\" rc-code=\"0\" op-status=\"0\" interval=\"0\" op-digest=\"f2317cad3d54cec5d7d7aa7d0bf35cf8\" crm_feature_set=\"3.0.14\"/>\n          </lrm_resource>",
                    r + 2
                );
            }
        }
        x.push_str("        </lrm_resources>\n      </lrm>\n    </node_state>\n");
    }
    x.push_str("  </status>\n</cib>\n");
    x
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Peak resident memory of a process so far (`self` or a pid), from /proc (kB).
fn peak_rss_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Start this process's peak-memory count afresh (Linux: `5` in clear_refs sets the
/// peak to the current resident size), so each case reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or_else(
        || "n/a".to_string(),
        |k| format!("{:.1}MiB", k as f64 / 1024.0),
    )
}

/// What one crm_simulate run took: wall time and peak memory (kB, sampled from /proc
/// while it runs).
struct PeerRun {
    time: Duration,
    peak_kb: Option<u64>,
}

fn time_peer(path: &Path, timeout: u64) -> anyhow::Result<Option<PeerRun>> {
    let start = Instant::now();
    let mut child = match Command::new("crm_simulate")
        .arg("-R")
        .arg("-x")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    // Bounded wait: poll the child (and its peak memory), kill it past the limit.
    let pid = child.id().to_string();
    let mut peak_kb: Option<u64> = None;
    loop {
        if let Some(kb) = peak_rss_kb(&pid) {
            peak_kb = Some(peak_kb.unwrap_or(0).max(kb));
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                anyhow::bail!("crm_simulate failed on {} ({status})", path.display());
            }
            return Ok(Some(PeerRun {
                time: start.elapsed(),
                peak_kb,
            }));
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Volume(a) => crate::cmd::volume::bench(a),
        What::Failover {
            nodes,
            runs,
            json,
            guest_dir,
        } => {
            let r = crate::daemon::failover_bench::failover(nodes, runs, guest_dir.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.render());
            }
            Ok(())
        }
        What::Commit { nodes, samples } => {
            if samples == 0 || !(1..=50).contains(&nodes) {
                anyhow::bail!("--samples must be positive and --nodes between 1 and 50");
            }
            let r = crate::daemon::bench::commit_latency(nodes, samples)?;
            println!(
                "config commit latency, {} nodes on loopback, {} samples: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                r.nodes,
                r.samples,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                r.max.as_secs_f64() * 1e3
            );
            Ok(())
        }
        What::GenCib {
            nodes,
            resources,
            lost,
            out,
        } => {
            let text = if lost {
                let fresh = gen_cib(nodes, resources, None);
                let running = place(&fresh, resources)?;
                gen_cib(nodes, resources, Some(&running))
            } else {
                gen_cib(nodes, resources, None)
            };
            std::fs::write(&out, text)
                .with_context(|| format!("cannot write {}", out.display()))?;
            Ok(())
        }
        What::Scheduler {
            sizes,
            rounds,
            peer_timeout,
            keep,
            no_peer,
        } => {
            let sizes = if sizes.is_empty() {
                vec!["3x100".to_string(), "16x1000".into(), "32x10000".into()]
            } else {
                sizes
            };
            let scratch = std::env::temp_dir().join(format!("haven-bench-{}", std::process::id()));
            let dir = keep.clone().unwrap_or_else(|| scratch.clone());
            std::fs::create_dir_all(&dir)?;
            let result = bench_sizes(&sizes, &dir, rounds, peer_timeout, no_peer);
            if keep.is_none() {
                let _ = std::fs::remove_dir_all(&scratch);
            }
            result
        }
    }
}

fn bench_sizes(
    sizes: &[String],
    dir: &Path,
    rounds: usize,
    peer_timeout: u64,
    no_peer: bool,
) -> anyhow::Result<()> {
    println!(
        "{:<10} {:<6} {:>12} {:>14} {:>10} {:>8} {:>12} {:>14}",
        "size", "case", "haven", "crm_simulate", "ratio", "actions", "haven peak", "crm_sim peak"
    );
    for size in sizes {
        let size = size.as_str();
        let (n, m) = size
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .with_context(|| format!("size `{size}`: expected NODESxRESOURCES, e.g. 16x1000"))?;
        let fresh = gen_cib(n, m, None);
        let running = place(&fresh, m)?;
        let lost = gen_cib(n, m, Some(&running));
        for (case, text) in [("fresh", fresh), ("lost", lost)] {
            let path = dir.join(format!("{size}-{case}.xml"));
            std::fs::write(&path, &text)?;
            reset_peak_rss();
            let imported = haven_model::cib::import(&path.display().to_string(), &text)?;
            let mut times = Vec::new();
            let mut actions = 0;
            for _ in 0..rounds.max(1) {
                let t = Instant::now();
                let plan = haven_sched::schedule(&imported.config, &imported.state);
                times.push(t.elapsed());
                actions = plan.actions.len();
            }
            let ours = median(times);
            let ours_kb = peak_rss_kb("self");
            let peer = if no_peer {
                None
            } else {
                time_peer(&path, peer_timeout)?
            };
            let (peer_s, ratio, peer_mem) = match &peer {
                Some(p) => (
                    format!("{:.3}s", p.time.as_secs_f64()),
                    format!(
                        "{:.0}x",
                        p.time.as_secs_f64() / ours.as_secs_f64().max(1e-9)
                    ),
                    mib(p.peak_kb),
                ),
                None => ("n/a".to_string(), "-".to_string(), "n/a".to_string()),
            };
            println!(
                "{:<10} {:<6} {:>11.2}ms {:>14} {:>10} {:>8} {:>12} {:>14}",
                size,
                case,
                ours.as_secs_f64() * 1e3,
                peer_s,
                ratio,
                actions,
                mib(ours_kb),
                peer_mem
            );
        }
    }
    println!(
        "peak = highest resident memory: haven's process while importing and scheduling \
         that case (it also holds the generated CIB), crm_simulate's sampled from /proc"
    );
    Ok(())
}

/// Where Haven places each resource on the fresh cluster (the "running" state of the
/// one-node-lost variant).
fn place(fresh: &str, resources: usize) -> anyhow::Result<Vec<Option<usize>>> {
    let imported = haven_model::cib::import("generated", fresh)?;
    let plan = haven_sched::schedule(&imported.config, &imported.state);
    let mut out = vec![None; resources];
    for c in &plan.changes {
        if let (Some(r), Some(to)) = (
            c.resource
                .strip_prefix('r')
                .and_then(|n| n.parse::<usize>().ok()),
            &c.to,
        ) && let Some(n) = to
            .node
            .strip_prefix("node")
            .and_then(|n| n.parse::<usize>().ok())
            && r < resources
        {
            out[r] = Some(n);
        }
    }
    Ok(out)
}
