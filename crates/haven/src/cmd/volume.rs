//! `haven volume`: create a replica, serve it (NBD + replication + control socket), and
//! drive a running replica through its control socket.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use haven_volume::control::{self, ControlRequest};
use haven_volume::decide::SplitBrainPolicy;
use haven_volume::meta::{self, parse_size};
use haven_volume::volume::{Status, Volume, VolumeConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a replica: a sparse backing file and its metadata in DIR
    Create(CreateArgs),
    /// Serve a replica: NBD for the guest, replication to peers, a control socket
    Serve(ServeArgs),
    /// Show role, disk state, peers, connection and resync progress
    Status(CtlArgs),
    /// Make this replica primary
    Promote(PromoteArgs),
    /// Make this replica secondary
    Demote(CtlArgs),
    /// (Re)enable the connection to a peer
    Connect(PeerArgs),
    /// Drop and disable the connection to a peer
    Disconnect(PeerArgs),
    /// Resolve a split brain with a peer by naming the node whose data is discarded
    Resolve(ResolveArgs),
    /// Tell a frozen primary that the cluster has recorded PEER as outdated: I/O resumes
    PeerOutdated(PeerArgs),
    /// Mark this (secondary) replica outdated: it refuses promotion until resynced
    Outdate(CtlArgs),
}

#[derive(Parser)]
pub struct BenchArgs {
    /// Bytes per sequential-write round (also the volume size)
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    size: u64,
    /// Rounds per measurement; medians are reported
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// 4 KiB writes per latency round
    #[arg(long, default_value_t = 2000)]
    small_writes: u32,
    /// Scratch directory (default /dev/shm, else the system temp dir)
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Replicate without TLS (the replication protocol alone); by default replicas use
    /// mutual TLS with cluster certificates, as the daemon runs them
    #[arg(long)]
    plaintext: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct CreateArgs {
    /// Directory for the backing file (data.img) and metadata (meta.json)
    #[arg(long)]
    dir: PathBuf,
    /// Volume id, the same on every replica
    #[arg(long)]
    volume: String,
    /// This replica's node name
    #[arg(long)]
    node: String,
    /// Size in bytes, or with a K/M/G/T suffix (binary units)
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Resync/bitmap granularity (a power of two)
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    region_size: u64,
    /// This replica's data is the starting point (UpToDate); others start Inconsistent
    /// and get a full sync
    #[arg(long)]
    initial: bool,
}

#[derive(Parser)]
struct ServeArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Unix socket for NBD clients
    #[arg(long)]
    nbd: Option<PathBuf>,
    /// TCP address for NBD clients (NBD has no authentication: loopback only, unless
    /// --allow-non-loopback)
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Address to accept replication connections on (loopback only, unless
    /// --allow-non-loopback)
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Let --listen and --nbd-tcp bind addresses other than loopback (a host's
    /// replication network)
    #[arg(long)]
    allow_non_loopback: bool,
    /// The cluster CA certificate (PEM) peers' certificates must chain to
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), issued by the cluster CA (e.g. the daemon's
    /// node.pem)
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM)
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Replicate without TLS (benchmarks and hand tests on loopback only); a plaintext
    /// replica cannot connect to a TLS one
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    plaintext: bool,
    /// A peer replica as NAME=ADDR (repeat for each peer)
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(String, SocketAddr)>,
    /// Control socket for `haven volume status|promote|…`
    #[arg(long)]
    control: PathBuf,
    /// What to do on split brain: disconnect, discard-zero-changes,
    /// discard-least-changes, discard-younger-primary
    #[arg(long, default_value = "disconnect")]
    after_sb: SplitBrainPolicy,
    /// Allow two primaries at once (only for a live-migration window)
    #[arg(long)]
    allow_two_primaries: bool,
    /// Resync rate limit, bytes per second (K/M/G suffixes allowed)
    #[arg(long, value_parser = parse_size)]
    resync_rate: Option<u64>,
    /// Seconds a connected peer may take to take or acknowledge a write before it is
    /// disconnected and tracked in the bitmap instead
    #[arg(long, default_value_t = 5.0, value_parser = parse_timeout)]
    peer_timeout: f64,
    /// Freeze I/O when an up-to-date peer is lost (and when promoted with a peer away)
    /// until `haven volume peer-outdated` says the peer is recorded outdated, or it
    /// returns (DRBD's `fencing resource-and-stonith`)
    #[arg(long)]
    fence_peers: bool,
    /// Seconds a request may wait on such a freeze; past it, it fails (EIO) rather than
    /// be acknowledged
    #[arg(long, default_value_t = 60.0, value_parser = parse_timeout)]
    freeze_timeout: f64,
    /// How long a live migration's dual-primary window may stay open on the target
    /// (120, 90s, 2min; 1s to 1h); the source keeps its side twice as long
    #[arg(long, default_value = "120s", value_parser = haven_model::config::parse_window_timeout)]
    window_timeout: std::time::Duration,
    /// Runtime worker threads (1: everything on one thread, lowest latency)
    #[arg(long, default_value_t = 2, env = "HAVEN_VOLUME_THREADS")]
    threads: usize,
}

#[derive(Parser)]
struct CtlArgs {
    /// The replica's control socket
    #[arg(long)]
    control: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct PromoteArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// A peer the cluster has confirmed fenced or outdated (repeatable); without it an
    /// unreachable peer blocks promotion
    #[arg(long)]
    peer_fenced: Vec<String>,
    /// Become primary beside this peer's primary for a live migration (a window the
    /// peer must grant; its demote closes it)
    #[arg(long)]
    migration_source: Option<String>,
}

#[derive(Parser)]
struct PeerArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    #[arg(long)]
    peer: String,
}

