//! From Haven's configuration (haven-model) to what the coordinator acts on.

use std::time::Duration;

use haven_model::{Config, FenceDevice};

use crate::coordinator::{CoordinatorConfig, NodeSpec, ResourceOps};
use crate::fencing::{FenceDelay, FenceStep, StepKind};

/// Pacemaker's default stonith-timeout.
const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// A watchdog device's default wait: the node's lease (see `QuorumWatch`) plus margin.
const DEFAULT_WATCHDOG_WAIT: Duration = Duration::from_secs(10);
/// The heartbeat link name used when a node lists no addresses.
pub const DEFAULT_LINK: &str = "link0";

/// The coordinator's view of a configuration.
pub fn coordinator_config(config: &Config) -> CoordinatorConfig {
    CoordinatorConfig {
        nodes: config
            .nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                links: link_names(n.addrs.len()),
                fence_levels: fence_levels(config, &n.name),
            })
            .collect(),
        resources: config
            .resources
            .iter()
            .map(|p| {
                let ops = ResourceOps {
                    clone: is_cloned(config, &p.id),
                    ..resource_ops(p)
                };
                (p.id.clone(), ops)
            })
            .collect(),
        stonith_enabled: config.options.stonith_enabled,
        auto_rejoin: false,
        // Which nodes were never seen is the daemon's knowledge, not the configuration's.
        unseen_clean: Default::default(),
    }
}

/// Links are named by position (`link0`, `link1`, …): a node's first address is its
/// `link0`, whatever the address.
pub fn link_names(addrs: usize) -> Vec<String> {
    if addrs == 0 {
        return vec![DEFAULT_LINK.to_string()];
    }
    (0..addrs).map(|i| format!("link{i}")).collect()
}

/// Is `id` cloned, directly or as a member of a cloned group?
fn is_cloned(config: &Config, id: &str) -> bool {
    config.clones.iter().any(|c| {
        c.child == id
            || config
                .groups
                .iter()
                .any(|g| g.id == c.child && g.members.iter().any(|m| m == id))
    })
}

fn resource_ops(p: &haven_model::Primitive) -> ResourceOps {
    let mut ops = ResourceOps::default();
    let secs = |s: Option<u64>, default: Duration| s.map_or(default, Duration::from_secs);
    for op in &p.ops {
        match op.name.as_str() {
            "start" => ops.start_timeout = secs(op.timeout, ops.start_timeout),
            "stop" => ops.stop_timeout = secs(op.timeout, ops.stop_timeout),
            "promote" => ops.promote_timeout = secs(op.timeout, ops.promote_timeout),
            "demote" => ops.demote_timeout = secs(op.timeout, ops.demote_timeout),
            "migrate_to" | "migrate_from" => {
                ops.migrate_timeout = secs(op.timeout, ops.migrate_timeout)
            }
            "monitor" if op.interval > 0 => {
                ops.monitor_interval = Some(Duration::from_secs(op.interval));
                ops.monitor_timeout = secs(op.timeout, ops.monitor_timeout);
            }
            _ => {}
        }
    }
    ops
}

/// The fencing levels for `node` as victim. Without explicit levels, every device
/// able to fence the node is a level of its own, in configuration order (Pacemaker
/// tries every capable device when no topology is set).
pub fn fence_levels(config: &Config, node: &str) -> Vec<Vec<FenceStep>> {
    let device = |id: &str| config.fencing.devices.iter().find(|d| d.id == id);
    let mut levels: Vec<_> = config
        .fencing
        .levels
        .iter()
        .filter(|l| l.node == node)
        .collect();
    levels.sort_by_key(|l| l.index);
    if !levels.is_empty() {
        return levels
            .iter()
            .map(|l| {
                // Every device of a level must act; a level naming something that is not
                // a fence device (a CIB's stonith primitive) is empty, which fails over.
                l.devices
                    .iter()
                    .map(|id| device(id).map(|d| fence_step(d, node)))
                    .collect::<Option<Vec<_>>>()
                    .unwrap_or_default()
            })
            .collect();
    }
    config
        .fencing
        .devices
        .iter()
        .filter(|d| d.hosts.is_empty() || d.hosts.iter().any(|h| h == node))
        .map(|d| vec![fence_step(d, node)])
        .collect()
}

fn fence_step(d: &FenceDevice, victim: &str) -> FenceStep {
    let secs = |key: &str| d.params.get(key).and_then(|v| seconds(v));
    let kind = match d.agent.as_str() {
        "manual" | "fence_ack_manual" | "meatware" => StepKind::Manual,
        "watchdog" => StepKind::Watchdog {
            wait: secs("wait").unwrap_or(DEFAULT_WATCHDOG_WAIT),
            timeout: secs("timeout").unwrap_or(Duration::ZERO),
        },
        _ => StepKind::Run {
            timeout: secs("pcmk_reboot_timeout").unwrap_or(DEFAULT_FENCE_TIMEOUT),
        },
    };
    FenceStep {
        device: d.id.clone(),
        kind,
        delay: FenceDelay {
            base: d
                .params
                .get("pcmk_delay_base")
                .and_then(|v| delay_for(v, victim))
                .unwrap_or_default(),
            max: secs("pcmk_delay_max").unwrap_or_default(),
        },
    }
}

