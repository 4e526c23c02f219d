//! `haven bench volume`: Haven volumes beside unreplicated `qemu-nbd` in one run.
//!
//! Replicas replicate over mutual TLS with cluster certificates, as the daemon runs
//! them (`--plaintext` measures the replication protocol alone).
//!
//! Sequential write throughput is measured with `nbdcopy` (libnbd-bin) from a tmpfs file;
//! 4 KiB writes at queue depth 1 (plain and FUA) with a small NBD client here, so each
//! request's latency is known. Two replicas on one machine compete for the same two
//! cores, so they are judged against the "two exports" ceiling: `nbdcopy` into two
//! `qemu-nbd` exports at once, measured in the same run.

use crate::proto;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{0} did not become ready within 60 s")]
    NotReady(String),
    #[error("NBD client: {0}")]
    Client(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Writes a cluster CA (`ca.pem`) and a node certificate and key (`NAME.pem`,
/// `NAME-key.pem`) for each name into the directory: the caller owns the PKI code.
pub type IssueCerts = Arc<dyn Fn(&Path, &[String]) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct BenchOpts {
    /// The `haven` executable that serves replicas.
    pub haven: PathBuf,
    /// Bytes copied per sequential-write round (also the volume size).
    pub size: u64,
    pub rounds: u32,
    /// 4 KiB writes per latency round.
    pub small_writes: u32,
    /// Scratch directory (tmpfs recommended); a fresh subdirectory is used and removed.
    pub scratch: PathBuf,
    /// Replicate over mutual TLS with certificates from this; `None` is plaintext.
    pub tls: Option<IssueCerts>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// MB/s (10^6 bytes) with one and with four NBD connections, medians over rounds.
    pub seq_write_1conn_mb_s: f64,
    pub seq_write_4conn_mb_s: f64,
    pub write_4k_qd1: Latency,
    pub write_4k_qd1_fua: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub size: u64,
    pub rounds: u32,
    /// Whether the replicas replicated over mutual TLS.
    pub tls: bool,
    pub loopback_rtt_p50_us: f64,
    pub qemu_nbd: Target,
    pub haven_1_replica: Target,
    pub haven_2_replicas: Target,
    /// nbdcopy into two qemu-nbd exports at once: what two replicas can reach here.
    pub two_exports_ceiling_1conn_mb_s: f64,
    pub two_exports_ceiling_4conn_mb_s: f64,
    pub ratio_1_replica_vs_qemu_nbd_1conn: f64,
    pub ratio_1_replica_vs_qemu_nbd_4conn: f64,
    pub ratio_2_replicas_vs_ceiling_1conn: f64,
    pub ratio_2_replicas_vs_ceiling_4conn: f64,
    /// Two replicas against one unreplicated qemu-nbd export: sequential write
    /// throughput (1 connection), and 4 KiB FUA writes at queue depth 1 (IOPS, p50).
    pub ratio_2_replicas_vs_qemu_nbd_1conn: f64,
    pub ratio_2_replicas_vs_qemu_nbd_fua_iops: f64,
    pub ratio_2_replicas_vs_qemu_nbd_fua_p50: f64,
    /// Goal: 2-replica FUA p50 ≤ (qemu-nbd FUA p50 + loopback RTT) × 1.1.
    pub fua_latency_budget_us: f64,
    pub fua_latency_within_budget: bool,
}

/// Kills and reaps a child on drop, so a failed run leaves no process behind.
struct Proc(Child, String);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Result<Proc, BenchError> {
    let c = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io(format!("starting {what}")))?;
    Ok(Proc(c, what.to_owned()))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), BenchError> {
    let mut p = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {what}")))?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(st) = p.try_wait().map_err(io(what.to_owned()))? {
            if st.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = p.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(BenchError::Tool {
                what: what.into(),
                detail: format!("{st}: {}", err.trim()),
            });
        }
        if Instant::now() > deadline {
            let _ = p.kill();
            let _ = p.wait();
            return Err(BenchError::Tool {
                what: what.into(),
                detail: "timed out".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_socket(path: &Path, what: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BenchError::NotReady(what.into()))
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free loopback port"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A minimal blocking NBD client for queue-depth-1 latency measurement.
struct Client(UnixStream);

impl Client {
    fn connect(path: &Path) -> Result<Client, BenchError> {
        let e = |m: &str| BenchError::Client(m.to_owned());
        let mut s = UnixStream::connect(path).map_err(io("connecting the NBD client"))?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).map_err(io("NBD greeting"))?;
        if greet[..8] != proto::INIT_MAGIC.to_be_bytes() {
            return Err(e("server did not greet with NBDMAGIC"));
        }
        let mut out = (proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
        out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        out.extend_from_slice(&6u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // empty name: the default export
        out.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&out).map_err(io("NBD_OPT_GO"))?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(io("NBD option reply"))?;
            let typ = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            if len > 1 << 16 {
                return Err(BenchError::Client(format!("option reply of {len} bytes")));
            }
            let mut skip = vec![0u8; len as usize];
            s.read_exact(&mut skip).map_err(io("NBD option reply"))?;
            match typ {
                proto::REP_ACK => return Ok(Client(s)),
                proto::REP_INFO => {}
                t => return Err(BenchError::Client(format!("NBD_OPT_GO refused ({t:#x})"))),
            }
        }
    }

    fn write(
        &mut self,
        req: &mut Vec<u8>,
        off: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), BenchError> {
        req.clear();
        req.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&(if fua { proto::CMD_FLAG_FUA } else { 0 }).to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&off.to_be_bytes());
        req.extend_from_slice(&off.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.0.write_all(req).map_err(io("NBD write"))?;
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).map_err(io("NBD reply"))?;
        let err = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        if err != 0 {
            return Err(BenchError::Client(format!(
                "write at {off} failed: error {err}"
            )));
        }
        Ok(())
    }
}

fn small_writes(sock: &Path, n: u32, size: u64, fua: bool) -> Result<Latency, BenchError> {
    let mut c = Client::connect(sock)?;
    let data = [0x5au8; 4096];
    let mut req = Vec::with_capacity(4096 + 28);
    let mut lat = Vec::with_capacity(n as usize);
    let blocks = (size / 4096).max(1);
    let start = Instant::now();
    for i in 0..u64::from(n) {
        // A stride keeps writes spread over the volume rather than one hot block.
        let off = ((i * 97) % blocks) * 4096;
        let t = Instant::now();
        c.write(&mut req, off, &data, fua)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Latency {
        iops: f64::from(n) / total.max(1e-9),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
    })
}

fn loopback_rtt() -> Result<f64, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the RTT probe"))?;
    let addr = l.local_addr().map_err(io("RTT probe address"))?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr).map_err(io("connecting the RTT probe"))?;
    s.set_nodelay(true).map_err(io("RTT probe"))?;
    let mut v = Vec::with_capacity(2000);
    let mut b = [0u8; 1];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&b).map_err(io("RTT probe"))?;
        s.read_exact(&mut b).map_err(io("RTT probe"))?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    let _ = echo.join();
    Ok(median(v))
}

