//! Failover time on a loopback lab: what `haven bench failover` reports.
//!
//! One `process` resource runs on a fresh lab whose only fence device is the lab power
//! switch. Each run powers off the node running it (daemon and resource processes,
//! SIGKILL) and times until the resource runs on another node, as the cluster confirms
//! it (the committed start result shows it there) and its process is alive. The
//! breakdown comes from the committed fence record: detection (power-off to the fence
//! device starting: failure detection, a new leader when the victim led, dispatch),
//! fencing (the device run), start (fence confirmed to running elsewhere). Between runs
//! the victim's daemon is restarted and allowed back (`node online`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::api;
use super::client::Client;
use super::fence::{FENCE_HISTORY, FENCE_LS, FenceLs, NODE_REJOIN, NodeName};
use super::protocol::{ApplyConfig, ConfigReply, Empty, StatusReport};
use super::wall_ms;

const RESOURCE: &str = "svc";
/// Bound on every wait of a run.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverRun {
    pub victim: String,
    pub victim_led: bool,
    pub new_home: String,
    pub total: Duration,
    pub detection: Duration,
    pub fencing: Duration,
    pub start: Duration,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverBench {
    pub nodes: u8,
    /// `process`, or `qemu` (a TCG guest).
    pub kind: String,
    pub runs: Vec<FailoverRun>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl FailoverBench {
    fn sorted(&self, f: impl Fn(&FailoverRun) -> Duration) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.runs.iter().map(f).collect();
        v.sort();
        v
    }

    pub fn render(&self) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let mut s = format!(
            "failover of a `{}` resource, {} nodes on loopback, lab power switch, {} runs\n",
            self.kind,
            self.nodes,
            self.runs.len()
        );
        for (name, v) in [
            ("total", self.sorted(|r| r.total)),
            ("  detection", self.sorted(|r| r.detection)),
            ("  fencing", self.sorted(|r| r.fencing)),
            ("  start", self.sorted(|r| r.start)),
        ] {
            s.push_str(&format!(
                "{name:<12} p50 {:>8}  p95 {:>8}  max {:>8}\n",
                ms(percentile(&v, 50.0)),
                ms(percentile(&v, 95.0)),
                ms(v.last().copied().unwrap_or_default())
            ));
        }
        let led = self.runs.iter().filter(|r| r.victim_led).count();
        s.push_str(&format!(
            "({led} of the runs powered off the leader, which adds an election)\n"
        ));
        s
    }
}

fn config(nodes: u8, dir: &Path, guest: Option<&Path>) -> String {
    let mut s = String::from(
        "[options]\nstonith-enabled = true\nno-quorum-policy = \"stop\"\nresource-stickiness = 100\n",
    );
    for i in 1..=nodes {
        let host = 10 + u16::from(i);
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"n{i}\"\naddrs = [\"127.0.0.{host}\", \"127.0.1.{host}\"]\n"
        ));
    }
    match guest {
        None => s.push_str(&format!(
            "\n[[resources]]\nid = \"{RESOURCE}\"\nclass = \"process\"\ntype = \"{RESOURCE}\"\nparams = {{ command = \"sleep 1000000\" }}\nops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n"
        )),
        // Start waits for the guest's ready line: running means booted.
        Some(g) => s.push_str(&format!(
            "\n[[resources]]\nid = \"{RESOURCE}\"\nclass = \"qemu\"\ntype = \"vm\"\n\
             params = {{ kernel = \"{}\", initrd = \"{}\", append = \"console=ttyS0 panic=-1 quiet\", \
             accel = \"tcg\", memory = \"128\", ready_marker = \"HAVEN-GUEST-UP\" }}\n\
             ops = [{{ name = \"start\", timeout = 120 }}, {{ name = \"stop\", timeout = 30 }}, \
             {{ name = \"monitor\", interval = 1, timeout = 10 }}]\n",
            g.join("vmlinux").display(),
            g.join("initramfs.cpio").display()
        )),
    }
    s.push_str(&format!(
        "\n[[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\nparams = {{ lab-dir = \"{}\" }}\n",
        dir.display()
    ));
    s
}

/// Where the resource's process really runs (pidfile + /proc).
fn running_on(dir: &Path, nodes: u8) -> Vec<String> {
    (1..=nodes)
        .map(|i| format!("n{i}"))
        .filter(|n| {
            let pf = dir
                .join(n)
                .join("resources")
                .join(format!("{RESOURCE}.pid"));
            matches!(haven_exec::pidfile::read(&pf), Ok(Some(t)) if t.alive())
        })
        .collect()
}

