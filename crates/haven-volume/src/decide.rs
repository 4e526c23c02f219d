//! Pure decisions about replicas: what two replicas do when they connect (who syncs from
//! whom, split brain and its resolution), and whether a promotion is allowed. No I/O:
//! both ends of a connection run [`plan_connection`] on the same two views and reach
//! mirror-image answers.

use crate::meta::{DiskState, Role};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a replica tells a peer about itself when they connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideView {
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub epoch: u64,
    pub current_gen: u64,
    pub history: Vec<u64>,
    /// Regions this side wrote while the other was away.
    pub changes: u64,
    pub promoted_at_ms: u64,
    pub crashed_primary: bool,
    /// The operator chose to throw this side's data away (manual split-brain resolution).
    pub discard_my_data: bool,
    /// The operator, on this side, chose to throw the other side's data away.
    pub discard_peer: bool,
    pub allow_two_primaries: bool,
    /// A secondary that is UpToDate and replicating from a connected primary right now:
    /// it holds exactly the primary's data, whatever its bitmaps say.
    #[serde(default)]
    pub in_sync_with_primary: bool,
    /// A migration window message; only in a hello sent on an established connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowMsg>,
}

/// The two replicas' handshake that opens a dual-primary migration window. The target
/// asks (the cluster told it to promote with the source named); the source checks it
/// is the one primary, both are UpToDate and connected, and grants or refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowMsg {
    Ask { source: String, target: String },
    Grant { source: String, target: String },
    Refuse { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    Disconnect,
    DiscardZeroChanges,
    DiscardLeastChanges,
    DiscardYoungerPrimary,
}

impl std::str::FromStr for SplitBrainPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disconnect" => SplitBrainPolicy::Disconnect,
            "discard-zero-changes" => SplitBrainPolicy::DiscardZeroChanges,
            "discard-least-changes" => SplitBrainPolicy::DiscardLeastChanges,
            "discard-younger-primary" => SplitBrainPolicy::DiscardYoungerPrimary,
            _ => {
                return Err(format!(
                    "unknown split-brain policy `{s}`; use disconnect, discard-zero-changes, \
                     discard-least-changes or discard-younger-primary"
                ));
            }
        })
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Both sides diverged and the policy (or its safety limit) did not pick a loser.
    SplitBrain,
    /// Neither side holds consistent data.
    NoGoodData,
    /// The data share no history: not replicas of the same thing.
    Unrelated,
    /// Two primaries outside a dual-primary window.
    TwoPrimaries,
    /// A sync would overwrite a primary's data under its client.
    PrimaryWouldBeTarget,
    /// Both operators asked to discard their own data.
    BothDiscard,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::SplitBrain => {
                "split brain: both sides changed; resolve naming the side to discard"
            }
            Refusal::NoGoodData => "neither side has consistent data",
            Refusal::Unrelated => "the replicas share no generation: different data",
            Refusal::TwoPrimaries => {
                "both sides are primary and dual-primary is not allowed on both"
            }
            Refusal::PrimaryWouldBeTarget => {
                "a primary's data would be overwritten; demote it first"
            }
            Refusal::BothDiscard => "both sides asked to discard their own data",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    InSync,
    /// This side sends; `full` means every region, otherwise the union of both bitmaps.
    Source {
        full: bool,
    },
    Target {
        full: bool,
    },
    Refuse(Refusal),
}

/// The outcome of a connection seen from the local side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub plan: Plan,
    /// Whether split brain was detected (even if a policy resolved it).
    pub split_brain: bool,
    /// The local side is a primary from an older epoch than the peer has seen: it is
    /// deposed and must stop accepting writes.
    pub local_deposed: bool,
    pub peer_deposed: bool,
}

impl Plan {
    #[cfg(test)]
    fn mirror(&self) -> Plan {
        match self {
            Plan::Source { full } => Plan::Target { full: *full },
            Plan::Target { full } => Plan::Source { full: *full },
            p => p.clone(),
        }
    }
}

fn ancestry(side: &SideView) -> impl Iterator<Item = u64> + '_ {
    std::iter::once(side.current_gen)
        .chain(side.history.iter().copied())
        .filter(|g| *g != 0)
}

