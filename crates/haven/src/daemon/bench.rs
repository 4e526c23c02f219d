//! Config-commit latency on a loopback lab: what `haven bench commit` reports.

use std::time::{Duration, Instant};

use crate::daemon::api;
use crate::daemon::client::Client;
use crate::daemon::protocol::{ApplyConfig, ConfigReply, Empty};

#[derive(Clone, Debug, serde::Serialize)]
pub struct CommitLatency {
    pub nodes: u8,
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Starts a lab of `nodes` daemons in a fresh temporary directory, applies `samples`
/// configuration changes one after another, and times each from the client's request
/// to its answer (validation, Raft commit on a majority, apply on the leader). The lab
/// is stopped and removed afterwards, also on error.
pub fn commit_latency(nodes: u8, samples: usize) -> anyhow::Result<CommitLatency> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("haven-bench-commit-{}-{nanos}", std::process::id()));
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let (client_path, _) = crate::cmd::lab::start(nodes, &dir, None).await?;
        let client = Client::load(&client_path)?;
        let base: ConfigReply = client.call(api::CONFIG, &Empty {}).await?;
        let mut version = base.version;
        let mut times = Vec::with_capacity(samples);
        // A few unmeasured rounds so connections and caches are warm.
        for i in 0..samples + 5 {
            let text = format!("{}# change {i}\n", base.text);
            let started = Instant::now();
            let r: ConfigReply = client
                .call(
                    api::CONFIG_APPLY,
                    &ApplyConfig {
                        based_on: version,
                        text,
                    },
                )
                .await?;
            let took = started.elapsed();
            version = r.version;
            if i >= 5 {
                times.push(took);
            }
        }
        times.sort();
        Ok::<_, anyhow::Error>(CommitLatency {
            nodes,
            samples,
            p50: percentile(&times, 50.0),
            p99: percentile(&times, 99.0),
            max: times.last().copied().unwrap_or_default(),
        })
    });
    drop(rt);
    let _ = crate::cmd::lab::down(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_by_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
