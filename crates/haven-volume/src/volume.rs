//! One replica of a volume at run time: the backing file, the metadata, and one
//! replication connection per peer. The decisions (who syncs from whom, split brain,
//! promotion) are in [`crate::decide`]; this file only carries them out.
//!
//! Write path on a primary (DRBD protocol C): under the `order` lock the write goes to
//! the local file and is written to every connected peer's socket (so every replica
//! applies writes in the same order); then, outside the lock, so writes pipeline, the
//! caller waits until each of those peers acknowledged it.
//! A peer that is not connected gets the region marked in its dirty bitmap instead, and a
//! peer that drops mid-write gets its unacknowledged regions marked, so a later resync
//! brings it up to date without copying everything.

use crate::decide::{
    self, PeerLink, Plan, PromoteError, Refusal, SideView, SplitBrainPolicy, WindowMsg, WindowPeer,
};
use crate::meta::{DATA_FILE, DiskState, Meta, MetaError, Role};
use crate::tls::{PeerRead, PeerWrite, ReplicationTls};
use crate::wire::{self, GenUpdate, Hello, Msg, StateUpdate};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_INTERVAL: Duration = Duration::from_millis(200);
/// The default of [`VolumeConfig::window_timeout`].
pub const DEFAULT_WINDOW_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the target waits for the source to grant a window (within one control
/// call; the agent asks again until its promote times out).
const WINDOW_ASK_TIMEOUT: Duration = Duration::from_secs(4);
static ZEROES: [u8; 65536] = [0; 65536];

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: backing file is {actual} bytes but the metadata says {expected}")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("peer `{0}` is not configured for this volume (configured: {1})")]
    UnknownPeer(String, String),
    #[error("peer `{0}` is this node itself; a replica cannot peer with itself")]
    SelfPeer(String),
    #[error(transparent)]
    Promote(#[from] PromoteError),
    #[error("cannot {action} while primary; demote first")]
    IsPrimary { action: &'static str },
    #[error("`{discard}` is neither this node ({node}) nor peer `{peer}`")]
    BadDiscard {
        discard: String,
        node: String,
        peer: String,
    },
    #[error("listening for replication on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why an I/O request from the NBD client failed; maps to an NBD error value.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum IoFail {
    #[error("this replica is not primary")]
    NotPrimary,
    #[error("request beyond the end of the volume")]
    OutOfRange,
    #[error("backing store I/O error")]
    Io,
}

impl IoFail {
    pub fn errno(self) -> u32 {
        match self {
            IoFail::NotPrimary => crate::proto::EPERM,
            IoFail::OutOfRange => crate::proto::ENOSPC,
            IoFail::Io => crate::proto::EIO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub peers: Vec<(String, SocketAddr)>,
    pub policy: SplitBrainPolicy,
    pub allow_two_primaries: bool,
    /// Resync rate limit in bytes per second; `None` is unlimited.
    pub resync_rate: Option<u64>,
    /// A connected peer that takes longer than this to accept or acknowledge a write is
    /// disconnected (its regions go to the bitmap), so one hung peer cannot stall the
    /// volume — DRBD's `timeout`/`ko-count`.
    pub peer_timeout: Duration,
    /// Mutual TLS with the peers; `None` only for an explicitly plaintext replica
    /// (benchmarks, hand tests). A plaintext replica and a TLS one never connect.
    pub tls: Option<ReplicationTls>,
    /// DRBD's `fencing resource-and-stonith`: a primary that loses an up-to-date peer
    /// freezes I/O until it is told the peer is recorded outdated (or the peer is back).
    /// Off, a primary writes on alone and the lost peer still passes for up to date.
    pub fence_peers: bool,
    /// How long a freeze may hold a request; past it the request fails (EIO) instead
    /// of being acknowledged, and the replica stays frozen.
    pub freeze_timeout: Duration,
    /// How long a migration window stays open on the target without the source
    /// demoting. The source holds its side open twice as long, so the target always
    /// stops writing first; both replicas of a cluster volume get the same value (one
    /// resource parameter). Migrations that take longer fail safe: the target freezes.
    pub window_timeout: Duration,
}

/// Peers lost while up to date, whose being outdated the cluster has not confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frozen {
    pub peer: String,
    /// Wall-clock milliseconds when the peer was lost.
    pub since_ms: u64,
    /// The generation this primary started when it lost the peer: the peer has
    /// nothing written from it on.
    pub generation: String,
    /// Past `freeze_timeout`: requests now fail instead of waiting.
    pub expired: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    Connected,
    Connecting,
    StandAlone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Replication {
    Established,
    SyncSource,
    SyncTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// Zero on the target side, which does not know the total in advance.
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub address: String,
    pub connection: Connection,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    pub replication: Option<Replication>,
    /// Bytes this replica wrote that the peer does not have yet.
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// Regions synced since this process started (both directions), for tests and
    /// operators who want to see that a resync was partial.
    pub resynced_bytes_total: u64,
    pub split_brain: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub volume: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub epoch: u64,
    pub generation: String,
    pub size: u64,
    pub crashed_primary: bool,
    pub peers: Vec<PeerStatus>,
    /// Earlier generations, newest first (hex), so a cluster can tell whether this
    /// replica holds what a primary wrote since a given generation.
    #[serde(default)]
    pub history: Vec<String>,
    /// Non-empty: I/O is frozen until these peers are confirmed outdated or return.
    #[serde(default)]
    pub frozen: Vec<Frozen>,
    /// Client requests waiting on the freeze.
    #[serde(default)]
    pub frozen_requests: u64,
    /// An open dual-primary migration window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowStatus>,
    /// How much this replica wants to be promoted ([`decide::promotion_preference`]);
    /// `None`: it cannot be (its disk is not UpToDate).
    #[serde(default)]
    pub promotion: Option<i64>,
}

struct Inflight {
    next_seq: u64,
    /// (seq, offset, len) of frames sent and not yet acknowledged.
    queue: VecDeque<(u64, u64, u64)>,
}

#[derive(Clone, Copy, Debug)]
struct Acked {
    seq: u64,
    alive: bool,
}

enum Out {
    Write {
        seq: u64,
        offset: u64,
        len: u32,
        flags: u8,
        data: Option<Arc<Vec<u8>>>,
    },
    Flush(u64),
    Ack(u64),
    Resync {
        offset: u64,
        data: Vec<u8>,
    },
    /// A control frame already encoded.
    Frame(Vec<u8>),
}

struct Progress {
    total: u64,
    done: u64,
    started: Instant,
}

/// A peer socket's sending side and a scratch buffer for frame headers.
type PeerWriter = (BufWriter<PeerWrite>, Vec<u8>);
type WriterTurn = tokio::sync::OwnedMutexGuard<Option<PeerWriter>>;

struct Conn {
    id: u64,
    peer: String,
    /// Senders write frames straight to the socket (no writer task: one less wake-up
    /// per frame on the latency path). `None` once the connection is closed.
    wr: Arc<tokio::sync::Mutex<Option<PeerWriter>>>,
    /// Bounds every send: a peer that takes no data for this long is dropped.
    limit: Duration,
    inflight: Mutex<Option<Inflight>>,
    acked: watch::Sender<Acked>,
    peer_role: Mutex<Role>,
    peer_disk: Mutex<DiskState>,
    peer_epoch: AtomicU64,
    repl: Mutex<Replication>,
    progress: Mutex<Option<Progress>>,
    /// Regions the resync sent, cleared from the bitmap once the target confirms.
    synced: Mutex<(BTreeSet<u64>, bool)>,
    closed: AtomicBool,
    close: Notify,
}

impl Conn {
    /// Writes one frame; on failure or timeout the connection is shut. Returns whether
    /// the frame went out.
    async fn send(&self, out: Out) -> bool {
        match self.writer().await {
            Some(g) => self.send_with(g, out).await,
            None => false,
        }
    }

    /// Takes this connection's turn to send. Frames go out in the order turns are
    /// taken (tokio's mutex is fair), so a writer holding the volume's order lock can
    /// take its turns, let the next write go ahead locally, and send afterwards.
    async fn writer(&self) -> Option<WriterTurn> {
        match tokio::time::timeout(self.limit, self.wr.clone().lock_owned()).await {
            Ok(g) => Some(g),
            Err(_) => {
                self.stalled();
                None
            }
        }
    }

    /// Sends one frame in a turn taken with [`Conn::writer`].
    async fn send_with(&self, mut g: WriterTurn, out: Out) -> bool {
        let r = tokio::time::timeout(self.limit, async {
            let Some((w, head)) = g.as_mut() else {
                return Err(std::io::Error::other("connection closed"));
            };
            write_out(w, head, &out).await?;
            w.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.shut();
                false
            }
            Err(_) => {
                self.stalled();
                false
            }
        }
    }

    fn stalled(&self) {
        tracing::warn!(
            "peer {} accepted no data for {:?}: disconnecting",
            self.peer,
            self.limit
        );
        self.shut();
    }

    /// Closes the socket's sending side so the peer sees the end promptly, even while
    /// other tasks still hold this connection.
    async fn close_writer(&self) {
        if let Ok(mut g) = tokio::time::timeout(self.limit, self.wr.lock()).await
            && let Some((mut w, _)) = g.take()
        {
            let _ = tokio::time::timeout(self.limit, w.shutdown()).await;
        }
    }

    fn shut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.close.notify_waiters();
        self.close.notify_one();
    }
}

struct Peer {
    addr: SocketAddr,
    want: bool,
    conn: Option<Arc<Conn>>,
    last_error: Option<String>,
    split_brain: bool,
    discard_my_data: bool,
    discard_peer: bool,
    resynced_bytes: u64,
}

struct FreezeEntry {
    since: Instant,
    since_ms: u64,
    generation: u64,
}

struct State {
    meta: Meta,
    peers: BTreeMap<String, Peer>,
    /// Lost peers awaiting the cluster's word that they are outdated.
    frozen: BTreeMap<String, FreezeEntry>,
    /// The dual-primary migration window this replica is part of.
    window: Option<WindowState>,
    /// The source's answer to this replica's request for a window.
    window_answer: Option<(String, Result<(), String>)>,
    /// Client writes that marked dirty bits for absent peers, and how many of those the
    /// metadata on disk covers: the bits are saved once per batch of writes, and each
    /// write is acknowledged only once its bits are on disk.
    marks: u64,
    saved_marks: u64,
    /// Saves made for such batches (to show that they are batches).
    mark_saves: u64,
    /// Bumped for every picture of the metadata taken to be saved, so an older one
    /// never overwrites a newer one on disk (see [`Volume::save_meta`]).
    meta_version: u64,
}

/// One side of a migration window. The target (promoted beside the source) writes only
/// until `until`; the window closes when the source is seen secondary or either side
/// demotes. A target whose window ran out or whose source was lost with both still
/// primary freezes its I/O (it cannot know whether the source still writes) until the
/// source is seen secondary or it is demoted itself: the cluster's fence-peer record
/// cannot lift that, because the source may have recorded it in turn.
struct WindowState {
    peer: String,
    target: bool,
    opened_ms: u64,
    until: Instant,
}

/// A migration window as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStatus {
    pub peer: String,
    /// `source` (primary before the window) or `target` (promoted for it).
    pub side: String,
    pub opened_ms: u64,
    /// The target is past its window (or lost the source) and holds I/O.
    pub closed: bool,
}

pub struct Volume {
    cfg: VolumeConfig,
    file: Arc<File>,
    data_path: PathBuf,
    size: u64,
    region: u64,
    node: String,
    state: Mutex<State>,
    order: tokio::sync::Mutex<()>,
    /// One batch save of dirty bits at a time; writers queued here find theirs saved.
    persist: tokio::sync::Mutex<()>,
    conn_ids: AtomicU64,
    wake: Notify,
    /// Bumped whenever the freeze set shrinks.
    thaw: watch::Sender<u64>,
    frozen_requests: AtomicU64,
    /// Per connection (by id): acknowledgements waiting for a batch save of dirty bits
    /// this replica set for its absent peers.
    ack_chains: Mutex<std::collections::HashMap<u64, AckChain>>,
    /// Serialises writes of the metadata file; holds the version last written.
    saved_version: Mutex<u64>,
}

/// A secondary's acknowledgements that must wait for dirty bits to be durable, in
/// order: an Ack is cumulative, so none may overtake one still waiting.
struct AckChain {
    tx: tokio::sync::mpsc::UnboundedSender<(u64, Option<u64>)>,
    /// Acks queued and not sent yet; at zero an Ack may go out directly.
    pending: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere already; the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Volume {
    /// Opens the replica in `cfg.dir`. A replica that was primary when its process died
    /// comes back as a secondary flagged `crashed_primary`.
    pub fn open(cfg: VolumeConfig) -> Result<Arc<Volume>, VolumeError> {
        let mut meta = Meta::load(&cfg.dir)?;
        let data_path = cfg.dir.join(DATA_FILE);
        let io = |source| VolumeError::Io {
            path: data_path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        if actual < meta.size {
            return Err(VolumeError::SizeMismatch {
                path: data_path,
                actual,
                expected: meta.size,
            });
        }
        if meta.role == Role::Primary {
            meta.role = Role::Secondary;
            meta.crashed_primary = true;
            meta.save(&cfg.dir)?;
        }
        let mut peers = BTreeMap::new();
        for (name, addr) in &cfg.peers {
            if *name == meta.node {
                return Err(VolumeError::SelfPeer(name.clone()));
            }
            peers.insert(
                name.clone(),
                Peer {
                    addr: *addr,
                    want: true,
                    conn: None,
                    last_error: None,
                    split_brain: false,
                    discard_my_data: false,
                    discard_peer: false,
                    resynced_bytes: 0,
                },
            );
        }
        Ok(Arc::new(Volume {
            size: meta.size,
            region: meta.region_size,
            node: meta.node.clone(),
            file: Arc::new(file),
            data_path,
            state: Mutex::new(State {
                meta,
                peers,
                frozen: BTreeMap::new(),
                window: None,
                window_answer: None,
                marks: 0,
                saved_marks: 0,
                mark_saves: 0,
                meta_version: 0,
            }),
            order: tokio::sync::Mutex::new(()),
            persist: tokio::sync::Mutex::new(()),
            conn_ids: AtomicU64::new(1),
            wake: Notify::new(),
            thaw: watch::channel(0).0,
            frozen_requests: AtomicU64::new(0),
            ack_chains: Mutex::new(std::collections::HashMap::new()),
            saved_version: Mutex::new(0),
            cfg,
        }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn name(&self) -> String {
        lock(&self.state).meta.volume.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Starts accepting and dialing replication connections. The node with the smaller
    /// name dials, so each pair has exactly one connection.
    pub async fn start(self: &Arc<Self>) -> Result<(), VolumeError> {
        if let Some(addr) = self.cfg.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| VolumeError::Listen { addr, source })?;
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, from)) => {
                            let me = me.clone();
                            tokio::spawn(async move {
                                let tls = me.cfg.tls.as_ref();
                                match tokio::time::timeout(
                                    HANDSHAKE_TIMEOUT,
                                    crate::tls::accept(tls, s),
                                )
                                .await
                                {
                                    Ok(Ok((rd, wr, node))) => me.run_conn(rd, wr, None, node).await,
                                    Ok(Err(why)) => {
                                        tracing::warn!("replication connection from {from}: {why}")
                                    }
                                    Err(_) => tracing::warn!(
                                        "replication connection from {from}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                                    ),
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!("replication accept failed: {e}");
                            tokio::time::sleep(DIAL_INTERVAL).await;
                        }
                    }
                }
            });
        }
        for (name, addr) in self.cfg.peers.clone() {
            if self.node < name {
                let me = self.clone();
                tokio::spawn(async move { me.dial_loop(name, addr).await });
            }
        }
        Ok(())
    }

    async fn dial_loop(self: Arc<Self>, peer: String, addr: SocketAddr) {
        loop {
            let want = {
                let st = lock(&self.state);
                st.peers
                    .get(&peer)
                    .is_some_and(|p| p.want && p.conn.is_none())
            };
            if want {
                let dial = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    let s = TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("connecting to {addr}: {e}"))?;
                    crate::tls::connect(self.cfg.tls.as_ref(), s, &peer).await
                })
                .await;
                match dial {
                    Ok(Ok((rd, wr))) => {
                        self.clone()
                            .run_conn(rd, wr, Some(peer.clone()), None)
                            .await
                    }
                    Ok(Err(why)) => self.note_error(&peer, why),
                    Err(_) => self.note_error(
                        &peer,
                        format!("no connection to {addr} within {HANDSHAKE_TIMEOUT:?}"),
                    ),
                }
            }
            let _ = tokio::time::timeout(DIAL_INTERVAL, self.wake.notified()).await;
        }
    }

    fn view(&self, st: &State, peer: &str) -> SideView {
        let p = st.peers.get(peer);
        SideView {
            node: self.node.clone(),
            role: st.meta.role,
            disk: st.meta.disk,
            epoch: st.meta.epoch,
            current_gen: st.meta.current_gen,
            history: st.meta.history.clone(),
            changes: st.meta.dirty_count(peer),
            promoted_at_ms: st.meta.promoted_at_ms,
            crashed_primary: st.meta.crashed_primary,
            discard_my_data: p.is_some_and(|p| p.discard_my_data),
            discard_peer: p.is_some_and(|p| p.discard_peer),
            allow_two_primaries: self.cfg.allow_two_primaries,
            in_sync_with_primary: st.meta.role == Role::Secondary
                && st.meta.disk == DiskState::UpToDate
                && st.peers.values().any(|p| {
                    p.conn.as_ref().is_some_and(|c| {
                        *lock(&c.peer_role) == Role::Primary
                            && *lock(&c.repl) == Replication::Established
                    })
                }),
            window: None,
        }
    }

    fn hello(&self, st: &State, peer: &str) -> Hello {
        Hello {
            volume: st.meta.volume.clone(),
            size: st.meta.size,
            region_size: st.meta.region_size,
            view: self.view(st, peer),
            dirty_for_peer: st
                .meta
                .dirty
                .get(peer)
                .map(crate::meta::to_ranges)
                .unwrap_or_default(),
        }
    }

    /// Runs one replication connection from handshake to teardown. `dialed` names the
    /// peer we called; an accepted connection learns its peer from the hello, which
    /// must name the node its TLS certificate names (`verified`).
    async fn run_conn(
        self: Arc<Self>,
        mut rd: PeerRead,
        wr: PeerWrite,
        dialed: Option<String>,
        verified: Option<String>,
    ) {
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let mut buf = Vec::new();

        // The dialer speaks first; both ends plan from the hellos actually exchanged.
        let mut sent = None;
        if let Some(peer) = &dialed {
            let h = self.hello(&lock(&self.state), peer);
            if send_json(&mut wr, wire::K_HELLO, &h).await.is_err() {
                return;
            }
            sent = Some(h);
        }
        let theirs =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut buf)).await {
                Ok(Ok(wire::K_HELLO)) => match wire::decode(wire::K_HELLO, &buf) {
                    Ok(Msg::Hello(h)) => h,
                    _ => return,
                },
                Ok(Ok(wire::K_REJECT)) => {
                    if let (Some(peer), Ok(Msg::Reject(r))) =
                        (&dialed, wire::decode(wire::K_REJECT, &buf))
                    {
                        self.note_error(peer, format!("peer refused: {r}"));
                    }
                    return;
                }
                other => {
                    if let Some(peer) = &dialed {
                        let why = match other {
                            Err(_) => format!("no hello within {HANDSHAKE_TIMEOUT:?}"),
                            Ok(Err(e)) => format!("no hello: {e}"),
                            Ok(Ok(k)) => format!("expected a hello, got frame kind {k}"),
                        };
                        self.note_error(peer, why);
                    }
                    return;
                }
            };
        let peer = theirs.view.node.clone();
        if dialed.as_ref().is_some_and(|d| *d != peer) {
            return;
        }
        if let Err(why) = crate::tls::check_claim(verified.as_deref(), &peer) {
            tracing::warn!("replication connection: {why}");
            let mut f = Vec::new();
            wire::encode_json(&mut f, wire::K_REJECT, &why);
            let _ = wr.write_all(&f).await;
            let _ = wr.flush().await;
            return;
        }
        // Everything from here to registering the connection happens under the state
        // lock, so the plan is made on the state the peer will be told about.
        let problem = {
            let st = lock(&self.state);
            if theirs.volume != st.meta.volume {
                Some(format!(
                    "volume id {} does not match {}",
                    theirs.volume, st.meta.volume
                ))
            } else if theirs.size != st.meta.size || theirs.region_size != st.meta.region_size {
                Some(format!(
                    "size/region {}/{} does not match {}/{}",
                    theirs.size, theirs.region_size, st.meta.size, st.meta.region_size
                ))
            } else {
                match st.peers.get(&peer) {
                    None => Some(format!("`{peer}` is not a configured peer")),
                    Some(p) if p.conn.is_some() => Some("already connected".into()),
                    Some(p) if !p.want => Some("connection disabled here".into()),
                    Some(_) => None,
                }
            }
        };
        if let Some(why) = problem {
            let mut f = Vec::new();
            wire::encode_json(&mut f, wire::K_REJECT, &why);
            let _ = wr.write_all(&f).await;
            let _ = wr.flush().await;
            if let Some(d) = &dialed {
                self.note_error(d, why);
            }
            return;
        }
        // From here to registering the connection everything happens under the state
        // lock, so the plan is made on exactly the state the peer is told about.
        let mut wr = Some(wr);
        let registered = 'reg: {
            let mut st = lock(&self.state);
            if st.peers.get(&peer).is_none_or(|p| p.conn.is_some()) {
                break 'reg None;
            }
            let mine = sent.unwrap_or_else(|| self.hello(&st, &peer));
            let outcome = decide::plan_connection(&mine.view, &theirs.view, self.cfg.policy);
            let peer_role = if outcome.peer_deposed {
                Role::Secondary
            } else {
                theirs.view.role
            };
            // One sync target, one source at a time; and while a primary replicates to
            // us directly, a secondary must not sync us too (its stream and the
            // primary's would race on the same regions). Retry later instead.
            if matches!(outcome.plan, Plan::Target { .. }) && !outcome.local_deposed {
                let busy = st.peers.iter().filter(|(n, _)| **n != peer).any(|(_, p)| {
                    p.conn.as_ref().is_some_and(|c| {
                        *lock(&c.repl) == Replication::SyncTarget
                            || (peer_role == Role::Secondary
                                && *lock(&c.peer_role) == Role::Primary)
                    })
                });
                if busy {
                    break 'reg None;
                }
            }
            if peer_role == Role::Primary {
                for (n, p) in &st.peers {
                    if let Some(c) = &p.conn
                        && *n != peer
                        && *lock(&c.repl) == Replication::SyncTarget
                        && *lock(&c.peer_role) == Role::Secondary
                    {
                        c.shut();
                    }
                }
            }
            let mut changed = false;
            if outcome.local_deposed {
                st.meta.role = Role::Secondary;
                st.meta.disk = DiskState::Outdated;
                changed = true;
            }
            if theirs.view.epoch > st.meta.epoch {
                st.meta.epoch = theirs.view.epoch;
                changed = true;
            }
            let p = st.peers.get_mut(&peer);
            if let Some(p) = p {
                p.split_brain = outcome.split_brain;
                p.last_error = match &outcome.plan {
                    Plan::Refuse(r) => Some(r.to_string()),
                    _ => None,
                };
                if matches!(
                    outcome.plan,
                    Plan::Refuse(Refusal::SplitBrain | Refusal::Unrelated | Refusal::BothDiscard)
                ) {
                    // Like DRBD's StandAlone: only the operator can settle these.
                    p.want = false;
                }
            }
            if let Plan::Target { .. } = outcome.plan {
                st.meta.disk = DiskState::Inconsistent;
                changed = true;
            }
            // Nothing to send either way: whatever was marked for this peer is moot.
            if outcome.plan == Plan::InSync && st.meta.dirty.remove(&peer).is_some() {
                changed = true;
            }
            if changed && let Err(e) = self.save_meta(&mut st) {
                tracing::error!("saving metadata: {e}");
                return;
            }
            let (ack_tx, _) = watch::channel(Acked {
                seq: 0,
                alive: true,
            });
            let repl = match outcome.plan {
                Plan::Source { .. } => Replication::SyncSource,
                Plan::Target { .. } => Replication::SyncTarget,
                _ => Replication::Established,
            };
            let conn = Arc::new(Conn {
                id: self.conn_ids.fetch_add(1, Ordering::Relaxed),
                peer: peer.clone(),
                wr: Arc::new(tokio::sync::Mutex::new(
                    wr.take().map(|w| (w, Vec::with_capacity(64))),
                )),
                limit: self.cfg.peer_timeout,
                inflight: Mutex::new(Some(Inflight {
                    next_seq: 1,
                    queue: VecDeque::new(),
                })),
                acked: ack_tx,
                peer_role: Mutex::new(peer_role),
                peer_disk: Mutex::new(theirs.view.disk),
                peer_epoch: AtomicU64::new(theirs.view.epoch),
                repl: Mutex::new(repl),
                progress: Mutex::new(None),
                synced: Mutex::new((BTreeSet::new(), false)),
                closed: AtomicBool::new(false),
                close: Notify::new(),
            });
            if !matches!(outcome.plan, Plan::Refuse(_))
                && let Some(p) = st.peers.get_mut(&peer)
            {
                p.conn = Some(conn.clone());
                tracing::info!(peer = %peer, conn = conn.id, plan = ?outcome.plan, "connected");
                // The peer is back and is told everything from here on (or resynced):
                // it no longer passes for current with data it lacks.
                if st.frozen.remove(&peer).is_some() {
                    self.thaw.send_modify(|n| *n += 1);
                }
            }
            // Held until our hello is out: writers that see the new connection wait
            // for it instead of sending a write before the hello.
            let Ok(guard) = conn.wr.clone().try_lock_owned() else {
                break 'reg None;
            };
            Some((outcome, conn, mine, guard))
        };
        let Some((outcome, conn, mine, guard)) = registered else {
            tracing::info!(peer = %peer, "connection refused: busy or already connected");
            // Busy (syncing from elsewhere) or raced with another connection: say so, so
            // the dialer retries at once instead of waiting out its handshake timeout.
            if let Some(mut w) = wr {
                let mut f = Vec::new();
                wire::encode_json(&mut f, wire::K_REJECT, &"busy; retry later");
                let _ = w.write_all(&f).await;
                let _ = w.flush().await;
            }
            return;
        };
        if dialed.is_none() {
            let mut f = Vec::new();
            wire::encode_json(&mut f, wire::K_HELLO, &mine);
            let mut guard = guard;
            let sent = match guard.as_mut() {
                Some((w, _)) => w.write_all(&f).await.is_ok() && w.flush().await.is_ok(),
                None => false,
            };
            drop(guard);
            if !sent {
                conn.shut();
                self.teardown(&conn);
                return;
            }
        } else {
            drop(guard);
        }
        if outcome.local_deposed {
            tracing::warn!("deposed by {peer}: a newer primary exists; demoted");
        }
        if matches!(outcome.plan, Plan::Refuse(_)) {
            conn.close_writer().await;
            return;
        }
        self.wake.notify_waiters();
        self.close_stale_primaries();

        if let Plan::Source { full } = outcome.plan {
            let Ok(mut regions) =
                crate::meta::from_ranges(&theirs.dirty_for_peer, self.size.div_ceil(self.region))
            else {
                self.note_error(&peer, "peer sent a bitmap beyond the volume".into());
                conn.shut();
                self.teardown(&conn);
                conn.close_writer().await;
                return;
            };
            {
                let st = lock(&self.state);
                if full {
                    regions = (0..st.meta.regions()).collect();
                } else if let Some(d) = st.meta.dirty.get(&peer) {
                    regions.extend(d.iter().copied());
                }
            }
            regions.retain(|r| *r < self.size.div_ceil(self.region));
            let me = self.clone();
            let c = conn.clone();
            tokio::spawn(async move { me.resync(c, regions, full).await });
        }
        let reader = self.clone().reader_task(rd, conn.clone());
        let pinger = async {
            let mut f = Vec::new();
            wire::encode_empty(&mut f, wire::K_PING);
            loop {
                tokio::time::sleep(self.cfg.peer_timeout / 4).await;
                if !conn.send(Out::Frame(f.clone())).await {
                    return;
                }
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = pinger => {}
            _ = conn.close.notified() => {}
        }
        conn.shut();
        self.teardown(&conn);
        conn.close_writer().await;
    }

    fn note_error(&self, peer: &str, why: String) {
        if let Some(p) = lock(&self.state).peers.get_mut(peer) {
            p.last_error = Some(why);
        }
    }

    /// Drops connections from primaries whose epoch is older than the newest we know.
    fn close_stale_primaries(&self) {
        let st = lock(&self.state);
        for p in st.peers.values() {
            if let Some(c) = &p.conn
                && *lock(&c.peer_role) == Role::Primary
                && c.peer_epoch.load(Ordering::SeqCst) < st.meta.epoch
            {
                c.shut();
            }
        }
    }

    fn teardown(&self, conn: &Arc<Conn>) {
        tracing::info!(peer = %conn.peer, conn = conn.id, "connection closed");
        lock(&self.ack_chains).remove(&conn.id);
        let mut st = lock(&self.state);
        let mine = st
            .peers
            .get(&conn.peer)
            .and_then(|p| p.conn.as_ref())
            .is_some_and(|c| c.id == conn.id);
        if !mine {
            drop(st);
            conn.acked.send_modify(|a| a.alive = false);
            return;
        }
        if let Some(p) = st.peers.get_mut(&conn.peer) {
            p.conn = None;
        }
        // A window target cut off from its source acknowledges nothing from here on
        // (it holds until it sees the source secondary or is demoted), so the source
        // keeps everything the target ever acknowledged: the source is the side to
        // resync from. The target therefore neither starts a generation (which would
        // make both sides look changed: a split brain for the operator) nor asks for
        // the source to be recorded outdated (both would end up outdated).
        let lost_own_source = st
            .window
            .as_ref()
            .is_some_and(|w| w.target && w.peer == conn.peer);
        // Losing the other primary ends the window: the target stops writing (see
        // `WindowState`), the source goes on under the usual fence-peer rule.
        if let Some(w) = st.window.as_mut().filter(|w| w.peer == conn.peer) {
            if w.target {
                w.until = w.until.min(Instant::now());
            } else {
                st.window = None;
            }
        }
        let inflight = lock(&conn.inflight).take();
        let mut changed = false;
        if let Some(inf) = inflight {
            for (_, off, len) in inf.queue {
                changed |= st.meta.mark_dirty(&conn.peer, off, len);
            }
        }
        // From now on this primary's data moves on without that peer: a new generation
        // lets the next handshake tell which side is newer.
        if st.meta.role == Role::Primary && !lost_own_source {
            st.meta.rotate_gen();
            changed = true;
            // Only a peer that could be promoted needs outdating; one mid-resync or
            // already outdated cannot pass for current.
            let was_current = *lock(&conn.peer_disk) == DiskState::UpToDate;
            if self.cfg.fence_peers && was_current && !st.frozen.contains_key(&conn.peer) {
                tracing::warn!(
                    "lost up-to-date peer {}: I/O frozen until it is recorded outdated",
                    conn.peer
                );
                let generation = st.meta.current_gen;
                st.frozen.insert(
                    conn.peer.clone(),
                    FreezeEntry {
                        since: Instant::now(),
                        since_ms: now_ms(),
                        generation,
                    },
                );
            }
            let g = GenUpdate {
                current_gen: st.meta.current_gen,
                history: st.meta.history.clone(),
                epoch: st.meta.epoch,
            };
            let mut f = Vec::new();
            wire::encode_json(&mut f, wire::K_GEN, &g);
            for p in st.peers.values() {
                if let Some(c) = p.conn.clone() {
                    let f = f.clone();
                    tokio::spawn(async move { c.send(Out::Frame(f)).await });
                }
            }
        }
        if changed && let Err(e) = self.save_meta(&mut st) {
            tracing::error!("saving metadata after losing {}: {e}", conn.peer);
        }
        drop(st);
        conn.acked.send_modify(|a| a.alive = false);
        self.wake.notify_waiters();
    }

    async fn reader_task(self: Arc<Self>, mut rd: PeerRead, conn: Arc<Conn>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let limit = self.cfg.peer_timeout;
        loop {
            // The peer pings when idle, so silence this long means it is gone (a cut
            // link or a dead host sends no FIN); only then may this side be promoted.
            let kind = match tokio::time::timeout(limit, read_frame(&mut rd, &mut buf)).await {
                Ok(Ok(k)) => k,
                Ok(Err(_)) => return,
                Err(_) => {
                    self.note_error(&conn.peer, format!("nothing heard for {limit:?}"));
                    return;
                }
            };
            let msg = match wire::decode(kind, &buf) {
                Ok(m) => m,
                Err(e) => {
                    self.note_error(&conn.peer, format!("bad frame: {e}"));
                    return;
                }
            };
            if let Err(why) = self.handle(&conn, msg).await {
                self.note_error(&conn.peer, why.clone());
                let mut f = Vec::new();
                wire::encode_json(&mut f, wire::K_REJECT, &why);
                conn.send(Out::Frame(f)).await;
                return;
            }
        }
    }

    /// Handles one frame from a peer; an `Err` closes the connection with that reason.
    async fn handle(self: &Arc<Self>, conn: &Arc<Conn>, msg: Msg<'_>) -> Result<(), String> {
        match msg {
            Msg::Write {
                seq,
                offset,
                len,
                flags,
                data,
            } => {
                self.accept_replicated_write(conn)?;
                let len = u64::from(len);
                if offset.checked_add(len).is_none_or(|e| e > self.size) {
                    return Err(format!("write at {offset}+{len} is beyond the volume"));
                }
                let r = if flags & wire::WF_ZEROES != 0 {
                    self.zero_local(offset, len)
                } else {
                    self.file.write_all_at(data, offset)
                };
                r.map_err(|e| format!("local write failed: {e}"))?;
                if flags & wire::WF_FUA != 0 {
                    self.sync_data().await.map_err(|e| format!("fsync: {e}"))?;
                }
                let mark = self.mark_absent_peers(&conn.peer, offset, len);
                self.ack_after(conn, seq, mark).await?;
            }
            Msg::Flush { seq } => {
                self.sync_data().await.map_err(|e| format!("fsync: {e}"))?;
                if !conn.send(Out::Ack(seq)).await {
                    return Err("closed".into());
                }
            }
            Msg::Ack { seq } => {
                if let Some(inf) = lock(&conn.inflight).as_mut() {
                    while inf.queue.front().is_some_and(|(s, _, _)| *s <= seq) {
                        inf.queue.pop_front();
                    }
                }
                conn.acked.send_modify(|a| a.seq = a.seq.max(seq));
            }
            Msg::Resync { offset, data } => {
                if *lock(&conn.repl) != Replication::SyncTarget {
                    return Err("resync data while not sync target".into());
                }
                let len = data.len() as u64;
                if offset.checked_add(len).is_none_or(|e| e > self.size) {
                    return Err(format!("resync at {offset}+{len} is beyond the volume"));
                }
                self.file
                    .write_all_at(data, offset)
                    .map_err(|e| format!("local write failed: {e}"))?;
                let mut pr = lock(&conn.progress);
                let pr = pr.get_or_insert(Progress {
                    total: 0,
                    done: 0,
                    started: Instant::now(),
                });
                pr.done += len;
            }
            Msg::ResyncDone(g) => {
                self.sync_data().await.map_err(|e| format!("fsync: {e}"))?;
                {
                    let mut st = lock(&self.state);
                    st.meta.adopt_gen(g.current_gen, &g.history);
                    st.meta.epoch = st.meta.epoch.max(g.epoch);
                    st.meta.disk = DiskState::UpToDate;
                    st.meta.crashed_primary = false;
                    st.meta.dirty.remove(&conn.peer);
                    let done = lock(&conn.progress).take().map_or(0, |p| p.done);
                    if let Some(p) = st.peers.get_mut(&conn.peer) {
                        p.discard_my_data = false;
                        p.discard_peer = false;
                        p.resynced_bytes += done;
                    }
                    st.meta
                        .save(&self.cfg.dir)
                        .map_err(|e| format!("saving metadata: {e}"))?;
                }
                *lock(&conn.repl) = Replication::Established;
                let mut f = Vec::new();
                wire::encode_empty(&mut f, wire::K_RESYNC_DONE_ACK);
                if !conn.send(Out::Frame(f)).await {
                    return Err("closed".into());
                }
            }
            Msg::ResyncDoneAck => {
                let (regions, full) = std::mem::take(&mut *lock(&conn.synced));
                let mut st = lock(&self.state);
                if let Some(d) = st.meta.dirty.get_mut(&conn.peer) {
                    d.retain(|r| !regions.contains(r));
                }
                if full {
                    st.meta.crashed_primary = false;
                }
                let done = lock(&conn.progress).take().map_or(0, |p| p.done);
                if let Some(p) = st.peers.get_mut(&conn.peer) {
                    p.discard_my_data = false;
                    p.discard_peer = false;
                    p.resynced_bytes += done;
                }
                *lock(&conn.peer_disk) = DiskState::UpToDate;
                *lock(&conn.repl) = Replication::Established;
                st.meta
                    .save(&self.cfg.dir)
                    .map_err(|e| format!("saving metadata: {e}"))?;
            }
            Msg::Gen(g) => {
                {
                    let mut st = lock(&self.state);
                    if st.meta.role == Role::Primary && g.epoch > st.meta.epoch {
                        st.meta.role = Role::Secondary;
                        st.meta.disk = DiskState::Outdated;
                    }
                    st.meta.epoch = st.meta.epoch.max(g.epoch);
                    conn.peer_epoch.fetch_max(g.epoch, Ordering::SeqCst);
                    // A sync target gets the generation with ResyncDone; adopting it
                    // earlier would claim data it does not have yet.
                    if st.meta.disk != DiskState::Inconsistent && st.meta.role == Role::Secondary {
                        st.meta.adopt_gen(g.current_gen, &g.history);
                    }
                    st.meta
                        .save(&self.cfg.dir)
                        .map_err(|e| format!("saving metadata: {e}"))?;
                }
                self.close_stale_primaries();
            }
            Msg::State(s) => {
                *lock(&conn.peer_role) = s.role;
                *lock(&conn.peer_disk) = s.disk;
                conn.peer_epoch.fetch_max(s.epoch, Ordering::SeqCst);
                if s.role == Role::Secondary {
                    self.close_window_with(&conn.peer);
                }
                self.close_stale_primaries();
            }
            Msg::Reject(r) => return Err(format!("peer refused: {r}")),
            Msg::Ping => {}
            Msg::Hello(h) => match h.view.window {
                Some(w) => self.handle_window(conn, w).await,
                None => return Err("unexpected second hello".into()),
            },
        }
        Ok(())
    }

    /// A replica takes writes only from a current primary: one whose epoch is not older
    /// than the newest this replica has seen, and never while itself primary unless both
    /// allow two primaries.
    fn accept_replicated_write(&self, conn: &Conn) -> Result<(), String> {
        let st = lock(&self.state);
        let pe = conn.peer_epoch.load(Ordering::SeqCst);
        if pe < st.meta.epoch {
            return Err(format!(
                "deposed primary: its epoch {pe} is older than {}",
                st.meta.epoch
            ));
        }
        if *lock(&conn.peer_role) != Role::Primary {
            return Err("write from a peer that is not primary".into());
        }
        let in_window = st
            .window
            .as_ref()
            .is_some_and(|w| w.peer == conn.peer && (w.target || Instant::now() < w.until));
        if st.meta.role == Role::Primary && !self.cfg.allow_two_primaries && !in_window {
            return Err("this replica is primary; two primaries are not allowed".into());
        }
        Ok(())
    }

    /// Sends the Ack for `seq` once the dirty bits up to `mark` are durable (protocol
    /// C: the primary counts the write done on this Ack). Without a mark, and with no
    /// Ack waiting before it, at once; otherwise through the connection's chain, whose
    /// one save covers every bit set while the previous save ran.
    async fn ack_after(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        seq: u64,
        mark: Option<u64>,
    ) -> Result<(), String> {
        let queued = {
            let mut chains = lock(&self.ack_chains);
            match chains.get(&conn.id) {
                Some(c) if mark.is_some() || c.pending.load(Ordering::SeqCst) > 0 => {
                    c.pending.fetch_add(1, Ordering::SeqCst);
                    c.tx.send((seq, mark)).is_ok()
                }
                Some(_) => false,
                None if mark.is_some() => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let pending = Arc::new(AtomicU64::new(1));
                    let sent = tx.send((seq, mark)).is_ok();
                    chains.insert(
                        conn.id,
                        AckChain {
                            tx,
                            pending: pending.clone(),
                        },
                    );
                    tokio::spawn(self.clone().ack_chain(conn.clone(), rx, pending));
                    sent
                }
                None => false,
            }
        };
        if !queued && !conn.send(Out::Ack(seq)).await {
            return Err("closed".into());
        }
        Ok(())
    }

    async fn ack_chain(
        self: Arc<Self>,
        conn: Arc<Conn>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(u64, Option<u64>)>,
        pending: Arc<AtomicU64>,
    ) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            // The save holds the state lock the reader marks under, so bits are
            // gathered before it: the reader gets a turn for as long as it adds some.
            loop {
                tokio::task::yield_now().await;
                let before = batch.len();
                while let Ok(next) = rx.try_recv() {
                    batch.push(next);
                }
                if batch.len() == before {
                    break;
                }
            }
            if let Some(upto) = batch.iter().filter_map(|(_, m)| *m).max()
                && self.persist_marks(upto).await.is_err()
            {
                // Unsaved bits must not be acknowledged: the primary takes the
                // connection's loss instead and tracks the writes itself.
                conn.shut();
                return;
            }
            for (seq, _) in &batch {
                if !conn.send(Out::Ack(*seq)).await {
                    return;
                }
            }
            pending.fetch_sub(batch.len() as u64, Ordering::SeqCst);
        }
    }

    /// Sets the dirty bits of peers other than `from` that are away; returns the mark
    /// to make durable before acknowledging, if any bit is new.
    fn mark_absent_peers(&self, from: &str, offset: u64, len: u64) -> Option<u64> {
        let mut st = lock(&self.state);
        let absent: Vec<String> = st
            .peers
            .iter()
            .filter(|(n, p)| *n != from && p.conn.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        let mut changed = false;
        for n in absent {
            changed |= st.meta.mark_dirty(&n, offset, len);
        }
        if changed {
            st.marks += 1;
        }
        // A bit already set may be set by a write whose batch is not saved yet.
        (changed || st.saved_marks < st.marks).then_some(st.marks)
    }

    async fn resync(self: Arc<Self>, conn: Arc<Conn>, regions: BTreeSet<u64>, full: bool) {
        let total: u64 = regions
            .iter()
            .map(|r| self.region.min(self.size - r * self.region))
            .sum();
        *lock(&conn.progress) = Some(Progress {
            total,
            done: 0,
            started: Instant::now(),
        });
        let started = Instant::now();
        for r in &regions {
            let off = r * self.region;
            let len = self.region.min(self.size - off) as usize;
            {
                // Under the order lock the region read here cannot be overtaken by a
                // client write queued after it: the peer applies both in this order.
                let _o = self.order.lock().await;
                let mut data = vec![0u8; len];
                if self.file.read_exact_at(&mut data, off).is_err() {
                    conn.shut();
                    return;
                }
                if !conn.send(Out::Resync { offset: off, data }).await {
                    return;
                }
            }
            let done = {
                let mut p = lock(&conn.progress);
                match p.as_mut() {
                    Some(p) => {
                        p.done += len as u64;
                        p.done
                    }
                    None => 0,
                }
            };
            if let Some(rate) = self.cfg.resync_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        *lock(&conn.synced) = (regions, full);
        let _o = self.order.lock().await;
        let g = {
            let st = lock(&self.state);
            GenUpdate {
                current_gen: st.meta.current_gen,
                history: st.meta.history.clone(),
                epoch: st.meta.epoch,
            }
        };
        let mut f = Vec::new();
        wire::encode_json(&mut f, wire::K_RESYNC_DONE, &g);
        conn.send(Out::Frame(f)).await;
    }

    /// Zeroes a range by punching a hole (TRIM frees the space, and a hole reads back
    /// as zeroes, so every replica stays byte-identical whichever way it zeroed);
    /// where the file system cannot punch holes, by writing zeroes.
    fn zero_local(&self, offset: u64, len: u64) -> std::io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        if let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&*self.file, mode, o, l) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.zero_with_writes(offset, len)
    }

    fn zero_with_writes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    async fn sync_data(&self) -> std::io::Result<()> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::current().runtime_flavor() {
            // Saves a hop to the blocking pool; the runtime hands this worker's other
            // tasks to another one meanwhile.
            RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| self.file.sync_data()),
            _ => {
                let f = self.file.clone();
                tokio::task::spawn_blocking(move || f.sync_data())
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoFail> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(IoFail::OutOfRange),
        }
    }

    fn is_primary(&self) -> bool {
        let st = lock(&self.state);
        st.meta.role == Role::Primary && st.meta.disk == DiskState::UpToDate
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoFail> {
        self.check_range(offset, buf.len() as u64)?;
        if !self.is_primary() {
            return Err(IoFail::NotPrimary);
        }
        self.file.read_exact_at(buf, offset).map_err(|_| IoFail::Io)
    }

    /// Writes `data` (or zeroes when `data` is `None`) and returns once it is on the local
    /// file and acknowledged by every connected peer (and synced everywhere with `fua`).
    pub async fn write(
        &self,
        offset: u64,
        len: u32,
        data: Option<Arc<Vec<u8>>>,
        fua: bool,
    ) -> Result<(), IoFail> {
        self.check_range(offset, u64::from(len))?;
        self.wait_window().await?;
        self.wait_unfrozen().await?;
        let mut waits: Vec<(Arc<Conn>, u64)> = Vec::new();
        let mut marked = None;
        {
            let order = self.order.lock().await;
            if !self.is_primary() {
                return Err(IoFail::NotPrimary);
            }
            let r = match &data {
                Some(d) => self.file.write_all_at(d, offset),
                None => self.zero_local(offset, u64::from(len)),
            };
            r.map_err(|_| IoFail::Io)?;
            {
                let mut st = lock(&self.state);
                let mut changed = false;
                let mut any_absent = false;
                let names: Vec<String> = st.peers.keys().cloned().collect();
                for n in names {
                    let conn = st.peers.get(&n).and_then(|p| p.conn.clone());
                    let seq = conn.as_ref().and_then(|c| {
                        lock(&c.inflight).as_mut().map(|inf| {
                            let s = inf.next_seq;
                            inf.next_seq += 1;
                            inf.queue.push_back((s, offset, u64::from(len)));
                            s
                        })
                    });
                    match (conn, seq) {
                        (Some(c), Some(s)) => waits.push((c, s)),
                        _ => {
                            any_absent = true;
                            changed |= st.meta.mark_dirty(&n, offset, u64::from(len));
                        }
                    }
                }
                if changed {
                    st.marks += 1;
                }
                // A bit already set may be set by a write whose batch is not saved yet:
                // this write waits for that save too.
                if any_absent {
                    marked = Some(st.marks);
                }
            }
            let mut flags = if fua { wire::WF_FUA } else { 0 };
            if data.is_none() {
                flags |= wire::WF_ZEROES;
            }
            // The frames' places in the streams are fixed under the order lock; the
            // sending (encryption included, under TLS) overlaps the next write's local
            // part instead of holding it up.
            let mut turns = Vec::with_capacity(waits.len());
            for (c, seq) in &waits {
                if let Some(t) = c.writer().await {
                    turns.push((c, *seq, t));
                }
            }
            drop(order);
            for (c, seq, t) in turns {
                let out = Out::Write {
                    seq,
                    offset,
                    len,
                    flags,
                    data: data.clone(),
                };
                // On failure the frame's region is still safe: it is in the inflight
                // queue, which the connection's teardown moves into the bitmap.
                c.send_with(t, out).await;
            }
        }
        if let Some(m) = marked {
            self.persist_marks(m).await?;
        }
        if fua {
            self.sync_data().await.map_err(|_| IoFail::Io)?;
        }
        wait_acks(&waits, self.cfg.peer_timeout).await;
        // A peer lost while this write was on its way froze the volume before the
        // write counted as done: it is acknowledged only once that peer is outdated.
        // A window target that lost its source holds it instead: the source may not
        // have it, and the source is the side the target will resync from.
        self.wait_window().await?;
        self.wait_unfrozen().await
    }

    /// Makes the dirty bits of marks up to `upto` durable: group commit. Writers that
    /// are ready get to mark first, then one save covers every mark made so far, and
    /// writers queued behind it return at once. The save stays under the state lock, as
    /// every other save, so an older picture never overwrites a newer one.
    async fn persist_marks(&self, upto: u64) -> Result<(), IoFail> {
        if lock(&self.state).saved_marks >= upto {
            return Ok(());
        }
        tokio::task::yield_now().await;
        let _p = self.persist.lock().await;
        // A picture is taken under the state lock and written outside it, so writers
        // (and a secondary's reader) go on marking bits for the next batch meanwhile.
        let (picture, version, now) = {
            let mut st = lock(&self.state);
            if st.saved_marks >= upto {
                return Ok(());
            }
            st.meta_version += 1;
            (st.meta.clone(), st.meta_version, st.marks)
        };
        let write = || {
            let mut saved = lock(&self.saved_version);
            // A newer picture on disk was taken later, so it holds these bits too.
            if *saved < version {
                picture.save(&self.cfg.dir)?;
                *saved = version;
            }
            Ok::<(), MetaError>(())
        };
        use tokio::runtime::{Handle, RuntimeFlavor};
        // Off this worker: the tasks that mark the next batch may be queued behind it.
        let r = match Handle::current().runtime_flavor() {
            RuntimeFlavor::MultiThread => tokio::task::block_in_place(write),
            _ => write(),
        };
        if let Err(e) = r {
            tracing::error!("saving the dirty bitmap: {e}");
            return Err(IoFail::Io);
        }
        let mut st = lock(&self.state);
        st.saved_marks = st.saved_marks.max(now);
        st.mark_saves += 1;
        Ok(())
    }

    /// Saves the metadata as it is now, under the state lock (which `st` holds).
    fn save_meta(&self, st: &mut State) -> Result<(), MetaError> {
        st.meta_version += 1;
        let version = st.meta_version;
        let mut saved = lock(&self.saved_version);
        st.meta.save(&self.cfg.dir)?;
        *saved = version;
        Ok(())
    }

    /// How many batch saves of dirty bits client writes have caused.
    pub fn bitmap_saves(&self) -> u64 {
        lock(&self.state).mark_saves
    }

    /// Waits while a lost peer's being outdated is unconfirmed; past the freeze
    /// timeout the request fails rather than be acknowledged.
    async fn wait_unfrozen(&self) -> Result<(), IoFail> {
        if !self.cfg.fence_peers {
            return Ok(());
        }
        let mut rx = self.thaw.subscribe();
        let mut counted = false;
        let r = loop {
            rx.borrow_and_update();
            let oldest = lock(&self.state).frozen.values().map(|f| f.since).min();
            let Some(since) = oldest else { break Ok(()) };
            let until = since + self.cfg.freeze_timeout;
            if Instant::now() >= until {
                break Err(IoFail::Io);
            }
            if !counted {
                counted = true;
                self.frozen_requests.fetch_add(1, Ordering::SeqCst);
            }
            let _ =
                tokio::time::timeout_at(tokio::time::Instant::from_std(until), rx.changed()).await;
        };
        if counted {
            self.frozen_requests.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }

    /// The cluster recorded `peer` as outdated: I/O waiting for that resumes.
    pub fn peer_outdated(&self, peer: &str) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        self.peer_mut(&mut st, peer)?;
        if st.frozen.remove(peer).is_some() {
            tracing::info!("peer {peer} confirmed outdated: I/O resumes");
        }
        drop(st);
        self.thaw.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The cluster holds this replica outdated: it stops counting as up to date, so it
    /// refuses promotion until a resync from a primary brings it up to date again.
    pub fn outdate(&self) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        if st.meta.role == Role::Primary {
            return Err(VolumeError::IsPrimary {
                action: "mark this replica outdated",
            });
        }
        let in_sync = self.view(&st, "").in_sync_with_primary;
        if st.meta.disk == DiskState::UpToDate && !in_sync {
            st.meta.disk = DiskState::Outdated;
            self.save_meta(&mut st)?;
            tracing::warn!("the cluster records this replica as outdated");
        }
        Ok(())
    }

    /// Makes every completed write durable locally and on every connected peer.
    pub async fn flush(&self) -> Result<(), IoFail> {
        self.wait_unfrozen().await?;
        let mut waits = Vec::new();
        {
            let _o = self.order.lock().await;
            {
                let st = lock(&self.state);
                for p in st.peers.values() {
                    if let Some(c) = &p.conn
                        && let Some(inf) = lock(&c.inflight).as_mut()
                    {
                        let s = inf.next_seq;
                        inf.next_seq += 1;
                        inf.queue.push_back((s, 0, 0));
                        waits.push((c.clone(), s));
                    }
                }
            }
            for (c, s) in &waits {
                c.send(Out::Flush(*s)).await;
            }
        }
        self.sync_data().await.map_err(|_| IoFail::Io)?;
        wait_acks(&waits, self.cfg.peer_timeout).await;
        self.wait_unfrozen().await
    }

    fn peer_links(&self, st: &State) -> Vec<PeerLink> {
        st.peers
            .iter()
            .map(|(n, p)| PeerLink {
                node: n.clone(),
                connected: p.conn.is_some(),
                role: p.conn.as_ref().map(|c| *lock(&c.peer_role)),
            })
            .collect()
    }

    /// Tells connected peers this replica's generation, epoch, role and disk state.
    /// Called with the order lock held, so the frames precede any later write.
    async fn announce(&self) {
        let (f, conns) = {
            let st = lock(&self.state);
            (self.state_frames(&st), self.conns(&st))
        };
        for c in conns {
            c.send(Out::Frame(f.clone())).await;
        }
    }

    fn conns(&self, st: &State) -> Vec<Arc<Conn>> {
        st.peers.values().filter_map(|p| p.conn.clone()).collect()
    }

    fn state_frames(&self, st: &State) -> Vec<u8> {
        let mut f = Vec::new();
        wire::encode_json(
            &mut f,
            wire::K_GEN,
            &GenUpdate {
                current_gen: st.meta.current_gen,
                history: st.meta.history.clone(),
                epoch: st.meta.epoch,
            },
        );
        wire::encode_json(
            &mut f,
            wire::K_STATE,
            &StateUpdate {
                role: st.meta.role,
                disk: st.meta.disk,
                epoch: st.meta.epoch,
            },
        );
        f
    }

    /// Becomes primary. `fenced` names peers the cluster confirmed fenced or outdated.
    pub async fn promote(&self, fenced: &[String]) -> Result<(), VolumeError> {
        let _o = self.order.lock().await;
        self.promote_locked(fenced)?;
        self.announce().await;
        Ok(())
    }

    fn window_peers(&self, st: &State) -> Vec<WindowPeer> {
        st.peers
            .iter()
            .map(|(n, p)| WindowPeer {
                node: n.clone(),
                connected: p.conn.is_some(),
                established: p
                    .conn
                    .as_ref()
                    .is_some_and(|c| *lock(&c.repl) == Replication::Established),
                role: p.conn.as_ref().map(|c| *lock(&c.peer_role)),
                disk: p.conn.as_ref().map(|c| *lock(&c.peer_disk)),
            })
            .collect()
    }

    fn window_frame(&self, st: &State, peer: &str, msg: WindowMsg) -> Vec<u8> {
        let mut h = self.hello(st, peer);
        h.view.window = Some(msg);
        let mut f = Vec::new();
        wire::encode_json(&mut f, wire::K_HELLO, &h);
        f
    }

    /// Becomes a second primary beside `source` for a live migration, once `source`
    /// agrees (see [`WindowState`]).
    pub async fn promote_window(&self, fenced: &[String], source: &str) -> Result<(), VolumeError> {
        let refused = |reason: String| {
            VolumeError::Promote(PromoteError::Window {
                source_node: source.to_string(),
                reason,
            })
        };
        let mut rx = self.thaw.subscribe();
        let (conn, frame) = {
            let mut st = lock(&self.state);
            if st.meta.role == Role::Primary {
                return Ok(());
            }
            decide::check_window_promote(st.meta.disk, &self.window_peers(&st), source, fenced)?;
            st.window_answer = None;
            let ask = WindowMsg::Ask {
                source: source.to_string(),
                target: self.node.clone(),
            };
            let frame = self.window_frame(&st, source, ask);
            let conn = st.peers.get(source).and_then(|p| p.conn.clone());
            (conn, frame)
        };
        let Some(conn) = conn else {
            return Err(refused("not connected".into()));
        };
        if !conn.send(Out::Frame(frame)).await {
            return Err(refused("the request could not be sent".into()));
        }
        let give_up = tokio::time::Instant::now() + WINDOW_ASK_TIMEOUT;
        let answer = loop {
            rx.borrow_and_update();
            if let Some((from, a)) = lock(&self.state).window_answer.take()
                && from == source
            {
                break a;
            }
            if tokio::time::timeout_at(give_up, rx.changed())
                .await
                .is_err()
            {
                break Err(format!("no answer within {WINDOW_ASK_TIMEOUT:?}"));
            }
        };
        answer.map_err(refused)?;
        let _o = self.order.lock().await;
        {
            let mut st = lock(&self.state);
            // Checked again: the source may have changed while it answered.
            decide::check_window_promote(st.meta.disk, &self.window_peers(&st), source, fenced)?;
            st.window = Some(WindowState {
                peer: source.to_string(),
                target: true,
                opened_ms: now_ms(),
                until: Instant::now() + self.cfg.window_timeout,
            });
            st.meta.role = Role::Primary;
            st.meta.promoted_at_ms = now_ms();
            self.save_meta(&mut st)?;
        }
        tracing::info!("migration window with {source} open: primary beside it");
        self.announce().await;
        Ok(())
    }

    /// A window message from `conn`'s peer: the source's side of the handshake, or the
    /// source's answer to this replica's request.
    async fn handle_window(&self, conn: &Arc<Conn>, msg: WindowMsg) {
        let reply = {
            let mut st = lock(&self.state);
            match msg {
                WindowMsg::Ask { source, target } => {
                    let me = self
                        .window_peers(&st)
                        .into_iter()
                        .find(|p| p.node == target);
                    let open = st.window.as_ref().map(|w| w.peer.clone());
                    let verdict = match me {
                        _ if source != self.node || target != conn.peer => {
                            Err(format!("the request names {source} -> {target}"))
                        }
                        Some(t) => {
                            decide::grant_window(st.meta.role, st.meta.disk, &t, open.as_deref())
                        }
                        None => Err(format!("{target} is not a peer")),
                    };
                    let answer = match verdict {
                        Ok(()) => {
                            st.window = Some(WindowState {
                                peer: target.clone(),
                                target: false,
                                opened_ms: now_ms(),
                                until: Instant::now() + 2 * self.cfg.window_timeout,
                            });
                            tracing::info!("migration window for {target} granted");
                            WindowMsg::Grant { source, target }
                        }
                        Err(reason) => {
                            tracing::warn!("migration window for {target} refused: {reason}");
                            WindowMsg::Refuse { reason }
                        }
                    };
                    Some(self.window_frame(&st, &conn.peer, answer))
                }
                WindowMsg::Grant { source, target } => {
                    st.window_answer = Some(if source == conn.peer && target == self.node {
                        (source, Ok(()))
                    } else {
                        (conn.peer.clone(), Err("a grant for another pair".into()))
                    });
                    None
                }
                WindowMsg::Refuse { reason } => {
                    st.window_answer = Some((conn.peer.clone(), Err(reason)));
                    None
                }
            }
        };
        match reply {
            Some(f) => {
                conn.send(Out::Frame(f)).await;
            }
            None => {
                self.thaw.send_modify(|n| *n += 1);
            }
        }
    }

    /// The window with `peer` ends because `peer` is secondary now.
    fn close_window_with(&self, peer: &str) {
        let mut st = lock(&self.state);
        if st.window.as_ref().is_some_and(|w| w.peer == peer) {
            st.window = None;
            drop(st);
            tracing::info!("migration window with {peer} closed: it is secondary");
            self.thaw.send_modify(|n| *n += 1);
        }
    }

    /// A window target past its window holds writes until the window closes (the source
    /// is seen secondary, or this replica is demoted); past the freeze timeout the
    /// request fails rather than be acknowledged.
    async fn wait_window(&self) -> Result<(), IoFail> {
        let mut rx = self.thaw.subscribe();
        let mut counted = false;
        let r = loop {
            rx.borrow_and_update();
            let held_since = {
                let mut st = lock(&self.state);
                // Only the target watches its peer: the source may not have heard yet
                // that its target is primary.
                let source_secondary = st.window.as_ref().is_some_and(|w| {
                    w.target
                        && st
                            .peers
                            .get(&w.peer)
                            .and_then(|p| p.conn.as_ref())
                            .is_some_and(|c| *lock(&c.peer_role) == Role::Secondary)
                });
                if source_secondary {
                    st.window = None;
                }
                st.window
                    .as_ref()
                    .filter(|w| w.target && Instant::now() >= w.until)
                    .map(|w| w.until)
            };
            let Some(since) = held_since else {
                break Ok(());
            };
            let until = since + self.cfg.freeze_timeout;
            if Instant::now() >= until {
                break Err(IoFail::Io);
            }
            if !counted {
                counted = true;
                self.frozen_requests.fetch_add(1, Ordering::SeqCst);
            }
            let _ =
                tokio::time::timeout_at(tokio::time::Instant::from_std(until), rx.changed()).await;
        };
        if counted {
            self.frozen_requests.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }

    fn promote_locked(&self, fenced: &[String]) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        if st.meta.role == Role::Primary {
            return Ok(());
        }
        let links = self.peer_links(&st);
        decide::check_promote(st.meta.disk, &links, fenced, self.cfg.allow_two_primaries)?;
        let dual = links.iter().any(|l| l.role == Some(Role::Primary));
        if !dual {
            let newest = st
                .peers
                .values()
                .filter_map(|p| p.conn.as_ref())
                .map(|c| c.peer_epoch.load(Ordering::SeqCst))
                .max()
                .unwrap_or(0)
                .max(st.meta.epoch);
            st.meta.epoch = newest + 1;
            st.meta.rotate_gen();
            // As DRBD calls fence-peer when promoting with a peer's disk unknown: a
            // peer away now misses what this primary writes, so it must be recorded
            // outdated before the first write is acknowledged.
            if self.cfg.fence_peers {
                let generation = st.meta.current_gen;
                let away: Vec<String> = links
                    .iter()
                    .filter(|l| !l.connected)
                    .map(|l| l.node.clone())
                    .collect();
                for peer in away {
                    st.frozen.entry(peer).or_insert(FreezeEntry {
                        since: Instant::now(),
                        since_ms: now_ms(),
                        generation,
                    });
                }
            }
        }
        st.meta.role = Role::Primary;
        st.meta.promoted_at_ms = now_ms();
        self.save_meta(&mut st)?;
        Ok(())
    }

    /// A clean stop: everything written is synced, and the replica is left secondary
    /// so its next start is not mistaken for a crash.
    pub async fn shutdown(&self) -> Result<(), VolumeError> {
        let _o = self.order.lock().await;
        self.sync_data().await.map_err(|source| VolumeError::Io {
            path: self.data_path.clone(),
            source,
        })?;
        let mut st = lock(&self.state);
        if st.meta.role == Role::Primary {
            st.meta.role = Role::Secondary;
            self.save_meta(&mut st)?;
        }
        Ok(())
    }

    pub async fn demote(&self) -> Result<(), VolumeError> {
        let _o = self.order.lock().await;
        {
            let mut st = lock(&self.state);
            if st.meta.role == Role::Secondary {
                return Ok(());
            }
            st.meta.role = Role::Secondary;
            self.save_meta(&mut st)?;
            // A secondary writes nothing, so nothing waits on a peer being outdated;
            // the next promotion freezes again for peers still away.
            st.frozen.clear();
            st.window = None;
        }
        self.thaw.send_modify(|n| *n += 1);
        self.announce().await;
        Ok(())
    }

    fn peer_mut<'a>(&self, st: &'a mut State, peer: &str) -> Result<&'a mut Peer, VolumeError> {
        let known = st.peers.keys().cloned().collect::<Vec<_>>().join(", ");
        st.peers
            .get_mut(peer)
            .ok_or_else(|| VolumeError::UnknownPeer(peer.to_owned(), known))
    }

    pub fn connect(&self, peer: &str) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        let p = self.peer_mut(&mut st, peer)?;
        p.want = true;
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    pub fn disconnect(&self, peer: &str) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        let p = self.peer_mut(&mut st, peer)?;
        p.want = false;
        if let Some(c) = &p.conn {
            c.shut();
        }
        Ok(())
    }

    /// Resolves a split brain with `peer` by discarding the data of node `discard`
    /// (this node or that peer), then reconnects.
    pub fn resolve(&self, peer: &str, discard: &str) -> Result<(), VolumeError> {
        let mut st = lock(&self.state);
        let primary = st.meta.role == Role::Primary;
        let node = self.node.clone();
        let p = self.peer_mut(&mut st, peer)?;
        if discard == node {
            if primary {
                return Err(VolumeError::IsPrimary {
                    action: "discard this node's data",
                });
            }
            p.discard_my_data = true;
        } else if discard == peer {
            p.discard_peer = true;
        } else {
            return Err(VolumeError::BadDiscard {
                discard: discard.to_owned(),
                node,
                peer: peer.to_owned(),
            });
        }
        p.want = true;
        p.split_brain = false;
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    pub fn status(&self) -> Status {
        let st = lock(&self.state);
        let peers = st
            .peers
            .iter()
            .map(|(n, p)| {
                let c = p.conn.as_ref();
                let resync = c.and_then(|c| {
                    lock(&c.progress).as_ref().map(|pr| {
                        let secs = pr.started.elapsed().as_secs_f64().max(1e-3);
                        let rate = (pr.done as f64 / secs) as u64;
                        ResyncStatus {
                            total_bytes: pr.total,
                            done_bytes: pr.done,
                            rate_bytes_per_s: rate,
                            eta_s: (pr.total > 0 && rate > 0)
                                .then(|| pr.total.saturating_sub(pr.done) / rate),
                        }
                    })
                });
                PeerStatus {
                    node: n.clone(),
                    address: p.addr.to_string(),
                    connection: match (c, p.want) {
                        (Some(_), _) => Connection::Connected,
                        (None, true) => Connection::Connecting,
                        (None, false) => Connection::StandAlone,
                    },
                    role: c.map(|c| *lock(&c.peer_role)),
                    disk: c.map(|c| *lock(&c.peer_disk)),
                    replication: c.map(|c| *lock(&c.repl)),
                    out_of_sync_bytes: st.meta.dirty_count(n) * st.meta.region_size,
                    resync,
                    resynced_bytes_total: p.resynced_bytes,
                    split_brain: p.split_brain,
                    last_error: p.last_error.clone(),
                }
            })
            .collect();
        let promotion = decide::promotion_preference(st.meta.disk, &self.peer_links(&st));
        Status {
            promotion,
            volume: st.meta.volume.clone(),
            node: st.meta.node.clone(),
            role: st.meta.role,
            disk: st.meta.disk,
            epoch: st.meta.epoch,
            generation: format!("{:016X}", st.meta.current_gen),
            size: st.meta.size,
            crashed_primary: st.meta.crashed_primary,
            peers,
            history: st
                .meta
                .history
                .iter()
                .map(|g| format!("{g:016X}"))
                .collect(),
            frozen: st
                .frozen
                .iter()
                .map(|(p, f)| Frozen {
                    peer: p.clone(),
                    since_ms: f.since_ms,
                    generation: format!("{:016X}", f.generation),
                    expired: f.since.elapsed() >= self.cfg.freeze_timeout,
                })
                .collect(),
            frozen_requests: self.frozen_requests.load(Ordering::SeqCst),
            window: st.window.as_ref().map(|w| WindowStatus {
                peer: w.peer.clone(),
                side: if w.target { "target" } else { "source" }.into(),
                opened_ms: w.opened_ms,
                closed: w.target && Instant::now() >= w.until,
            }),
        }
    }

    pub fn data_path(&self) -> &Path {
        &self.data_path
    }
}