/// Decides what happens when `local` and `peer` connect.
pub fn plan_connection(local: &SideView, peer: &SideView, policy: SplitBrainPolicy) -> Outcome {
    // A primary whose epoch is older than the other side's is deposed: treat it as a
    // secondary from here on, identically on both ends.
    let local_deposed = local.role == Role::Primary && local.epoch < peer.epoch;
    let peer_deposed = peer.role == Role::Primary && peer.epoch < local.epoch;
    let mut l = local.clone();
    let mut p = peer.clone();
    if local_deposed {
        l.role = Role::Secondary;
    }
    if peer_deposed {
        p.role = Role::Secondary;
    }
    let (plan, split_brain) = plan_inner(&l, &p, policy);
    Outcome {
        plan,
        split_brain,
        local_deposed,
        peer_deposed,
    }
}

fn plan_inner(l: &SideView, p: &SideView, policy: SplitBrainPolicy) -> (Plan, bool) {
    use Plan::*;
    if l.role == Role::Primary
        && p.role == Role::Primary
        && !(l.allow_two_primaries && p.allow_two_primaries)
    {
        return (Refuse(Refusal::TwoPrimaries), false);
    }
    let crashed = l.crashed_primary || p.crashed_primary;
    let related = ancestry(l).any(|g| ancestry(p).any(|h| h == g));
    let guard = |plan: Plan| -> Plan {
        match plan {
            Target { .. } if l.role == Role::Primary => Refuse(Refusal::PrimaryWouldBeTarget),
            Source { .. } if p.role == Role::Primary => Refuse(Refusal::PrimaryWouldBeTarget),
            other => other,
        }
    };

    // The operator's word settles a split brain.
    let l_loses = l.discard_my_data || p.discard_peer;
    let p_loses = p.discard_my_data || l.discard_peer;
    if l_loses && p_loses {
        return (Refuse(Refusal::BothDiscard), false);
    }
    if l_loses || p_loses {
        let full = crashed || !related;
        let plan = if l_loses {
            Target { full }
        } else {
            Source { full }
        };
        return (guard(plan), false);
    }

    let l_ok = l.disk != DiskState::Inconsistent;
    let p_ok = p.disk != DiskState::Inconsistent;
    match (l_ok, p_ok) {
        (false, false) => return (Refuse(Refusal::NoGoodData), false),
        (false, true) => return (guard(Target { full: true }), false),
        (true, false) => return (guard(Source { full: true }), false),
        (true, true) => {}
    }

    // Two secondaries both following the primary hold the same data: bits either set
    // for the other while it was away are covered by the primary's own resync of it.
    if l.in_sync_with_primary
        && p.in_sync_with_primary
        && l.role == Role::Secondary
        && p.role == Role::Secondary
    {
        return (InSync, false);
    }

    if l.current_gen == p.current_gen {
        let plan = match (l.crashed_primary, p.crashed_primary) {
            (true, false) => Source { full: true },
            (false, true) => Target { full: true },
            (true, true) => return (Refuse(Refusal::SplitBrain), true),
            (false, false) => match (l.changes > 0, p.changes > 0) {
                (false, false) => InSync,
                (true, false) => Source { full: false },
                (false, true) => Target { full: false },
                (true, true) => return resolve_split_brain(l, p, policy, crashed),
            },
        };
        return (guard(plan), false);
    }
    let l_ahead = l.history.contains(&p.current_gen);
    let p_ahead = p.history.contains(&l.current_gen);
    // Only a primary's bitmap is known to cover everything its peer missed: a secondary
    // marks a region for a peer only if it saw that peer gone, and a peer cut off from
    // the primary alone looked present to it. So a secondary source sends everything.
    // Ahead by a generation alone, with nothing written for the other since, against a
    // primary that never started one: a window target cut off from its source, which
    // then got the guest while the source was demoted. The target acknowledged nothing
    // after the cut and the source wrote nothing, so the primary (whose data is in
    // use) is the source; anything the other side did write is a true ambiguity and
    // goes to the operator below.
    let quiet_behind_primary = |ahead: &SideView, primary: &SideView| {
        !crashed
            && ahead.role == Role::Secondary
            && ahead.changes == 0
            && primary.role == Role::Primary
    };
    match (l_ahead, p_ahead) {
        (true, false) if quiet_behind_primary(l, p) => return (Target { full: false }, false),
        (false, true) if quiet_behind_primary(p, l) => return (Source { full: false }, false),
        _ => {}
    }
    match (l_ahead, p_ahead) {
        (true, false) => {
            let full = crashed || l.role == Role::Secondary;
            return (guard(Source { full }), false);
        }
        (false, true) => {
            let full = crashed || p.role == Role::Secondary;
            return (guard(Target { full }), false);
        }
        // Each claims to descend from the other: nothing sane to trust.
        (true, true) => return resolve_split_brain(l, p, policy, crashed),
        (false, false) => {}
    }
    if related {
        return resolve_split_brain(l, p, policy, crashed);
    }
    (Refuse(Refusal::Unrelated), false)
}

