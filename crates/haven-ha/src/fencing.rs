//! The fencing sequencer: how a node in doubt is made safe, level by level.
//!
//! Semantics follow Pacemaker's fencing topology: the levels of a victim are
//! alternatives tried in order; within a level every device must succeed (two PDUs
//! feeding one host). A level fails on the first device that fails or times out, and the
//! next level is tried. When every level has failed, the victim stays in doubt — its
//! resources stay frozen — and the whole sequence is retried after a pause; the operator
//! is told each time. A manual acknowledgement (the seeds' meatware /
//! `fence_ack_manual`) confirms at any point. A watchdog step confirms by waiting: a
//! node that lost quorum resets itself, so it is safe once its lease plus a margin is
//! over. A device never runs on the node it fences.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::time::Time;

/// One device in a fencing level, as the sequencer needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FenceStep {
    /// The device's id in the configuration.
    pub device: String,
    pub kind: StepKind,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Run by a node other than the victim (a fence agent, the lab's power switch).
    Run { timeout: Duration },
    /// Wait for an operator's `haven fence ack`.
    Manual,
    /// The victim resets itself; it counts as fenced after this long without it.
    Watchdog { wait: Duration },
}

/// Why a victim is, or was, fenced; shown in `haven fence ls|history`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confirmation {
    Device { device: String },
    Manual,
    Watchdog { device: String },
}

impl std::fmt::Display for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confirmation::Device { device } => write!(f, "by device {device}"),
            Confirmation::Manual => write!(f, "by an operator's acknowledgement"),
            Confirmation::Watchdog { device } => write!(f, "by watchdog {device} (wait over)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimState {
    /// Running `levels[level][step]` on `executor`.
    Running {
        level: usize,
        step: usize,
        executor: String,
        token: u64,
        deadline: Time,
    },
    WaitingManual {
        level: usize,
        step: usize,
        since: Time,
    },
    WaitingWatchdog {
        level: usize,
        step: usize,
        until: Time,
    },
    /// Every level failed; the sequence restarts at `retry_at`.
    Exhausted {
        retry_at: Time,
    },
    Confirmed {
        at: Time,
        by: Confirmation,
    },
}

/// What the sequencer wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceCommand {
    /// Run `device` against `victim` on node `executor`; answer with `handle_result`.
    Run {
        token: u64,
        victim: String,
        device: String,
        executor: String,
        timeout: Duration,
    },
    /// Tell the operator (log, event stream): something needs them or has happened.
    Alert { victim: String, message: String },
    /// `victim` is confirmed safe: its resources may be recovered elsewhere.
    Confirmed { victim: String, by: Confirmation },
}

#[derive(Clone, Debug)]
struct Victim {
    reason: String,
    levels: Vec<Vec<FenceStep>>,
    state: VictimState,
}

/// Sans-IO fencing sequencer for all victims.
#[derive(Clone, Debug)]
pub struct Fencer {
    retry_after: Duration,
    victims: BTreeMap<String, Victim>,
    next_token: u64,
    commands: VecDeque<FenceCommand>,
}

impl Fencer {
    /// `retry_after`: the pause before the levels are tried again once all have failed.
    pub fn new(retry_after: Duration) -> Self {
        Fencer {
            retry_after,
            victims: BTreeMap::new(),
            next_token: 0,
            commands: VecDeque::new(),
        }
    }

    /// Starts fencing `victim` unless it is already being fenced or confirmed.
    /// `alive` are the nodes that may execute a device (the victim is never used).
    pub fn request(
        &mut self,
        victim: &str,
        reason: &str,
        levels: Vec<Vec<FenceStep>>,
        alive: &[String],
        now: Time,
    ) {
        if self.victims.contains_key(victim) {
            return;
        }
        self.victims.insert(
            victim.to_string(),
            Victim {
                reason: reason.to_string(),
                levels,
                state: VictimState::Exhausted { retry_at: now },
            },
        );
        self.start_level(victim, 0, alive, now);
    }

    /// An operator confirms `victim` is down (power pulled, host dead). Their word ends
    /// any sequence, as `fence_ack_manual` does.
    pub fn handle_ack(&mut self, victim: &str, now: Time) -> bool {
        let Some(v) = self.victims.get_mut(victim) else {
            return false;
        };
        if matches!(v.state, VictimState::Confirmed { .. }) {
            return false;
        }
        v.state = VictimState::Confirmed {
            at: now,
            by: Confirmation::Manual,
        };
        self.commands.push_back(FenceCommand::Confirmed {
            victim: victim.to_string(),
            by: Confirmation::Manual,
        });
        true
    }