#[derive(Parser)]
struct ResolveArgs {
    #[command(flatten)]
    ctl: CtlArgs,
    /// The peer the split brain is with
    #[arg(long)]
    peer: String,
    /// The node whose changes are thrown away: this node's name or the peer's
    #[arg(long)]
    discard: String,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "`{s}` must be a number of seconds between 0 and 3600"
        )),
    }
}

fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer `{s}` must be NAME=ADDR, e.g. b=127.0.0.1:7790"))?;
    if name.is_empty() {
        return Err(format!("peer `{s}` has an empty name"));
    }
    let addr = addr
        .parse()
        .map_err(|e| format!("peer `{s}`: address `{addr}`: {e}"))?;
    Ok((name.to_owned(), addr))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        VolumeCommand::Create(a) => create(a),
        VolumeCommand::Serve(a) => serve(a),
        VolumeCommand::Status(a) => ctl(&a, ControlRequest::Status),
        VolumeCommand::Promote(a) => ctl(
            &a.ctl,
            match a.migration_source {
                Some(migration_source) => ControlRequest::PromoteWindow {
                    peer_fenced: a.peer_fenced,
                    migration_source,
                },
                None => ControlRequest::Promote {
                    peer_fenced: a.peer_fenced,
                },
            },
        ),
        VolumeCommand::Demote(a) => ctl(&a, ControlRequest::Demote),
        VolumeCommand::Connect(a) => ctl(&a.ctl, ControlRequest::Connect { peer: a.peer }),
        VolumeCommand::Disconnect(a) => ctl(&a.ctl, ControlRequest::Disconnect { peer: a.peer }),
        VolumeCommand::Resolve(a) => ctl(
            &a.ctl,
            ControlRequest::Resolve {
                peer: a.peer,
                discard: a.discard,
            },
        ),
        VolumeCommand::PeerOutdated(a) => {
            ctl(&a.ctl, ControlRequest::PeerOutdated { peer: a.peer })
        }
        VolumeCommand::Outdate(a) => ctl(&a, ControlRequest::Outdate),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<()> {
    if a.volume.is_empty() || a.node.is_empty() {
        bail!("--volume and --node must not be empty");
    }
    let m = meta::create(&a.dir, &a.volume, &a.node, a.size, a.region_size, a.initial)?;
    println!(
        "created volume {} replica {} in {} ({} bytes, {:?})",
        m.volume,
        m.node,
        a.dir.display(),
        m.size,
        m.disk
    );
    Ok(())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread keeps every hop of a replicated write (client task, peer writer, ack
    // reader) on the same thread: no cross-thread wake-ups on the latency path.
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

fn refuse_existing(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.exists() {
        bail!(
            "{what} {}: the path already exists (another replica running, or a stale \
             socket to remove)",
            path.display()
        );
    }
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    refuse_existing(&a.control, "--control")?;
    if let Some(p) = &a.nbd {
        refuse_existing(p, "--nbd")?;
    }
    for (flag, addr) in [("--listen", a.listen), ("--nbd-tcp", a.nbd_tcp)] {
        if let Some(addr) = addr {
            check_bind(flag, addr, a.allow_non_loopback)?;
        }
    }
    let tls = replication_tls(&a)?;
    if tls.is_none() && !a.plaintext && (a.listen.is_some() || !a.peers.is_empty()) {
        bail!(
            "--listen/--peer: replication needs mutual TLS: give --tls-ca, --tls-cert and \
             --tls-key (the cluster's certificates), or --plaintext to replicate unencrypted"
        );
    }
    let cfg = VolumeConfig {
        tls,
        dir: a.dir.clone(),
        listen: a.listen,
        peers: a.peers.clone(),
        policy: a.after_sb,
        allow_two_primaries: a.allow_two_primaries,
        resync_rate: a.resync_rate,
        peer_timeout: std::time::Duration::from_secs_f64(a.peer_timeout),
        fence_peers: a.fence_peers,
        freeze_timeout: std::time::Duration::from_secs_f64(a.freeze_timeout),
        window_timeout: a.window_timeout,
    };
    let vol = Volume::open(cfg).with_context(|| format!("opening {}", a.dir.display()))?;
    let rt = runtime(a.threads)?;
    let result = rt.block_on(async {
        vol.start().await?;
        let mut tasks = tokio::task::JoinSet::new();
        {
            let v = vol.clone();
            let p = a.control.clone();
            tasks.spawn(async move { control::serve(&p, v).await.map_err(anyhow::Error::from) });
        }
        if let Some(p) = a.nbd.clone() {
            let v = vol.clone();
            tasks.spawn(async move {
                haven_volume::nbd::serve_unix(&p, v)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        if let Some(addr) = a.nbd_tcp {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--nbd-tcp {addr}"))?;
            let v = vol.clone();
            tasks.spawn(async move {
                haven_volume::nbd::serve_tcp(l, v)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            Some(r) = tasks.join_next() => {
                r.context("a server task failed")??;
            }
        }
        // A clean stop is not a crash: flush, and leave as secondary.
        vol.shutdown().await.context("flushing on shutdown")?;
        anyhow::Ok(())
    });
    let _ = std::fs::remove_file(&a.control);
    if let Some(p) = &a.nbd {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_background();
    result
}

/// The house rule: servers listen on loopback unless the operator says otherwise.
fn check_bind(flag: &str, addr: SocketAddr, allowed: bool) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && !allowed {
        bail!(
            "{flag} {addr}: not a loopback address; a replica listens elsewhere only with \
             --allow-non-loopback"
        );
    }
    Ok(())
}

/// Mutual TLS from the cluster's certificate files, with haven-net's configurations
/// (the same trust as the cluster's RPC).
fn replication_tls(a: &ServeArgs) -> anyhow::Result<Option<haven_volume::tls::ReplicationTls>> {
    let (Some(ca), Some(cert), Some(key)) = (&a.tls_ca, &a.tls_cert, &a.tls_key) else {
        return Ok(None);
    };
    let read = |flag: &str, p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("{flag} {}", p.display()))
    };
    let id = haven_net::TlsIdentity::from_pem(
        &read("--tls-ca", ca)?,
        &read("--tls-cert", cert)?,
        &read("--tls-key", key)?,
        &cert.display().to_string(),
    )?;
    let check = std::sync::Arc::new(id.node_check()?);
    // The CA already pins the cluster; comparing the name's cluster too costs nothing
    // and keeps a misissued certificate from another cluster's namespace out.
    let cluster = id.identity().map(|i| i.cluster);
    let tls = haven_volume::tls::ReplicationTls::new(
        &*id.server_config(false)?,
        &*id.client_config()?,
        haven_net::SERVER_NAME,
        std::sync::Arc::new(move |chain| {
            if !check.is_node(chain) {
                return None;
            }
            let peer = haven_net::PeerIdentity::of_cert(chain.first()?)?;
            let same_cluster = cluster.as_ref().is_none_or(|c| *c == peer.cluster);
            (peer.role == haven_net::CertRole::Node && same_cluster).then_some(peer.name)
        }),
    )?;
    Ok(Some(tls))
}

/// Runs the volume benchmark (`haven bench volume`).
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    use haven_volume::bench::{BenchOpts, Latency, bench_volume};
    let scratch = a.scratch.unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let opts = BenchOpts {
        haven: std::env::current_exe().context("locating the haven executable")?,
        size: a.size,
        rounds: a.rounds.max(1),
        small_writes: a.small_writes.max(1),
        scratch,
        tls: (!a.plaintext).then(|| -> haven_volume::bench::IssueCerts {
            std::sync::Arc::new(|dir: &Path, names: &[String]| {
                issue_bench_certs(dir, names).map_err(|e| format!("{e:#}"))
            })
        }),
    };
    let r = bench_volume(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let lat = |l: &Latency| format!("{:>8.0} {:>8.1} {:>8.1}", l.iops, l.p50_us, l.p99_us);
    println!(
        "volume bench: {} MiB per copy, {} rounds (medians), loopback RTT p50 {:.1} us, \
         replication {}",
        r.size >> 20,
        r.rounds,
        r.loopback_rtt_p50_us,
        if r.tls {
            "over mutual TLS"
        } else {
            "in plaintext"
        }
    );
    println!(
        "{:<20} {:>10} {:>10} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8}",
        "target", "seq 1c", "seq 4c", "4k IOPS", "p50 us", "p99 us", "FUA IOPS", "p50 us", "p99 us"
    );
    for t in [&r.qemu_nbd, &r.haven_1_replica, &r.haven_2_replicas] {
        println!(
            "{:<20} {:>7.0}MB/s {:>7.0}MB/s | {} | {}",
            t.name,
            t.seq_write_1conn_mb_s,
            t.seq_write_4conn_mb_s,
            lat(&t.write_4k_qd1),
            lat(&t.write_4k_qd1_fua)
        );
    }
    println!(
        "{:<20} {:>7.0}MB/s {:>7.0}MB/s   (nbdcopy into two qemu-nbd exports at once, per export)",
        "2-export ceiling", r.two_exports_ceiling_1conn_mb_s, r.two_exports_ceiling_4conn_mb_s
    );
    println!(
        "ratios: 1 replica / qemu-nbd = {:.2} (1c), {:.2} (4c); 2 replicas / ceiling = {:.2} (1c), {:.2} (4c)",
        r.ratio_1_replica_vs_qemu_nbd_1conn,
        r.ratio_1_replica_vs_qemu_nbd_4conn,
        r.ratio_2_replicas_vs_ceiling_1conn,
        r.ratio_2_replicas_vs_ceiling_4conn
    );
    println!(
        "2 replicas / qemu-nbd: seq write {:.2} (1c); 4k FUA IOPS {:.2}, p50 latency {:.2}",
        r.ratio_2_replicas_vs_qemu_nbd_1conn,
        r.ratio_2_replicas_vs_qemu_nbd_fua_iops,
        r.ratio_2_replicas_vs_qemu_nbd_fua_p50
    );
    println!(
        "FUA p50 with 2 replicas {:.1} us; budget (qemu-nbd FUA p50 + RTT) x 1.1 = {:.1} us: {}",
        r.haven_2_replicas.write_4k_qd1_fua.p50_us,
        r.fua_latency_budget_us,
        if r.fua_latency_within_budget {
            "within"
        } else {
            "over"
        }
    );
    Ok(())
}

/// A throwaway cluster CA and node certificates for the benchmark's replicas, the same
/// kind the daemon's replicas use.
fn issue_bench_certs(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    let ca = haven_net::ClusterCa::generate("bench")?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("ca.pem", ca.cert_pem())?;
    for n in names {
        let issued = ca.issue(n, haven_net::CertRole::Node)?;
        write(&format!("{n}.pem"), &issued.cert_pem)?;
        write(&format!("{n}-key.pem"), &issued.key_pem)?;
    }
    Ok(())
}

fn ctl(a: &CtlArgs, req: ControlRequest) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = rt.block_on(control::request(&a.control, &req))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Text status in the spirit of `drbdadm status`.
fn render(s: &Status) -> String {
    let mut out = format!(
        "{} node:{} role:{:?} disk:{:?} epoch:{} gen:{}{}\n",
        s.volume,
        s.node,
        s.role,
        s.disk,
        s.epoch,
        s.generation,
        if s.crashed_primary {
            " crashed-primary"
        } else {
            ""
        }
    );
    for f in &s.frozen {
        out.push_str(&format!(
            "  I/O frozen: peer {} lost at generation {}, not yet recorded outdated{} \
             ({} requests waiting)\n",
            f.peer,
            f.generation,
            if f.expired {
                "; freeze timeout passed, requests fail"
            } else {
                ""
            },
            s.frozen_requests
        ));
    }
    for p in &s.peers {
        out.push_str(&format!("  {} connection:{:?}", p.node, p.connection));
        if let Some(r) = p.role {
            out.push_str(&format!(" role:{r:?}"));
        }
        if let Some(d) = p.disk {
            out.push_str(&format!(" peer-disk:{d:?}"));
        }
        if let Some(r) = p.replication {
            out.push_str(&format!(" replication:{r:?}"));
        }
        out.push_str(&format!(" out-of-sync:{}", p.out_of_sync_bytes));
        if let Some(r) = &p.resync {
            out.push_str(&format!(" done:{}", r.done_bytes));
            if r.total_bytes > 0 {
                out.push_str(&format!(
                    "/{} ({:.1}%)",
                    r.total_bytes,
                    100.0 * r.done_bytes as f64 / r.total_bytes as f64
                ));
            }
            out.push_str(&format!(" rate:{}B/s", r.rate_bytes_per_s));
            if let Some(eta) = r.eta_s {
                out.push_str(&format!(" eta:{eta}s"));
            }
        }
        if p.split_brain {
            out.push_str(" split-brain");
        }
        if let Some(e) = &p.last_error {
            out.push_str(&format!(" last-error:\"{e}\""));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_peers_parse_with_clear_errors() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").unwrap_err().contains("not a size"));
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(
            parse_peer("b=127.0.0.1:7000"),
            Ok(("b".into(), "127.0.0.1:7000".parse().unwrap()))
        );
        assert!(
            parse_peer("127.0.0.1:7000")
                .unwrap_err()
                .contains("NAME=ADDR")
        );
    }
}