async fn wait_acks(waits: &[(Arc<Conn>, u64)], limit: Duration) {
    for (c, seq) in waits {
        let mut rx = c.acked.subscribe();
        // A dead connection counts as done: its unacknowledged regions were marked
        // dirty for that peer before `alive` was cleared.
        let acked = rx.wait_for(|a| a.seq >= *seq || !a.alive);
        if tokio::time::timeout(limit, acked).await.is_err() {
            tracing::warn!(
                "peer {} acknowledged nothing for {limit:?}: disconnecting",
                c.peer
            );
            c.shut();
            // Teardown is local and prompt; it clears `alive` once the regions are
            // in the bitmap.
            let _ = rx.wait_for(|a| !a.alive).await;
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<u8> {
    let mut h = [0u8; wire::FRAME_HEADER];
    rd.read_exact(&mut h).await?;
    let (kind, len) = wire::decode_header(&h).map_err(std::io::Error::other)?;
    buf.resize(len as usize, 0);
    rd.read_exact(buf).await?;
    Ok(kind)
}

async fn send_json<T: Serialize>(
    wr: &mut BufWriter<PeerWrite>,
    kind: u8,
    v: &T,
) -> std::io::Result<()> {
    let mut f = Vec::new();
    wire::encode_json(&mut f, kind, v);
    wr.write_all(&f).await?;
    wr.flush().await
}

async fn write_out(
    wr: &mut BufWriter<PeerWrite>,
    head: &mut Vec<u8>,
    out: &Out,
) -> std::io::Result<()> {
    head.clear();
    match out {
        Out::Write {
            seq,
            offset,
            len,
            flags,
            data,
        } => {
            let body: &[u8] = data.as_deref().map_or(&[], |d| d.as_slice());
            wire::encode_write_head(head, *seq, *offset, *len, *flags, body.len());
            write_pair(wr, head, body).await
        }
        Out::Flush(s) => {
            wire::encode_seq(head, wire::K_FLUSH, *s);
            wr.write_all(head).await
        }
        Out::Ack(s) => {
            wire::encode_seq(head, wire::K_ACK, *s);
            wr.write_all(head).await
        }
        Out::Resync { offset, data } => {
            wire::encode_resync_head(head, *offset, data.len());
            write_pair(wr, head, data).await
        }
        Out::Frame(f) => wr.write_all(f).await,
    }
}

/// Writes a frame's head and payload in one vectored write where the stream takes one:
/// under TLS the head then shares the payload's records, instead of going out as a
/// record and a system call of its own each time a payload is larger than the buffer.
async fn write_pair(
    wr: &mut BufWriter<PeerWrite>,
    head: &[u8],
    body: &[u8],
) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(body)];
    let mut left: &mut [IoSlice<'_>] = &mut bufs;
    while !left.is_empty() {
        let n = wr.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
    }

    /// Two plaintext replicas `a` (UpToDate, primary) and `b`, in sync.
    async fn pair(dir: &Path) -> (Arc<Volume>, Arc<Volume>) {
        pair_with(dir, DEFAULT_WINDOW_TIMEOUT).await
    }

    async fn pair_with(dir: &Path, window_timeout: Duration) -> (Arc<Volume>, Arc<Volume>) {
        let (aa, ba) = (free_addr(), free_addr());
        let open = |node: &str, me: SocketAddr, peer: (&str, SocketAddr), initial: bool| {
            let d = dir.join(node);
            std::fs::create_dir_all(&d).expect("replica dir");
            crate::meta::create(&d, "vol", node, 1 << 20, 65536, initial).expect("meta");
            Volume::open(VolumeConfig {
                dir: d,
                listen: Some(me),
                peers: vec![(peer.0.to_string(), peer.1)],
                policy: SplitBrainPolicy::Disconnect,
                allow_two_primaries: false,
                resync_rate: None,
                peer_timeout: Duration::from_secs(5),
                tls: None,
                fence_peers: false,
                freeze_timeout: Duration::from_secs(1),
                window_timeout,
            })
            .expect("open")
        };
        let a = open("a", aa, ("b", ba), true);
        let b = open("b", ba, ("a", aa), false);
        a.start().await.expect("start a");
        b.start().await.expect("start b");
        settle(&a, |s| s.peers[0].connection == Connection::Connected).await;
        a.promote(&[]).await.expect("promote a");
        settle(&b, |s| {
            s.disk == DiskState::UpToDate
                && s.peers[0].role == Some(Role::Primary)
                && s.peers[0].replication == Some(Replication::Established)
        })
        .await;
        (a, b)
    }

    async fn settle(v: &Volume, want: impl Fn(&Status) -> bool) -> Status {
        for _ in 0..600 {
            let s = v.status();
            if want(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{:#?}", v.status());
    }

    fn data(v: &Volume) -> Vec<u8> {
        std::fs::read(v.data_path()).expect("data file")
    }

    /// The first byte of each 4 KiB block, for readable comparisons.
    fn blocks(v: &Volume) -> Vec<u8> {
        data(v).chunks(4096).take(4).map(|c| c[0]).collect()
    }

    #[tokio::test]
    async fn a_second_primary_only_inside_a_window_the_source_granted_which_its_demote_closes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(tmp.path()).await;
        assert!(
            matches!(
                b.promote(&[]).await,
                Err(VolumeError::Promote(PromoteError::PeerIsPrimary(_)))
            ),
            "outside a window two primaries stay impossible"
        );
        assert!(b.promote_window(&[], "c").await.is_err(), "not a peer");

        b.promote_window(&[], "a").await.expect("the window opens");
        assert_eq!(b.status().role, Role::Primary);
        let w = b.status().window.expect("the target's window");
        assert_eq!((w.peer.as_str(), w.side.as_str()), ("a", "target"));
        settle(&a, |s| {
            s.window.as_ref().is_some_and(|w| w.side == "source")
        })
        .await;
        // Both write, each write reaches the other (protocol C both ways).
        let buf = |x: u8| Some(Arc::new(vec![x; 4096]));
        a.write(0, 4096, buf(0x11), true).await.expect("a writes");
        b.write(4096, 4096, buf(0x22), true)
            .await
            .expect("b writes");
        assert_eq!(blocks(&a), blocks(&b));
        assert!(data(&a) == data(&b), "the replicas differ");

        // The source's demote closes the window on both sides; the old primary can no
        // longer write, the new one goes on alone.
        a.demote().await.expect("demote a");
        settle(&b, |s| {
            s.window.is_none() && s.peers[0].role == Some(Role::Secondary)
        })
        .await;
        assert!(matches!(
            a.write(0, 4096, buf(0x33), true).await,
            Err(IoFail::NotPrimary)
        ));
        b.write(8192, 4096, buf(0x44), true)
            .await
            .expect("b writes on");
        settle(&a, |s| s.peers[0].out_of_sync_bytes == 0).await;
        assert_eq!(blocks(&a), blocks(&b));
        assert!(data(&a) == data(&b), "the replicas differ");
    }

    #[tokio::test]
    async fn a_window_target_that_loses_its_source_holds_writes_until_demoted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(tmp.path()).await;
        b.promote_window(&[], "a").await.expect("the window opens");
        b.disconnect("a").expect("disconnect");
        settle(&b, |s| s.window.as_ref().is_some_and(|w| w.closed)).await;
        let buf = Some(Arc::new(vec![0x55u8; 4096]));
        assert!(
            matches!(b.write(0, 4096, buf.clone(), true).await, Err(IoFail::Io)),
            "a target cut off from its source must not acknowledge a write"
        );
        // The source knows nothing of b's attempt: it never reached the disk there.
        assert_eq!(a.status().role, Role::Primary);
        b.demote().await.expect("demote b");
        assert!(b.status().window.is_none());
        assert!(matches!(
            b.write(0, 4096, buf, true).await,
            Err(IoFail::NotPrimary)
        ));
    }

    #[tokio::test]
    async fn the_window_lasts_as_long_as_configured_then_the_target_holds_its_writes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair_with(tmp.path(), Duration::from_secs(1)).await;
        b.promote_window(&[], "a").await.expect("the window opens");
        let buf = Some(Arc::new(vec![0x66u8; 4096]));
        b.write(0, 4096, buf.clone(), true)
            .await
            .expect("inside the window");
        // Not the default two minutes: the configured second.
        settle(&b, |s| s.window.as_ref().is_some_and(|w| w.closed)).await;
        assert!(
            matches!(b.write(0, 4096, buf, true).await, Err(IoFail::Io)),
            "a target past its window must not acknowledge a write"
        );
        assert_eq!(a.status().role, Role::Primary);
        a.demote().await.expect("demote a");
        settle(&b, |s| s.window.is_none()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secondary_saves_the_bits_for_an_absent_peer_in_batches_before_acknowledging() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (aa, ba, ca) = (free_addr(), free_addr(), free_addr());
        let open = |node: &str, me: SocketAddr, peers: Vec<(String, SocketAddr)>, initial| {
            let d = tmp.path().join(node);
            std::fs::create_dir_all(&d).expect("replica dir");
            crate::meta::create(&d, "vol", node, 8 << 20, 65536, initial).expect("meta");
            Volume::open(VolumeConfig {
                dir: d,
                listen: Some(me),
                peers,
                policy: SplitBrainPolicy::Disconnect,
                allow_two_primaries: false,
                resync_rate: None,
                peer_timeout: Duration::from_secs(5),
                tls: None,
                fence_peers: false,
                freeze_timeout: Duration::from_secs(1),
                window_timeout: DEFAULT_WINDOW_TIMEOUT,
            })
            .expect("open")
        };
        // c is b's peer only and never runs: b tracks what it misses (a, which has no
        // bits to save, streams its writes without pause).
        let a = open("a", aa, vec![("b".into(), ba)], true);
        let b = open("b", ba, vec![("a".into(), aa), ("c".into(), ca)], false);
        a.start().await.expect("start a");
        b.start().await.expect("start b");
        settle(&a, |s| {
            s.peers
                .iter()
                .any(|p| p.node == "b" && p.connection == Connection::Connected)
        })
        .await;
        a.promote(&[]).await.expect("promote a");
        settle(&b, |s| {
            let pa = s.peers.iter().find(|p| p.node == "a");
            s.disk == DiskState::UpToDate
                && pa.is_some_and(|p| p.replication == Some(Replication::Established))
        })
        .await;
        // 64 writes at once, each to a region c has not missed yet.
        const N: u64 = 64;
        let writes: Vec<_> = (0..N)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.write(i * 65536, 4096, Some(Arc::new(vec![0x77; 4096])), false)
                        .await
                })
            })
            .collect();
        for w in writes {
            assert!(matches!(w.await, Ok(Ok(()))));
        }
        // Every acknowledged write's bit for c is on b's disk already.
        let on_disk = crate::meta::Meta::load(&tmp.path().join("b")).expect("b's metadata");
        assert_eq!(on_disk.dirty_count("c"), N, "b's bits for c, as saved");
        let saves = b.bitmap_saves();
        assert!(
            (1..N).contains(&saves),
            "one save per batch of new bits, not per bit: {saves} saves for {N} bits"
        );
    }

    #[tokio::test]
    async fn a_source_that_is_not_primary_refuses_the_window() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(tmp.path()).await;
        a.demote().await.expect("demote a");
        settle(&b, |s| s.peers[0].role == Some(Role::Secondary)).await;
        let e = b
            .promote_window(&[], "a")
            .await
            .expect_err("no primary to migrate from");
        assert!(e.to_string().contains("not primary"), "{e}");
        assert_eq!(b.status().role, Role::Secondary);
    }
}