    /// A `FenceCommand::Run` finished.
    pub fn handle_result(&mut self, token: u64, success: bool, alive: &[String], now: Time) {
        let Some((name, level, step)) = self.victims.iter().find_map(|(n, v)| match v.state {
            VictimState::Running {
                token: t,
                level,
                step,
                ..
            } if t == token => Some((n.clone(), level, step)),
            _ => None,
        }) else {
            return; // late answer for a sequence that moved on
        };
        if success {
            self.next_step(&name, level, step, alive, now);
        } else {
            let device = self.step(&name, level, step).map(|s| s.device.clone());
            self.alert(
                &name,
                format!(
                    "fence device {} failed against {name}; trying the next level",
                    device.unwrap_or_default()
                ),
            );
            self.start_level(&name, level + 1, alive, now);
        }
    }

    /// Expires device deadlines and watchdog waits, and restarts exhausted sequences.
    pub fn handle_timeout(&mut self, alive: &[String], now: Time) {
        let due: Vec<(String, VictimState)> = self
            .victims
            .iter()
            .filter(|(_, v)| match v.state {
                VictimState::Running { deadline, .. } => deadline <= now,
                VictimState::WaitingWatchdog { until, .. } => until <= now,
                VictimState::Exhausted { retry_at } => retry_at <= now,
                _ => false,
            })
            .map(|(n, v)| (n.clone(), v.state.clone()))
            .collect();
        for (name, state) in due {
            match state {
                VictimState::Running { level, step, .. } => {
                    let device = self.step(&name, level, step).map(|s| s.device.clone());
                    self.alert(
                        &name,
                        format!(
                            "fence device {} timed out against {name}; trying the next level",
                            device.unwrap_or_default()
                        ),
                    );
                    self.start_level(&name, level + 1, alive, now);
                }
                VictimState::WaitingWatchdog { level, step, .. } => {
                    self.next_step(&name, level, step, alive, now)
                }
                VictimState::Exhausted { .. } => self.start_level(&name, 0, alive, now),
                _ => {}
            }
        }
    }

    fn step(&self, victim: &str, level: usize, step: usize) -> Option<&FenceStep> {
        self.victims.get(victim)?.levels.get(level)?.get(step)
    }

    fn next_step(&mut self, victim: &str, level: usize, step: usize, alive: &[String], now: Time) {
        let done_level = self
            .victims
            .get(victim)
            .and_then(|v| v.levels.get(level))
            .is_none_or(|l| step + 1 >= l.len());
        if done_level {
            let by = match self.step(victim, level, step) {
                Some(FenceStep {
                    device,
                    kind: StepKind::Watchdog { .. },
                }) => Confirmation::Watchdog {
                    device: device.clone(),
                },
                Some(s) => Confirmation::Device {
                    device: s.device.clone(),
                },
                None => Confirmation::Manual,
            };
            if let Some(v) = self.victims.get_mut(victim) {
                v.state = VictimState::Confirmed {
                    at: now,
                    by: by.clone(),
                };
            }
            self.commands.push_back(FenceCommand::Confirmed {
                victim: victim.to_string(),
                by,
            });
        } else {
            self.run_step(victim, level, step + 1, alive, now);
        }
    }

    fn start_level(&mut self, victim: &str, level: usize, alive: &[String], now: Time) {
        let levels = self.victims.get(victim).map_or(0, |v| v.levels.len());
        if level >= levels {
            let retry_at = now + self.retry_after;
            if let Some(v) = self.victims.get_mut(victim) {
                v.state = VictimState::Exhausted { retry_at };
            }
            let message = if levels == 0 {
                format!(
                    "{victim} must be fenced but has no fence device: its resources stay \
                     frozen until `haven fence ack {victim}` confirms it is down"
                )
            } else {
                format!(
                    "every fencing level failed against {victim}; its resources stay frozen; \
                     retrying at {retry_at} (or confirm with `haven fence ack {victim}`)"
                )
            };
            self.alert(victim, message);
            return;
        }
        self.run_step(victim, level, 0, alive, now);
    }