fn resolve_split_brain(
    l: &SideView,
    p: &SideView,
    policy: SplitBrainPolicy,
    full: bool,
) -> (Plan, bool) {
    use std::cmp::Ordering::*;
    // `Less` means the local side loses (becomes the sync target).
    let loser = match policy {
        SplitBrainPolicy::Disconnect => None,
        SplitBrainPolicy::DiscardZeroChanges => match (l.changes, p.changes) {
            (0, c) if c > 0 => Some(Less),
            (c, 0) if c > 0 => Some(Greater),
            _ => None,
        },
        SplitBrainPolicy::DiscardLeastChanges => match l.changes.cmp(&p.changes) {
            Equal => None,
            o => Some(o),
        },
        SplitBrainPolicy::DiscardYoungerPrimary => match p.promoted_at_ms.cmp(&l.promoted_at_ms) {
            Equal => None,
            o => Some(o),
        },
    };
    let plan = match loser {
        // A primary's data is in use by its client: never discard it automatically.
        Some(Less) if l.role != Role::Primary => Plan::Target { full },
        Some(Greater) if p.role != Role::Primary => Plan::Source { full },
        _ => Plan::Refuse(Refusal::SplitBrain),
    };
    (plan, true)
}

/// The state of one peer as the promotion check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    pub node: String,
    pub connected: bool,
    pub role: Option<Role>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PromoteError {
    #[error(
        "refusing to promote: the local disk is {0:?}; only an UpToDate replica may be promoted"
    )]
    NotUpToDate(DiskState),
    #[error(
        "refusing to promote: peer {0} is unreachable and not confirmed fenced or outdated \
         (pass --peer-fenced {0} once the cluster has fenced it)"
    )]
    PeerNotFenced(String),
    #[error(
        "refusing to promote: peer {0} is primary; two primaries need --allow-two-primaries \
         on both sides (a live-migration window)"
    )]
    PeerIsPrimary(String),
    #[error("refusing to open a migration window from {source_node}: {reason}")]
    Window { source_node: String, reason: String },
}

/// One peer as a migration window's check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPeer {
    pub node: String,
    pub connected: bool,
    pub established: bool,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
}

/// Whether a replica may be promoted beside `source`'s primary for a live migration:
/// it is UpToDate and replicating from `source`, the one primary, itself UpToDate and
/// connected; any other peer is connected or confirmed fenced (as for any promote).
pub fn check_window_promote(
    disk: DiskState,
    peers: &[WindowPeer],
    source: &str,
    fenced: &[String],
) -> Result<(), PromoteError> {
    if disk != DiskState::UpToDate {
        return Err(PromoteError::NotUpToDate(disk));
    }
    let refuse = |reason: &str| PromoteError::Window {
        source_node: source.to_string(),
        reason: reason.to_string(),
    };
    let Some(src) = peers.iter().find(|p| p.node == source) else {
        return Err(refuse("it is not a peer of this volume"));
    };
    if !src.connected || !src.established {
        return Err(refuse("it is not connected and replicating"));
    }
    if src.role != Some(Role::Primary) {
        return Err(refuse("it is not primary"));
    }
    if src.disk != Some(DiskState::UpToDate) {
        return Err(refuse("its disk is not UpToDate"));
    }
    for p in peers.iter().filter(|p| p.node != source) {
        if !p.connected && !fenced.contains(&p.node) {
            return Err(PromoteError::PeerNotFenced(p.node.clone()));
        }
        if p.role == Some(Role::Primary) {
            return Err(refuse(&format!("{} is primary too", p.node)));
        }
    }
    Ok(())
}

/// The source's side of the handshake: may `target` become a second primary now?
pub fn grant_window(
    role: Role,
    disk: DiskState,
    target: &WindowPeer,
    open_window: Option<&str>,
) -> Result<(), String> {
    if role != Role::Primary {
        return Err("the source is not primary".into());
    }
    if disk != DiskState::UpToDate {
        return Err("the source's disk is not UpToDate".into());
    }
    if let Some(other) = open_window.filter(|w| *w != target.node) {
        return Err(format!("a window with {other} is already open"));
    }
    if !target.established || target.disk != Some(DiskState::UpToDate) {
        return Err(format!("{} is not UpToDate and replicating", target.node));
    }
    Ok(())
}

