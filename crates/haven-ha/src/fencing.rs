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
//! over — its lease, its hardware watchdog's timeout and a margin, whatever shorter
//! wait the configuration names. A device never runs on the node it fences.
//!
//! A device may be delayed (Pacemaker's `pcmk_delay_base` / `pcmk_delay_max`): in a
//! two-node cluster both halves of a split shoot each other, and the delay decides who
//! shoots first, so that exactly one survives.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::time::Time;

/// One device in a fencing level, as the sequencer needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FenceStep {
    /// The device's id in the configuration.
    pub device: String,
    pub kind: StepKind,
    /// How long the device waits before it acts against this victim.
    #[serde(default)]
    pub delay: FenceDelay,
}

/// A device's delay before it acts: a fixed part and a random part up to `max`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FenceDelay {
    pub base: Duration,
    pub max: Duration,
}

impl FenceDelay {
    pub fn is_zero(&self) -> bool {
        self.base.is_zero() && self.max.is_zero()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Run by a node other than the victim (a fence agent, the lab's power switch).
    Run { timeout: Duration },
    /// Wait for an operator's `haven fence ack`.
    Manual,
    /// The victim resets itself; it counts as fenced after this long without it, and
    /// never sooner than its lease plus its hardware watchdog's `timeout` plus a margin.
    Watchdog {
        wait: Duration,
        #[serde(default)]
        timeout: Duration,
    },
}

/// Why a victim is, or was, fenced; shown in `haven fence ls|history`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confirmation {
    Device {
        device: String,
    },
    Manual,
    Watchdog {
        device: String,
    },
    /// Confirmed under an earlier leader (read back from the replicated state).
    Earlier,
}

impl std::fmt::Display for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confirmation::Device { device } => write!(f, "by device {device}"),
            Confirmation::Manual => write!(f, "by an operator's acknowledgement"),
            Confirmation::Watchdog { device } => write!(f, "by watchdog {device} (wait over)"),
            Confirmation::Earlier => write!(f, "under an earlier leader"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimState {
    /// Waiting out the device's delay before running `levels[level][step]`.
    Delaying {
        level: usize,
        step: usize,
        until: Time,
    },
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
    /// The shortest wait a watchdog step may have, before its hardware timeout: the
    /// victim's lease plus a margin.
    watchdog_floor: Duration,
    /// xorshift state for random delays: deterministic for a given seed.
    rng: u64,
    victims: BTreeMap<String, Victim>,
    next_token: u64,
    commands: VecDeque<FenceCommand>,
}

impl Fencer {
    /// `retry_after`: the pause before the levels are tried again once all have failed.
    pub fn new(retry_after: Duration) -> Self {
        Fencer {
            retry_after,
            watchdog_floor: Duration::ZERO,
            rng: 0x9e37_79b9_7f4a_7c15,
            victims: BTreeMap::new(),
            next_token: 0,
            commands: VecDeque::new(),
        }
    }

    /// A watchdog step never confirms sooner than `floor` plus the device's hardware
    /// timeout after it began: the victim may run until its lease is over, and its
    /// watchdog resets it only a timeout after the last keepalive.
    pub fn set_watchdog_floor(&mut self, floor: Duration) {
        self.watchdog_floor = floor;
    }

    /// Seeds the random part of device delays (the daemon: something per node and run;
    /// the simulator and tests: a fixed number, so runs replay).
    pub fn seed(&mut self, seed: u64) {
        self.rng = seed | 1;
    }

    fn random_below(&mut self, max: Duration) -> Duration {
        let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Duration::ZERO;
        }
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        Duration::from_millis(x % (ms + 1))
    }

    /// Takes over what an earlier leader's fencer had reached: a confirmed victim stays
    /// confirmed (it is down, or kept out since); one still in doubt is fenced again from
    /// the first level, since that leader's runs and their answers are lost.
    pub fn restore(
        &mut self,
        victim: &str,
        reason: &str,
        confirmed: bool,
        levels: Vec<Vec<FenceStep>>,
        alive: &[String],
        now: Time,
    ) {
        if self.victims.contains_key(victim) {
            return;
        }
        if confirmed {
            self.victims.insert(
                victim.to_string(),
                Victim {
                    reason: reason.to_string(),
                    levels,
                    state: VictimState::Confirmed {
                        at: now,
                        by: Confirmation::Earlier,
                    },
                },
            );
        } else {
            self.request(victim, reason, levels, alive, now);
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
                VictimState::Delaying { until, .. } => until <= now,
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
                VictimState::Delaying { level, step, .. } => {
                    self.run_now(&name, level, step, alive, now)
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
                    ..
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
        if matches!(s.kind, StepKind::Run { .. }) && !s.delay.is_zero() {
            let wait = s.delay.base + self.random_below(s.delay.max);
            if let Some(v) = self.victims.get_mut(victim) {
                v.state = VictimState::Delaying {
                    level,
                    step,
                    until: now + wait,
                };
            }
            return;
        }
        self.run_now(victim, level, step, alive, now);
    }

    fn run_now(&mut self, victim: &str, level: usize, step: usize, alive: &[String], now: Time) {
        let Some(s) = self.step(victim, level, step).cloned() else {
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
            StepKind::Watchdog { wait, timeout } => {
                let floor = self.watchdog_floor + timeout;
                if wait < floor {
                    self.alert(
                        victim,
                        format!(
                            "watchdog {}: waiting {floor:?} for {victim}, not the configured \
                             {wait:?}: its lease plus the watchdog's timeout plus a margin",
                            s.device
                        ),
                    );
                }
                if let Some(v) = self.victims.get_mut(victim) {
                    v.state = VictimState::WaitingWatchdog {
                        level,
                        step,
                        until: now + wait.max(floor),
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

    /// What a new leader must know: each victim, whether it is confirmed, and why.
    pub fn marks(&self) -> impl Iterator<Item = (&str, bool, &str)> {
        self.victims.iter().map(|(n, v)| {
            (
                n.as_str(),
                matches!(v.state, VictimState::Confirmed { .. }),
                v.reason.as_str(),
            )
        })
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
                VictimState::Delaying { until, .. } => Some(until),
                VictimState::Exhausted { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }
}

/// Two-node clusters: the fence marks a coordinator starts from, once a confirmed fence
/// has decided a race. When one node is confirmed fenced, a mark that holds the other
/// in doubt is dropped: it can only have been made by the fenced node (or for it)
/// before the fence, and the survivor is evidently up. Kept, it would make the winner
/// of the race hold itself in doubt (it cannot fence itself, so nothing recovers), and
/// make the loser, back from its reboot and leading, shoot the winner — what the delay
/// promised would not happen. This is Pacemaker's view: a confirmed fence of the peer
/// supersedes the peer's earlier doubt about us, and a node that learns it was fenced
/// does not act on what it decided before. With both nodes confirmed (nothing can
/// tell which came first) every mark is kept.
pub fn after_two_node_race(marks: Vec<(String, bool, String)>) -> Vec<(String, bool, String)> {
    let confirmed = marks.iter().filter(|(_, confirmed, _)| *confirmed).count();
    if confirmed != 1 {
        return marks;
    }
    marks
        .into_iter()
        .filter(|(_, confirmed, _)| *confirmed)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn mark(n: &str, confirmed: bool) -> (String, bool, String) {
        (n.into(), confirmed, "lost".into())
    }

    #[test]
    fn a_confirmed_fence_of_the_peer_drops_the_doubt_it_held_about_the_survivor() {
        let marks = after_two_node_race(vec![mark("n1", true), mark("n2", false)]);
        assert_eq!(marks, vec![mark("n1", true)]);
        // Either side of the race, and whoever holds the marks.
        let marks = after_two_node_race(vec![mark("n2", true), mark("n1", false)]);
        assert_eq!(marks, vec![mark("n2", true)]);
    }

    #[test]
    fn without_a_confirmed_fence_or_with_two_every_mark_stays() {
        for marks in [
            vec![mark("n1", false)],
            vec![mark("n1", false), mark("n2", false)],
            vec![mark("n1", true), mark("n2", true)],
            vec![],
        ] {
            assert_eq!(after_two_node_race(marks.clone()), marks);
        }
    }

    fn run(device: &str) -> FenceStep {
        FenceStep {
            device: device.into(),
            kind: StepKind::Run {
                timeout: Duration::from_secs(10),
            },
            delay: FenceDelay::default(),
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
            delay: FenceDelay::default(),
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
                timeout: Duration::ZERO,
            },
            delay: FenceDelay::default(),
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
            delay: FenceDelay::default(),
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

    #[test]
    fn a_watchdog_never_confirms_before_lease_plus_timeout_plus_margin() {
        let mut f = Fencer::new(Duration::from_secs(5));
        // Lease 2 s + margin 1 s; the device's hardware timeout is 4 s; the
        // configuration asks for only 1 s, which would recover while the victim runs.
        f.set_watchdog_floor(Duration::from_secs(3));
        let wd = FenceStep {
            device: "wd".into(),
            kind: StepKind::Watchdog {
                wait: Duration::from_secs(1),
                timeout: Duration::from_secs(4),
            },
            delay: FenceDelay::default(),
        };
        f.request("n2", "lost", vec![vec![wd]], &alive(), Time(0));
        let cmds = drain(&mut f);
        assert!(
            cmds.iter().any(
                |c| matches!(c, FenceCommand::Alert { message, .. } if message.contains("lease"))
            ),
            "{cmds:?}"
        );
        f.handle_timeout(&alive(), Time(6_999));
        assert!(!f.is_confirmed("n2"), "confirmed inside lease + timeout");
        f.handle_timeout(&alive(), Time(7_000));
        assert!(f.is_confirmed("n2"));
    }

    #[test]
    fn a_delayed_device_acts_only_after_its_delay_and_random_delays_replay() {
        let delayed = |base: u64, max: u64| FenceStep {
            delay: FenceDelay {
                base: Duration::from_millis(base),
                max: Duration::from_millis(max),
            },
            ..run("power")
        };
        let mut f = Fencer::new(Duration::from_secs(5));
        f.request(
            "n2",
            "lost",
            vec![vec![delayed(3_000, 0)]],
            &alive(),
            Time(0),
        );
        assert!(drain(&mut f).is_empty());
        assert_eq!(f.poll_timeout(), Some(Time(3_000)));
        f.handle_timeout(&alive(), Time(2_999));
        assert!(drain(&mut f).is_empty());
        f.handle_timeout(&alive(), Time(3_000));
        only_run(&drain(&mut f));
        let random = |seed| {
            let mut f = Fencer::new(Duration::from_secs(5));
            f.seed(seed);
            f.request(
                "n2",
                "lost",
                vec![vec![delayed(0, 10_000)]],
                &alive(),
                Time(0),
            );
            f.poll_timeout()
        };
        assert_eq!(random(7), random(7), "a seed replays");
        let spread: BTreeSet<_> = (0..20).map(random).collect();
        assert!(spread.len() > 1, "the random part varies with the seed");
        assert!(spread.iter().all(|t| t.is_some_and(|t| t <= Time(10_000))));
    }

    #[test]
    fn a_new_leader_resumes_a_fence_in_doubt_and_keeps_a_confirmed_one() {
        let mut f = Fencer::new(Duration::from_secs(5));
        f.restore(
            "n2",
            "lost",
            false,
            vec![vec![run("power")]],
            &alive(),
            Time(0),
        );
        let (_, dev, executor) = only_run(&drain(&mut f));
        assert_eq!((dev.as_str(), executor.as_str()), ("power", "n1"));
        assert_eq!(f.in_doubt().collect::<Vec<_>>(), vec!["n2"]);
        f.restore(
            "n3",
            "lost",
            true,
            vec![vec![run("power")]],
            &alive(),
            Time(0),
        );
        assert!(f.is_confirmed("n3"));
        assert!(
            drain(&mut f).is_empty(),
            "a confirmed victim is not fenced again"
        );
        let marks: Vec<_> = f.marks().map(|(n, c, _)| (n.to_string(), c)).collect();
        assert_eq!(marks, vec![("n2".into(), false), ("n3".into(), true)]);
    }
}