    fn run_step(&mut self, victim: &str, level: usize, step: usize, alive: &[String], now: Time) {
        let Some(s) = self.step(victim, level, step).cloned() else {
            // An empty level can fence nothing: it has failed, try the next one.
            self.alert(
                victim,
                format!("fencing level {} for {victim} has no device", level + 1),
            );
            self.start_level(victim, level + 1, alive, now);
            return;
        };
        match s.kind {
            StepKind::Run { timeout } => {
                // Prefer a stable choice (the first alive node by name) so a retry goes
                // to the same executor unless it died.
                let Some(executor) = alive.iter().filter(|n| n.as_str() != victim).min().cloned()
                else {
                    self.alert(
                        victim,
                        format!("no node can run fence device {} against {victim}", s.device),
                    );
                    self.start_level(victim, level + 1, alive, now);
                    return;
                };
                let token = self.next_token;
                self.next_token += 1;
                if let Some(v) = self.victims.get_mut(victim) {
                    v.state = VictimState::Running {
                        level,
                        step,
                        executor: executor.clone(),
                        token,
                        deadline: now + timeout,
                    };
                }
                self.commands.push_back(FenceCommand::Run {
                    token,
                    victim: victim.to_string(),
                    device: s.device,
                    executor,
                    timeout,
                });
            }
            StepKind::Manual => {
                if let Some(v) = self.victims.get_mut(victim) {
                    v.state = VictimState::WaitingManual {
                        level,
                        step,
                        since: now,
                    };
                }
                self.alert(
                    victim,
                    format!(
                        "{victim} must be fenced by hand: power it off, then run \
                         `haven fence ack {victim}`"
                    ),
                );
            }
            StepKind::Watchdog { wait } => {
                if let Some(v) = self.victims.get_mut(victim) {
                    v.state = VictimState::WaitingWatchdog {
                        level,
                        step,
                        until: now + wait,
                    };
                }
            }
        }
    }

    fn alert(&mut self, victim: &str, message: String) {
        self.commands.push_back(FenceCommand::Alert {
            victim: victim.to_string(),
            message,
        });
    }

    /// The node is back and clean (rejoined after a reboot): forget its sequence.
    pub fn clear(&mut self, victim: &str) {
        self.victims.remove(victim);
    }

    pub fn is_confirmed(&self, victim: &str) -> bool {
        self.victims
            .get(victim)
            .is_some_and(|v| matches!(v.state, VictimState::Confirmed { .. }))
    }

    /// Victims not yet confirmed: the nodes in doubt.
    pub fn in_doubt(&self) -> impl Iterator<Item = &str> {
        self.victims
            .iter()
            .filter(|(_, v)| !matches!(v.state, VictimState::Confirmed { .. }))
            .map(|(n, _)| n.as_str())
    }

    /// Every victim with its reason and state, for `haven fence ls`.
    pub fn victims(&self) -> impl Iterator<Item = (&str, &str, &VictimState)> {
        self.victims
            .iter()
            .map(|(n, v)| (n.as_str(), v.reason.as_str(), &v.state))
    }