/// `5`, `5s`, `500ms`, `1min`: the forms configuration validation accepts.
pub fn seconds(v: &str) -> Option<Duration> {
    haven_model::config::parse_duration(v)
}

/// Pacemaker's `pcmk_delay_base`: one delay for every victim (`5s`), or one per victim
/// (`n1:5s;n2:0`); a victim the map does not name is not delayed.
pub fn delay_for(v: &str, victim: &str) -> Option<Duration> {
    if !v.contains(':') {
        return seconds(v);
    }
    v.split([';', ',', ' '])
        .filter_map(|pair| pair.split_once(':'))
        .find(|(node, _)| node.trim() == victim)
        .and_then(|(_, d)| seconds(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[options]
stonith-enabled = true

[[nodes]]
name = "n1"
addrs = ["127.0.0.11", "127.0.1.11"]

[[nodes]]
name = "n2"

[[resources]]
id = "vm1"
class = "process"
type = "sleep"
ops = [{ name = "monitor", interval = 5, timeout = 7 }, { name = "start", timeout = 30 }]

[[fencing.devices]]
id = "ipmi-n1"
agent = "fence_ipmilan"
hosts = ["n1"]
params = { ip = "127.0.0.1", pcmk_reboot_timeout = "20" }

[[fencing.devices]]
id = "pdu"
agent = "fence_dummy"

[[fencing.devices]]
id = "operator"
agent = "manual"

[[fencing.levels]]
node = "n2"
index = 2
devices = ["operator"]

[[fencing.levels]]
node = "n2"
index = 1
devices = ["pdu"]
"#;

    #[test]
    fn converts_nodes_links_ops_and_fencing() {
        let config = Config::from_toml("test.toml", CONFIG).expect("valid config");
        let c = coordinator_config(&config);
        assert!(c.stonith_enabled);
        assert_eq!(c.nodes[0].links, vec!["link0", "link1"]);
        assert_eq!(c.nodes[1].links, vec!["link0"]);
        let ops = &c.resources["vm1"];
        assert_eq!(ops.monitor_interval, Some(Duration::from_secs(5)));
        assert_eq!(ops.monitor_timeout, Duration::from_secs(7));
        assert_eq!(ops.start_timeout, Duration::from_secs(30));
        // n1: no explicit levels — every capable device, one level each.
        let n1: Vec<_> = c.nodes[0]
            .fence_levels
            .iter()
            .map(|l| l[0].device.as_str())
            .collect();
        assert_eq!(n1, vec!["ipmi-n1", "pdu", "operator"]);
        assert_eq!(
            c.nodes[0].fence_levels[0][0].kind,
            StepKind::Run {
                timeout: Duration::from_secs(20)
            }
        );
        // n2: explicit levels, in index order.
        let n2: Vec<_> = c.nodes[1]
            .fence_levels
            .iter()
            .map(|l| (l[0].device.as_str(), l[0].kind.clone()))
            .collect();
        assert_eq!(n2[0].0, "pdu");
        assert_eq!(n2[1], ("operator", StepKind::Manual));
    }

    #[test]
    fn delays_and_watchdog_timeouts_are_read_per_victim() {
        assert_eq!(delay_for("5", "n1"), Some(Duration::from_secs(5)));
        assert_eq!(delay_for("n1:5s;n2:0", "n1"), Some(Duration::from_secs(5)));
        assert_eq!(delay_for("n1:5s;n2:0", "n2"), Some(Duration::ZERO));
        assert_eq!(delay_for("n1:5s", "n3"), None);
        assert_eq!(seconds("250ms"), Some(Duration::from_millis(250)));
        let text = format!(
            "{CONFIG}\n[[fencing.devices]]\nid = \"wd\"\nagent = \"watchdog\"\n\
             params = {{ wait = \"20\", timeout = \"6\" }}\n\n\
             [[fencing.devices]]\nid = \"lab\"\nagent = \"lab\"\n\
             params = {{ pcmk_delay_base = \"n1:4\", pcmk_delay_max = \"2\" }}\n"
        );
        let config = Config::from_toml("test.toml", &text).expect("valid config");
        let levels = fence_levels(&config, "n1");
        let wd = levels.iter().find(|l| l[0].device == "wd").expect("wd");
        assert_eq!(
            wd[0].kind,
            StepKind::Watchdog {
                wait: Duration::from_secs(20),
                timeout: Duration::from_secs(6)
            }
        );
        let lab = levels.iter().find(|l| l[0].device == "lab").expect("lab");
        assert_eq!(
            lab[0].delay,
            FenceDelay {
                base: Duration::from_secs(4),
                max: Duration::from_secs(2)
            }
        );
    }
}