/// Whether this replica may become primary. `fenced` names the peers the cluster has
/// confirmed fenced or outdated.
pub fn check_promote(
    disk: DiskState,
    peers: &[PeerLink],
    fenced: &[String],
    allow_two_primaries: bool,
) -> Result<(), PromoteError> {
    if disk != DiskState::UpToDate {
        return Err(PromoteError::NotUpToDate(disk));
    }
    for p in peers {
        if !p.connected && !fenced.contains(&p.node) {
            return Err(PromoteError::PeerNotFenced(p.node.clone()));
        }
        if p.connected && p.role == Some(Role::Primary) && !allow_two_primaries {
            return Err(PromoteError::PeerIsPrimary(p.node.clone()));
        }
    }
    Ok(())
}

/// Promotion score of a replica whose disk is UpToDate and whose peers are all
/// connected: nothing newer can exist elsewhere.
pub const PROMOTE_UP_TO_DATE: i64 = 10_000;
/// UpToDate, but some peer is unknown: it may hold newer data (it could have been
/// primary while cut off), so any replica that knows better is preferred.
pub const PROMOTE_PEER_UNKNOWN: i64 = 5;

/// How much this replica wants to be promoted, as DRBD's agent sets master scores:
/// `None` where a promote would be refused anyway (an Outdated or Inconsistent disk),
/// so the cluster never picks it, whatever a location preference says.
pub fn promotion_preference(disk: DiskState, peers: &[PeerLink]) -> Option<i64> {
    if disk != DiskState::UpToDate {
        return None;
    }
    if peers.iter().all(|p| p.connected) {
        Some(PROMOTE_UP_TO_DATE)
    } else {
        Some(PROMOTE_PEER_UNKNOWN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_primary_that_kept_the_guest_is_the_source_for_a_side_that_is_ahead_by_a_generation_only() {
        // a: the window's source, cut off, started a generation and was demoted; b: the
        // target, still primary on the window's generation.
        let mut a = side("a", 2, &[1]);
        let mut b = side("b", 1, &[]);
        b.role = Role::Primary;
        let o = plan_connection(&a, &b, SplitBrainPolicy::Disconnect);
        assert_eq!(o.plan, Plan::Target { full: false });
        assert!(!o.split_brain);
        assert_eq!(
            plan_connection(&b, &a, SplitBrainPolicy::Disconnect).plan,
            Plan::Source { full: false }
        );
        // a wrote after the cut: the guest on b may lack what a acknowledged.
        a.changes = 3;
        assert_eq!(
            plan_connection(&a, &b, SplitBrainPolicy::Disconnect).plan,
            Plan::Refuse(Refusal::PrimaryWouldBeTarget)
        );
    }

    #[test]
    fn only_an_up_to_date_replica_wants_promotion_and_one_that_knows_its_peers_most() {
        use DiskState::*;
        let peer = |connected| PeerLink {
            node: "b".into(),
            connected,
            role: Some(Role::Secondary),
        };
        assert_eq!(promotion_preference(Inconsistent, &[peer(true)]), None);
        assert_eq!(promotion_preference(Outdated, &[peer(true)]), None);
        assert_eq!(
            promotion_preference(UpToDate, &[peer(true)]),
            Some(PROMOTE_UP_TO_DATE)
        );
        assert_eq!(
            promotion_preference(UpToDate, &[peer(false)]),
            Some(PROMOTE_PEER_UNKNOWN)
        );
        assert_eq!(
            promotion_preference(UpToDate, &[]),
            Some(PROMOTE_UP_TO_DATE)
        );
    }

    fn side(node: &str, gen_: u64, history: &[u64]) -> SideView {
        SideView {
            node: node.into(),
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            epoch: 1,
            current_gen: gen_,
            history: history.to_vec(),
            changes: 0,
            promoted_at_ms: 0,
            crashed_primary: false,
            discard_my_data: false,
            discard_peer: false,
            allow_two_primaries: false,
            in_sync_with_primary: false,
            window: None,
        }
    }

    fn wpeer(node: &str, role: Role, disk: DiskState) -> WindowPeer {
        WindowPeer {
            node: node.into(),
            connected: true,
            established: true,
            role: Some(role),
            disk: Some(disk),
        }
    }

    #[test]
    fn a_window_opens_only_beside_one_up_to_date_connected_primary() {
        use DiskState::*;
        let src = wpeer("a", Role::Primary, UpToDate);
        assert_eq!(
            check_window_promote(UpToDate, std::slice::from_ref(&src), "a", &[]),
            Ok(())
        );
        assert!(check_window_promote(Outdated, std::slice::from_ref(&src), "a", &[]).is_err());
        let secondary = wpeer("a", Role::Secondary, UpToDate);
        assert!(check_window_promote(UpToDate, &[secondary], "a", &[]).is_err());
        let stale = wpeer("a", Role::Primary, Outdated);
        assert!(check_window_promote(UpToDate, &[stale], "a", &[]).is_err());
        let away = WindowPeer {
            connected: false,
            established: false,
            ..src.clone()
        };
        assert!(check_window_promote(UpToDate, &[away], "a", &["a".into()]).is_err());
        let third = wpeer("c", Role::Primary, UpToDate);
        assert!(check_window_promote(UpToDate, &[src.clone(), third], "a", &[]).is_err());
        let gone = WindowPeer {
            connected: false,
            ..wpeer("c", Role::Secondary, UpToDate)
        };
        assert!(check_window_promote(UpToDate, &[src.clone(), gone.clone()], "a", &[]).is_err());
        assert_eq!(
            check_window_promote(UpToDate, &[src, gone], "a", &["c".into()]),
            Ok(())
        );
    }

    #[test]
    fn the_source_grants_one_window_to_an_up_to_date_target() {
        use DiskState::*;
        let b = wpeer("b", Role::Secondary, UpToDate);
        assert_eq!(grant_window(Role::Primary, UpToDate, &b, None), Ok(()));
        assert_eq!(grant_window(Role::Primary, UpToDate, &b, Some("b")), Ok(()));
        assert!(grant_window(Role::Primary, UpToDate, &b, Some("c")).is_err());
        assert!(grant_window(Role::Secondary, UpToDate, &b, None).is_err());
        let syncing = WindowPeer {
            established: false,
            ..b.clone()
        };
        assert!(grant_window(Role::Primary, UpToDate, &syncing, None).is_err());
        let stale = wpeer("b", Role::Secondary, Inconsistent);
        assert!(grant_window(Role::Primary, UpToDate, &stale, None).is_err());
    }

    fn plan(l: &SideView, p: &SideView, pol: SplitBrainPolicy) -> Plan {
        plan_connection(l, p, pol).plan
    }

    #[test]
    fn same_generation_without_changes_is_in_sync() {
        let a = side("a", 5, &[]);
        let b = side("b", 5, &[]);
        assert_eq!(plan(&a, &b, SplitBrainPolicy::Disconnect), Plan::InSync);
    }

    #[test]
    fn the_newer_generation_is_the_source_using_bitmaps() {
        let mut a = side("a", 7, &[5]);
        a.role = Role::Primary;
        let b = side("b", 5, &[]);
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::Disconnect),
            Plan::Source { full: false }
        );
        assert_eq!(
            plan(&b, &a, SplitBrainPolicy::Disconnect),
            Plan::Target { full: false }
        );
        // A secondary's bitmap may miss what a peer cut off from the primary missed.
        a.role = Role::Secondary;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::Disconnect),
            Plan::Source { full: true }
        );
    }

    #[test]
    fn secondaries_following_the_primary_ignore_stale_bitmaps() {
        let mut a = side("a", 5, &[]);
        let mut c = side("c", 5, &[]);
        c.changes = 4;
        a.in_sync_with_primary = true;
        assert_eq!(
            plan(&c, &a, SplitBrainPolicy::Disconnect),
            Plan::Source { full: false }
        );
        c.in_sync_with_primary = true;
        assert_eq!(plan(&c, &a, SplitBrainPolicy::Disconnect), Plan::InSync);
    }

    #[test]
    fn a_new_replica_gets_a_full_sync() {
        let a = side("a", 7, &[]);
        let mut b = side("b", 0, &[]);
        b.disk = DiskState::Inconsistent;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::Disconnect),
            Plan::Source { full: true }
        );
    }

    #[test]
    fn diverged_generations_are_split_brain_and_policies_pick_the_loser() {
        let mut a = side("a", 8, &[5]);
        let mut b = side("b", 9, &[5]);
        a.changes = 0;
        b.changes = 3;
        let o = plan_connection(&a, &b, SplitBrainPolicy::Disconnect);
        assert!(o.split_brain);
        assert_eq!(o.plan, Plan::Refuse(Refusal::SplitBrain));
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardZeroChanges),
            Plan::Target { full: false }
        );
        a.changes = 1;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardZeroChanges),
            Plan::Refuse(Refusal::SplitBrain)
        );
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardLeastChanges),
            Plan::Target { full: false }
        );
        a.promoted_at_ms = 100;
        b.promoted_at_ms = 200;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardYoungerPrimary),
            Plan::Source { full: false }
        );
        // A current primary's data is never discarded automatically.
        b.role = Role::Primary;
        b.epoch = 1;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardYoungerPrimary),
            Plan::Refuse(Refusal::SplitBrain)
        );
    }

    #[test]
    fn manual_resolution_overrides_and_unrelated_data_is_refused() {
        let mut a = side("a", 8, &[5]);
        let b = side("b", 9, &[5]);
        a.discard_my_data = true;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::Disconnect),
            Plan::Target { full: false }
        );
        let c = side("c", 11, &[10]);
        assert_eq!(
            plan(&b, &c, SplitBrainPolicy::DiscardLeastChanges),
            Plan::Refuse(Refusal::Unrelated)
        );
    }

    #[test]
    fn an_older_epoch_primary_is_deposed() {
        let mut a = side("a", 8, &[5]);
        a.role = Role::Primary;
        a.epoch = 1;
        let mut b = side("b", 9, &[5]);
        b.role = Role::Primary;
        b.epoch = 2;
        let o = plan_connection(&a, &b, SplitBrainPolicy::Disconnect);
        assert!(o.local_deposed && !o.peer_deposed);
        assert_eq!(o.plan, Plan::Refuse(Refusal::SplitBrain));
        a.changes = 0;
        b.changes = 2;
        assert_eq!(
            plan(&a, &b, SplitBrainPolicy::DiscardZeroChanges),
            Plan::Target { full: false }
        );
    }

    #[test]
    fn promotion_rules() {
        let peers = [PeerLink {
            node: "b".into(),
            connected: false,
            role: None,
        }];
        assert_eq!(
            check_promote(DiskState::Outdated, &[], &[], false),
            Err(PromoteError::NotUpToDate(DiskState::Outdated))
        );
        assert_eq!(
            check_promote(DiskState::UpToDate, &peers, &[], false),
            Err(PromoteError::PeerNotFenced("b".into()))
        );
        assert_eq!(
            check_promote(DiskState::UpToDate, &peers, &["b".into()], false),
            Ok(())
        );
        let primary = [PeerLink {
            node: "b".into(),
            connected: true,
            role: Some(Role::Primary),
        }];
        assert!(check_promote(DiskState::UpToDate, &primary, &[], false).is_err());
        assert!(check_promote(DiskState::UpToDate, &primary, &[], true).is_ok());
    }

    fn arb_side(node: &'static str) -> impl Strategy<Value = SideView> {
        (
            any::<bool>(),
            0u8..3,
            0u64..3,
            0u64..4,
            proptest::collection::vec(0u64..4, 0..3),
            0u64..3,
            0u64..3,
            (
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                move |(prim, disk, epoch, g, h, changes, at, flags)| SideView {
                    node: node.into(),
                    role: if prim { Role::Primary } else { Role::Secondary },
                    disk: [
                        DiskState::UpToDate,
                        DiskState::Outdated,
                        DiskState::Inconsistent,
                    ][disk as usize],
                    epoch,
                    current_gen: g,
                    history: h,
                    changes,
                    promoted_at_ms: at,
                    crashed_primary: flags.0,
                    discard_my_data: flags.1,
                    discard_peer: flags.2,
                    allow_two_primaries: flags.3,
                    in_sync_with_primary: flags.4,
                    window: None,
                },
            )
    }

    proptest! {
        /// Both ends must reach mirror-image plans, or they would both send or both wait.
        #[test]
        fn both_ends_agree(a in arb_side("a"), b in arb_side("b"), pol in 0usize..4) {
            let pol = [SplitBrainPolicy::Disconnect, SplitBrainPolicy::DiscardZeroChanges,
                SplitBrainPolicy::DiscardLeastChanges, SplitBrainPolicy::DiscardYoungerPrimary][pol];
            let x = plan_connection(&a, &b, pol);
            let y = plan_connection(&b, &a, pol);
            prop_assert_eq!(x.plan.mirror(), y.plan);
            prop_assert_eq!(x.split_brain, y.split_brain);
            prop_assert_eq!(x.local_deposed, y.peer_deposed);
            // A primary that is not deposed never becomes a sync target.
            if a.role == Role::Primary && !x.local_deposed {
                prop_assert!(!matches!(x.plan, Plan::Target { .. }), "a primary became sync target");
            }
        }
    }
}