    pub fn poll_command(&mut self) -> Option<FenceCommand> {
        self.commands.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        self.victims
            .values()
            .filter_map(|v| match v.state {
                VictimState::Running { deadline, .. } => Some(deadline),
                VictimState::WaitingWatchdog { until, .. } => Some(until),
                VictimState::Exhausted { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(device: &str) -> FenceStep {
        FenceStep {
            device: device.into(),
            kind: StepKind::Run {
                timeout: Duration::from_secs(10),
            },
        }
    }

    fn alive() -> Vec<String> {
        vec!["n1".into(), "n2".into(), "n3".into()]
    }

    fn drain(f: &mut Fencer) -> Vec<FenceCommand> {
        std::iter::from_fn(|| f.poll_command()).collect()
    }

    fn only_run(cmds: &[FenceCommand]) -> (u64, String, String) {
        let runs: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                FenceCommand::Run {
                    token,
                    device,
                    executor,
                    ..
                } => Some((*token, device.clone(), executor.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(runs.len(), 1, "expected one run in {cmds:?}");
        runs[0].clone()
    }

    fn confirmed(cmds: &[FenceCommand]) -> Option<Confirmation> {
        cmds.iter().find_map(|c| match c {
            FenceCommand::Confirmed { by, .. } => Some(by.clone()),
            _ => None,
        })
    }

    #[test]
    fn device_never_runs_on_its_victim() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request("n1", "lost", vec![vec![run("ipmi-n1")]], &alive(), Time(0));
        let (_, _, executor) = only_run(&drain(&mut f));
        assert_ne!(executor, "n1");
    }

    #[test]
    fn failing_first_level_escalates_to_second() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request(
            "n3",
            "lost",
            vec![vec![run("ipmi")], vec![run("pdu")]],
            &alive(),
            Time(0),
        );
        let (t, dev, _) = only_run(&drain(&mut f));
        assert_eq!(dev, "ipmi");
        f.handle_result(t, false, &alive(), Time(100));
        let cmds = drain(&mut f);
        let (t, dev, _) = only_run(&cmds);
        assert_eq!(dev, "pdu");
        assert!(!f.is_confirmed("n3"));
        f.handle_result(t, true, &alive(), Time(200));
        assert_eq!(
            confirmed(&drain(&mut f)),
            Some(Confirmation::Device {
                device: "pdu".into()
            })
        );
        assert!(f.is_confirmed("n3"));
    }

    #[test]
    fn timeout_counts_as_failure_and_late_success_is_ignored() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request("n3", "lost", vec![vec![run("ipmi")]], &alive(), Time(0));
        let (t, _, _) = only_run(&drain(&mut f));
        f.handle_timeout(&alive(), Time(10_000));
        f.handle_result(t, true, &alive(), Time(10_001));
        assert!(!f.is_confirmed("n3"), "a late answer must not confirm");
        assert_eq!(f.in_doubt().collect::<Vec<_>>(), vec!["n3"]);
        // Exhausted: retried after the pause.
        assert_eq!(f.poll_timeout(), Some(Time(15_000)));
        drain(&mut f);
        f.handle_timeout(&alive(), Time(15_000));
        let (_, dev, _) = only_run(&drain(&mut f));
        assert_eq!(dev, "ipmi");
    }

    #[test]
    fn every_device_of_a_level_must_succeed() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request(
            "n2",
            "lost",
            vec![vec![run("pdu-a"), run("pdu-b")]],
            &alive(),
            Time(0),
        );
        let (t, dev, _) = only_run(&drain(&mut f));
        assert_eq!(dev, "pdu-a");
        f.handle_result(t, true, &alive(), Time(1));
        let cmds = drain(&mut f);
        assert_eq!(confirmed(&cmds), None);
        let (t, dev, _) = only_run(&cmds);
        assert_eq!(dev, "pdu-b");
        f.handle_result(t, true, &alive(), Time(2));
        assert!(f.is_confirmed("n2"));
    }

    #[test]
    fn no_device_stays_frozen_until_manual_ack() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request("n2", "lost", vec![], &alive(), Time(0));
        let cmds = drain(&mut f);
        assert!(cmds
            .iter()
            .any(|c| matches!(c, FenceCommand::Alert { message, .. } if message.contains("haven fence ack n2"))));
        f.handle_timeout(&alive(), Time(60_000));
        assert!(!f.is_confirmed("n2"));
        assert!(f.handle_ack("n2", Time(61_000)));
        assert_eq!(confirmed(&drain(&mut f)), Some(Confirmation::Manual));
    }

    #[test]
    fn an_empty_level_fails_over_to_the_next() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request(
            "n3",
            "lost",
            vec![vec![], vec![run("pdu")]],
            &alive(),
            Time(0),
        );
        let (_, dev, _) = only_run(&drain(&mut f));
        assert_eq!(dev, "pdu");
    }

    #[test]
    fn manual_step_waits_for_ack() {
        let mut f = Fencer::new(Duration::from_secs(5));
        let manual = FenceStep {
            device: "meatware".into(),
            kind: StepKind::Manual,
        };
        f.request("n2", "lost", vec![vec![manual]], &alive(), Time(0));
        f.handle_timeout(&alive(), Time(3_600_000));
        assert!(!f.is_confirmed("n2"));
        f.handle_ack("n2", Time(3_600_001));
        assert!(f.is_confirmed("n2"));
    }

    #[test]
    fn watchdog_confirms_only_after_its_wait() {
        let mut f = Fencer::new(Duration::from_secs(5));
        let wd = FenceStep {
            device: "wd".into(),
            kind: StepKind::Watchdog {
                wait: Duration::from_secs(3),
            },
        };
        f.request("n2", "lost", vec![vec![wd]], &alive(), Time(1_000));
        f.handle_timeout(&alive(), Time(3_999));
        assert!(!f.is_confirmed("n2"));
        f.handle_timeout(&alive(), Time(4_000));
        assert_eq!(
            confirmed(&drain(&mut f)),
            Some(Confirmation::Watchdog {
                device: "wd".into()
            })
        );
    }

    #[test]
    fn no_executor_but_the_victim_moves_to_next_level() {
        let mut f = Fencer::new(Duration::from_secs(5));
        let only_victim = vec!["n1".to_string()];
        let manual = FenceStep {
            device: "meatware".into(),
            kind: StepKind::Manual,
        };
        f.request(
            "n1",
            "lost",
            vec![vec![run("ipmi")], vec![manual]],
            &only_victim,
            Time(0),
        );
        let cmds = drain(&mut f);
        assert!(cmds.iter().all(|c| !matches!(c, FenceCommand::Run { .. })));
        assert!(matches!(
            f.victims().next().map(|v| v.2),
            Some(VictimState::WaitingManual { .. })
        ));
    }
}