fn seq_write(src: &Path, uris: &[String], conns: u32) -> Result<f64, BenchError> {
    let size = std::fs::metadata(src).map_err(io("source file"))?.len();
    let start = Instant::now();
    let mut kids = Vec::new();
    for u in uris {
        let mut c = Command::new("nbdcopy");
        c.arg(format!("--connections={conns}"))
            .arg("--flush")
            .arg(src)
            .arg(u);
        kids.push((c, u.clone()));
    }
    // Start all copies together, then wait for all.
    let mut running = Vec::new();
    for (mut c, u) in kids {
        let p = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting nbdcopy (Debian package libnbd-bin)"))?;
        running.push((Proc(p, u), ()));
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    for (p, _) in &mut running {
        loop {
            if let Some(st) = p.0.try_wait().map_err(io("nbdcopy"))? {
                if !st.success() {
                    let mut err = String::new();
                    if let Some(mut e) = p.0.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(BenchError::Tool {
                        what: format!("nbdcopy into {}", p.1),
                        detail: format!("{st}: {}", err.trim()),
                    });
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Tool {
                    what: format!("nbdcopy into {}", p.1),
                    detail: "timed out".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((size * uris.len() as u64) as f64 / secs / 1e6 / uris.len() as f64)
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu_nbd(dir: &Path, name: &str, size: u64) -> Result<(Proc, PathBuf), BenchError> {
    let file = dir.join(format!("{name}.raw"));
    let f = std::fs::File::create(&file).map_err(io(format!("creating {}", file.display())))?;
    f.set_len(size).map_err(io("sizing the qemu-nbd file"))?;
    let sock = dir.join(format!("{name}.sock"));
    let p = spawn(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "--shared=8", "--cache=writeback", "-k"])
            .arg(&sock)
            .arg(&file),
        "qemu-nbd (Debian package qemu-utils)",
    )?;
    wait_socket(&sock, "qemu-nbd")?;
    Ok((p, sock))
}

/// Starts a Haven volume of `replicas` replicas; returns their processes and the
/// primary's NBD socket.
fn haven(
    opts: &BenchOpts,
    dir: &Path,
    tag: &str,
    replicas: usize,
) -> Result<(Vec<Proc>, PathBuf), BenchError> {
    let names: Vec<String> = (0..replicas).map(|i| format!("{tag}{i}")).collect();
    let ports: Vec<u16> = (0..replicas)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let tls_dir = dir.join(format!("{tag}-tls"));
    if let Some(issue) = &opts.tls {
        std::fs::create_dir_all(&tls_dir).map_err(io(format!("creating {}", tls_dir.display())))?;
        issue(&tls_dir, &names).map_err(|detail| BenchError::Tool {
            what: "issuing the replicas' certificates".into(),
            detail,
        })?;
    }
    let mut procs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let d = dir.join(n);
        let mut c = Command::new(&opts.haven);
        c.args(["volume", "create", "--volume", "bench", "--node", n])
            .arg("--dir")
            .arg(&d)
            .args(["--size", &opts.size.to_string()]);
        if i == 0 {
            c.arg("--initial");
        }
        run(&mut c, "haven volume create")?;
        let mut c = Command::new(&opts.haven);
        c.args(["volume", "serve", "--dir"])
            .arg(&d)
            .arg("--nbd")
            .arg(dir.join(format!("{n}.nbd")))
            .arg("--control")
            .arg(dir.join(format!("{n}.ctl")))
            .args(["--listen", &format!("127.0.0.1:{}", ports[i])]);
        if opts.tls.is_some() {
            c.arg("--tls-ca")
                .arg(tls_dir.join("ca.pem"))
                .arg("--tls-cert")
                .arg(tls_dir.join(format!("{n}.pem")))
                .arg("--tls-key")
                .arg(tls_dir.join(format!("{n}-key.pem")));
        } else {
            c.arg("--plaintext");
        }
        for (j, m) in names.iter().enumerate() {
            if j != i {
                c.args(["--peer", &format!("{m}=127.0.0.1:{}", ports[j])]);
            }
        }
        procs.push(spawn(&mut c, "haven volume serve")?);
        wait_socket(&dir.join(format!("{n}.ctl")), "haven volume serve")?;
    }
    // Wait for the initial full sync (status shows every peer Established), then
    // promote the first replica.
    let ctl = dir.join(format!("{}.ctl", names[0]));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("async runtime"))?;
    loop {
        let st = rt.block_on(crate::control::request(
            &ctl,
            &crate::control::ControlRequest::Status,
        ));
        if let Ok(st) = st
            && st.peers.iter().all(|p| {
                p.replication == Some(crate::volume::Replication::Established)
                    && p.disk == Some(crate::meta::DiskState::UpToDate)
            })
        {
            let r = rt.block_on(crate::control::request(
                &ctl,
                &crate::control::ControlRequest::Promote {
                    peer_fenced: vec![],
                },
            ));
            r.map_err(|e| BenchError::Tool {
                what: "promote".into(),
                detail: e.to_string(),
            })?;
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::NotReady("replica sync".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((procs, dir.join(format!("{}.nbd", names[0]))))
}

fn measure(opts: &BenchOpts, name: &str, src: &Path, sock: &Path) -> Result<Target, BenchError> {
    let mut s1 = Vec::new();
    let mut s4 = Vec::new();
    let mut plain = Vec::new();
    let mut fua = Vec::new();
    for _ in 0..opts.rounds {
        s1.push(seq_write(src, &[uri(sock)], 1)?);
        s4.push(seq_write(src, &[uri(sock)], 4)?);
        plain.push(small_writes(sock, opts.small_writes, opts.size, false)?);
        fua.push(small_writes(sock, opts.small_writes, opts.size, true)?);
    }
    let pick = |v: Vec<Latency>| Latency {
        iops: median(v.iter().map(|l| l.iops).collect()),
        p50_us: median(v.iter().map(|l| l.p50_us).collect()),
        p99_us: median(v.iter().map(|l| l.p99_us).collect()),
    };
    Ok(Target {
        name: name.into(),
        seq_write_1conn_mb_s: median(s1),
        seq_write_4conn_mb_s: median(s4),
        write_4k_qd1: pick(plain),
        write_4k_qd1_fua: pick(fua),
    })
}

pub fn bench_volume(opts: &BenchOpts) -> Result<BenchReport, BenchError> {
    let dir = opts
        .scratch
        .join(format!("haven-volume-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let _cleanup = Scratch(dir.clone());

    let src = dir.join("src.bin");
    {
        let mut f = std::fs::File::create(&src).map_err(io("creating the source file"))?;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = opts.size;
        while left > 0 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
            }
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])
                .map_err(io("writing the source file"))?;
            left -= n as u64;
        }
    }
    let rtt = loopback_rtt()?;

    let qemu = {
        let (_p, sock) = qemu_nbd(&dir, "q", opts.size)?;
        measure(opts, "qemu-nbd", &src, &sock)?
    };
    let (c1, c4) = {
        let (_p1, s1) = qemu_nbd(&dir, "c1", opts.size)?;
        let (_p2, s2) = qemu_nbd(&dir, "c2", opts.size)?;
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..opts.rounds {
            a.push(seq_write(&src, &[uri(&s1), uri(&s2)], 1)?);
            b.push(seq_write(&src, &[uri(&s1), uri(&s2)], 4)?);
        }
        (median(a), median(b))
    };
    let one = {
        let (_p, sock) = haven(opts, &dir, "h", 1)?;
        measure(opts, "haven, 1 replica", &src, &sock)?
    };
    let two = {
        let (_p, sock) = haven(opts, &dir, "r", 2)?;
        measure(opts, "haven, 2 replicas", &src, &sock)?
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let budget = (qemu.write_4k_qd1_fua.p50_us + rtt) * 1.1;
    Ok(BenchReport {
        size: opts.size,
        rounds: opts.rounds,
        tls: opts.tls.is_some(),
        ratio_2_replicas_vs_qemu_nbd_1conn: ratio(
            two.seq_write_1conn_mb_s,
            qemu.seq_write_1conn_mb_s,
        ),
        ratio_2_replicas_vs_qemu_nbd_fua_iops: ratio(
            two.write_4k_qd1_fua.iops,
            qemu.write_4k_qd1_fua.iops,
        ),
        ratio_2_replicas_vs_qemu_nbd_fua_p50: ratio(
            two.write_4k_qd1_fua.p50_us,
            qemu.write_4k_qd1_fua.p50_us,
        ),
        loopback_rtt_p50_us: rtt,
        ratio_1_replica_vs_qemu_nbd_1conn: ratio(
            one.seq_write_1conn_mb_s,
            qemu.seq_write_1conn_mb_s,
        ),
        ratio_1_replica_vs_qemu_nbd_4conn: ratio(
            one.seq_write_4conn_mb_s,
            qemu.seq_write_4conn_mb_s,
        ),
        ratio_2_replicas_vs_ceiling_1conn: ratio(two.seq_write_1conn_mb_s, c1),
        ratio_2_replicas_vs_ceiling_4conn: ratio(two.seq_write_4conn_mb_s, c4),
        fua_latency_budget_us: budget,
        fua_latency_within_budget: two.write_4k_qd1_fua.p50_us <= budget,
        two_exports_ceiling_1conn_mb_s: c1,
        two_exports_ceiling_4conn_mb_s: c4,
        qemu_nbd: qemu,
        haven_1_replica: one,
        haven_2_replicas: two,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