async fn wait<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {RUN_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the benchmark on a fresh lab in a temporary directory, removed afterwards (also
/// on error).
/// With `guest` (a directory with `vmlinux` and `initramfs.cpio`, see
/// scripts/build-guest) the resource is a TCG QEMU guest instead of a process.
pub fn failover(nodes: u8, runs: usize, guest: Option<&Path>) -> anyhow::Result<FailoverBench> {
    if !(3..=9).contains(&nodes) || runs == 0 {
        anyhow::bail!("--nodes must be between 3 and 9 and --runs positive");
    }
    let dir = std::env::temp_dir().join(format!(
        "haven-bench-failover-{}-{}",
        std::process::id(),
        wall_ms()
    ));
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(g) = guest {
        for f in ["vmlinux", "initramfs.cpio"] {
            if !g.join(f).is_file() {
                anyhow::bail!(
                    "--guest-dir {}: no {f} (build it with scripts/build-guest)",
                    g.display()
                );
            }
        }
    }
    let result = rt.block_on(bench(nodes, runs, &dir, guest));
    drop(rt);
    let _ = crate::cmd::lab::down(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(
    nodes: u8,
    runs: usize,
    dir: &Path,
    guest: Option<&Path>,
) -> anyhow::Result<FailoverBench> {
    let (client_path, _) = crate::cmd::lab::start(nodes, dir, None).await?;
    let dir: PathBuf = dir.canonicalize()?;
    let client = Client::load(&client_path)?;
    let current: ConfigReply = client.call(api::CONFIG, &Empty {}).await?;
    let _: ConfigReply = client
        .call(
            api::CONFIG_APPLY,
            &ApplyConfig {
                based_on: current.version,
                text: config(nodes, &dir, guest),
            },
        )
        .await
        .context("applying the benchmark configuration")?;
    let mut out = FailoverBench {
        nodes,
        kind: if guest.is_some() { "qemu" } else { "process" }.to_string(),
        runs: Vec::new(),
    };
    for run in 0..runs {
        let status = |want_all: bool| {
            let client = &client;
            async move {
                let s: StatusReport = client.call(api::STATUS, &Empty {}).await.ok()?;
                let ready = s.quorate && (!want_all || s.nodes.iter().all(|n| n.state == "online"));
                ready.then_some(s)
            }
        };
        // A settled cluster: every node online, the resource running once, confirmed.
        let (victim, leader) = wait("the cluster to settle", async || {
            let s = status(true).await?;
            let r = s.resources.iter().find(|r| r.id == RESOURCE)?;
            let procs = running_on(&dir, nodes);
            (r.running_on.len() == 1 && procs == r.running_on)
                .then(|| (procs[0].clone(), s.leader.clone()))
        })
        .await?;
        let before = fence_count(&client).await?;
        let t0 = Instant::now();
        let t0_ms = wall_ms();
        let node_dir = dir.join(&victim);
        tokio::task::spawn_blocking(move || super::fence::power_off(&node_dir))
            .await?
            .map_err(anyhow::Error::msg)?;
        let new_home = wait("the resource to run elsewhere", async || {
            let procs = running_on(&dir, nodes);
            if procs.len() != 1 || procs[0] == victim {
                return None;
            }
            let s = status(false).await?;
            let r = s.resources.iter().find(|r| r.id == RESOURCE)?;
            (r.running_on == procs).then(|| procs[0].clone())
        })
        .await?;
        let total = t0.elapsed();
        let history: Vec<haven_store::FenceRecord> = client.call(FENCE_HISTORY, &Empty {}).await?;
        let rec = history
            .iter()
            .skip(before)
            .find(|r| r.victim == victim && r.ok)
            .context("the resource moved without a committed fence of its node")?;
        let detection = Duration::from_millis(rec.started_ms.saturating_sub(t0_ms));
        let fencing = Duration::from_millis(rec.at_ms.saturating_sub(rec.started_ms));
        out.runs.push(FailoverRun {
            victim_led: leader.as_deref() == Some(victim.as_str()),
            victim: victim.clone(),
            new_home,
            total,
            detection,
            fencing,
            start: total.saturating_sub(detection + fencing),
        });
        eprintln!(
            "run {}: {victim} off -> running elsewhere in {:.0} ms",
            run + 1,
            total.as_secs_f64() * 1e3
        );
        // Back to full strength: restart the victim and allow it back in.
        crate::cmd::lab::spawn_daemon(&dir, &victim)?;
        wait("the powered-off node to be allowed back", async || {
            let r: Result<Empty, _> = client
                .call(
                    NODE_REJOIN,
                    &NodeName {
                        node: victim.clone(),
                    },
                )
                .await;
            r.ok()?;
            // The coordinator's word, not just heartbeats: it must run things there again.
            let ls: FenceLs = client.call(FENCE_LS, &Empty {}).await.ok()?;
            ls.members
                .iter()
                .any(|(n, st)| *n == victim && st == "online")
                .then_some(())
        })
        .await?;
    }
    Ok(out)
}

async fn fence_count(client: &Client) -> anyhow::Result<usize> {
    let h: Vec<haven_store::FenceRecord> = client.call(FENCE_HISTORY, &Empty {}).await?;
    Ok(h.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(10));
        assert_eq!(percentile(&v, 95.0), Duration::from_millis(19));
        assert_eq!(percentile(&[], 95.0), Duration::ZERO);
    }
}
