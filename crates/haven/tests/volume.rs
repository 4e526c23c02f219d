//! Replicated volumes with real processes: `haven volume serve` replicas on loopback,
//! driven by real NBD clients (`qemu-io`, `qemu-img`, `nbdinfo`, `nbdcopy` — Debian's
//! qemu-utils and libnbd-bin) and by the `haven volume` CLI. Every wait is bounded.

use serde_json::Value;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const SIZE: u64 = 16 << 20;
const REGION: u64 = 65536;
const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Runs a command to completion, killing it if it outlives `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The cluster CA of a test (in `tmp`, made on first use) and a node certificate for
/// `name` under it: the flags that make `haven volume serve` replicate over mutual TLS.
fn tls_args(tmp: &Path, ca_name: &str, name: &str) -> Vec<String> {
    let ca_dir = tmp.join(format!("ca-{ca_name}"));
    let (ca_pem, ca_key) = (ca_dir.join("ca.pem"), ca_dir.join("ca-key.pem"));
    let ca = if ca_pem.is_file() {
        haven_net::ClusterCa::from_pem(
            ca_name,
            std::fs::read_to_string(&ca_pem).unwrap(),
            std::fs::read_to_string(&ca_key).unwrap(),
            "ca-key.pem",
        )
        .expect("reload the test CA")
    } else {
        let ca = haven_net::ClusterCa::generate(ca_name).expect("a test CA");
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        std::fs::write(&ca_key, ca.key_pem()).unwrap();
        ca
    };
    let issued = ca
        .issue(name, haven_net::ca::CertRole::Node)
        .expect("a node certificate");
    let cert = ca_dir.join(format!("{name}.pem"));
    let key = ca_dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    vec![
        "--tls-ca".into(),
        p(&ca_pem),
        "--tls-cert".into(),
        p(&cert),
        "--tls-key".into(),
        p(&key),
    ]
}

struct Node {
    name: String,
    tls: Vec<String>,
    dir: PathBuf,
    nbd: PathBuf,
    ctl: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn create(tmp: &Path, name: &str, initial: bool) -> Node {
        let dir = tmp.join(name);
        let mut c = Command::new(HAVEN);
        c.args(["volume", "create", "--volume", "vol", "--node", name])
            .arg("--dir")
            .arg(&dir)
            .args(["--size", &SIZE.to_string(), "--region-size", "64K"]);
        if initial {
            c.arg("--initial");
        }
        let o = run_bounded(&mut c, WAIT);
        assert!(o.status.success(), "create {name}: {}", text(&o));
        Node {
            name: name.into(),
            tls: tls_args(tmp, "lab", name),
            nbd: tmp.join(format!("{name}.nbd")),
            ctl: tmp.join(format!("{name}.ctl")),
            dir,
            port: free_port(),
            child: None,
        }
    }

    fn start(&mut self, peers: &[(&str, u16)], extra: &[&str]) {
        assert!(self.child.is_none());
        let mut c = Command::new(HAVEN);
        c.args(["volume", "serve", "--dir"])
            .arg(&self.dir)
            .arg("--nbd")
            .arg(&self.nbd)
            .arg("--control")
            .arg(&self.ctl)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if !extra
            .iter()
            .any(|a| *a == "--plaintext" || *a == "--tls-ca")
        {
            c.args(&self.tls);
        }
        for (n, p) in peers {
            c.args(["--peer", &format!("{n}=127.0.0.1:{p}")]);
        }
        self.child = Some(c.spawn().expect("spawning haven volume serve"));
        self.wait_for("control socket", |_| true);
    }

    fn peer(&self) -> (&str, u16) {
        (&self.name, self.port)
    }

    /// SIGKILL: the process dies with no chance to flush or save anything.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.nbd);
        let _ = std::fs::remove_file(&self.ctl);
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new(HAVEN);
        c.arg("volume")
            .arg(args[0])
            .arg("--control")
            .arg(&self.ctl)
            .args(&args[1..]);
        run_bounded(&mut c, WAIT)
    }

    fn ok(&self, args: &[&str]) -> Output {
        let o = self.ctl(args);
        assert!(o.status.success(), "{} {args:?}: {}", self.name, text(&o));
        o
    }

    fn status(&self) -> Option<Value> {
        let o = self.ctl(&["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{}: timed out waiting for {what}; last status: {last:#?}",
            self.name
        );
    }

    fn peer_status(s: &Value, peer: &str) -> Value {
        s["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["node"] == peer))
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn wait_in_sync(&self, peer: &str) -> Value {
        self.wait_for(&format!("in sync with {peer}"), |s| {
            let p = Node::peer_status(s, peer);
            s["disk"] == "UpToDate"
                && p["connection"] == "Connected"
                && p["replication"] == "Established"
                && p["disk"] == "UpToDate"
                && p["out_of_sync_bytes"] == 0
        })
    }

    fn data(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("data.img")).expect("reading a backing file")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///vol?socket={}", self.nbd.display())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run_bounded(&mut c, WAIT)
}

fn qemu_io_ok(uri: &str, cmds: &[String]) -> String {
    let o = qemu_io(uri, cmds);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {}",
        text(&o)
    );
    out
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn assert_identical(a: &Node, b: &Node) {
    let (x, y) = (a.data(), b.data());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "replicas {} and {} differ first at byte {i} (region {})",
            a.name,
            b.name,
            i as u64 / REGION
        );
    }
}

/// A pair: `a` initial and primary, `b` fully synced from it.
fn pair(tmp: &Path, extra: &[&str]) -> (Node, Node) {
    let mut a = Node::create(tmp, "a", true);
    let mut b = Node::create(tmp, "b", false);
    a.start(&[b.peer()], extra);
    b.start(&[a.peer()], extra);
    a.wait_in_sync("b");
    a.ok(&["promote"]);
    (a, b)
}

#[test]
fn volume_real_clients_read_back_what_they_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let tcp = free_port();
    a.start(&[], &["--nbd-tcp", &format!("127.0.0.1:{tcp}")]);
    // A secondary serves no I/O.
    let o = qemu_io(&a.uri(), &[s("write -P 0x11 0 4k")]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Operation not permitted"),
        "{}",
        text(&o)
    );
    a.ok(&["promote"]);

    qemu_io_ok(
        &a.uri(),
        &[
            s("write -P 0xab 0 1M"),
            s("write -f -P 0xcd 1M 4k"),
            s("write -z 2M 64k"),
            s("discard 3M 64k"),
            s("write -P 0x5a 5246975 3"),
            s("flush"),
            s("read -P 0xab 0 1M"),
            s("read -P 0xcd 1M 4k"),
            s("read -P 0 2M 64k"),
            s("read -P 0 3M 64k"),
            s("read -P 0x5a 5246975 3"),
        ],
    );
    // Out of range is an error, not a crash.
    let o = qemu_io(&a.uri(), &[format!("read 0 {}", SIZE + 4096)]);
    assert!(!o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"));
    // The same data over TCP.
    qemu_io_ok(
        &format!("nbd://127.0.0.1:{tcp}/vol"),
        &[s("read -P 0xcd 1M 4k")],
    );

    let o = run_bounded(
        Command::new("qemu-img").args(["info", "--output=json", &a.uri()]),
        WAIT,
    );
    let info: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(info["virtual-size"], SIZE, "{}", text(&o));

    let o = run_bounded(Command::new("nbdinfo").args(["--json", &a.uri()]), WAIT);
    let info: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE, "{}", text(&o));
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_multi_conn"], true);
    let o = run_bounded(
        Command::new("nbdinfo")
            .args(["--list", &format!("nbd+unix://?socket={}", a.nbd.display())]),
        WAIT,
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("export=\"vol\""),
        "{}",
        text(&o)
    );
    // An unknown export is refused cleanly.
    let o = run_bounded(
        Command::new("nbdinfo").arg(format!("nbd+unix:///nope?socket={}", a.nbd.display())),
        WAIT,
    );
    assert!(!o.status.success(), "{}", text(&o));

    // nbdcopy with several connections and requests in flight, in and out.
    let src = tmp.path().join("src.bin");
    let mut rnd = vec![0u8; SIZE as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in rnd.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&src, &rnd).unwrap();
    let o = run_bounded(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&src)
            .arg(a.uri()),
        WAIT,
    );
    assert!(o.status.success(), "nbdcopy in: {}", text(&o));
    let back = tmp.path().join("back.bin");
    let o = run_bounded(Command::new("nbdcopy").arg(a.uri()).arg(&back), WAIT);
    assert!(o.status.success(), "nbdcopy out: {}", text(&o));
    assert!(
        std::fs::read(&back).unwrap() == rnd,
        "nbdcopy round trip differs"
    );
}

/// Runs a Python snippet in `nbdsh` (libnbd's shell, Debian's python3-libnbd) with `h`
/// a fresh handle; Debian's own Python, where the `nbd` module lives.
fn nbdsh(script: &str) -> Output {
    run_bounded(
        Command::new("nbdsh")
            .env("PATH", "/usr/bin:/bin")
            .args(["-c", script]),
        WAIT,
    )
}

fn nbdsh_ok(script: &str) -> String {
    let o = nbdsh(script);
    assert!(o.status.success(), "nbdsh: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn volume_structured_replies_with_real_clients_and_old_style_ones_too() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    a.start(&[], &[]);
    let uri = a.uri();
    // A secondary's refusal reaches a structured client as an error, with its errno.
    let o = nbdsh(&format!(
        "import nbd\nh.connect_uri({uri:?})\n\
         assert h.get_structured_replies_negotiated()\n\
         try:\n    h.pread(4096, 0)\n    raise SystemExit('a secondary served a read')\n\
         except nbd.Error as e:\n    print('errno', e.errno)\n"
    ));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("errno EPERM"),
        "{}",
        text(&o)
    );
    a.ok(&["promote"]);

    let o = run_bounded(Command::new("nbdinfo").args(["--json", &uri]), WAIT);
    let info: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(info["structured"], true, "{}", text(&o));
    assert_eq!(info["exports"][0]["can_df"], true, "{}", text(&o));

    // qemu negotiates structured replies: its reads of zeroes come back as holes.
    qemu_io_ok(
        &uri,
        &[
            s("write -P 0xab 1M 64k"),
            s("write -z 4M 64k"),
            s("read -P 0xab 1M 64k"),
            s("read -P 0 0 1M"),
            s("read -P 0 4M 64k"),
        ],
    );
    // base:allocation: qemu-img map sees the written extent as data, the rest as zero.
    let o = run_bounded(
        Command::new("qemu-img").args(["map", "--output=json", &uri]),
        WAIT,
    );
    let map: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let extents = map.as_array().cloned().unwrap_or_default();
    assert!(!extents.is_empty(), "{}", text(&o));
    let covering = |at: u64| {
        extents
            .iter()
            .find(|e| {
                let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                (st..st + len).contains(&at)
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(covering(1 << 20)["data"], true, "{map:#}");
    assert_eq!(covering(8 << 20)["zero"], true, "{map:#}");
    assert_eq!(
        extents
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>(),
        SIZE
    );

    // libnbd: fragmented reads (data and hole chunks), DF (one chunk), block status.
    let out = nbdsh_ok(&format!(
        r#"import nbd
h.add_meta_context("base:allocation")
h.connect_uri({uri:?})
assert h.get_structured_replies_negotiated() and h.can_df()
assert h.can_meta_context("base:allocation")
chunks = []
def cb(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
buf = h.pread_structured(2 << 20, 0, cb)
assert buf[:1 << 20] == bytes(1 << 20) and buf[1 << 20:(1 << 20) + 65536] == b"\xab" * 65536
kinds = sorted(set(st for _, _, st in chunks))
assert kinds == [nbd.READ_DATA, nbd.READ_HOLE], chunks
assert sum(n for _, n, _ in chunks) == 2 << 20, chunks
chunks.clear()
assert h.pread_structured(2 << 20, 0, cb, nbd.CMD_FLAG_DF) == buf
assert chunks == [(0, 2 << 20, nbd.READ_DATA)], chunks
ents = []
h.block_status(2 << 20, 0, lambda ctx, off, e, err: ents.extend(e) or 0)
print("extents", ents)
h.pwrite(b"\x22" * 8192, 8 << 20, nbd.CMD_FLAG_FUA)
assert h.pread_structured(8192, 8 << 20, cb, nbd.CMD_FLAG_DF) == b"\x22" * 8192
print("structured ok")
"#
    ));
    assert!(out.contains("structured ok"), "{out}");
    assert!(out.contains("extents [1048576, 3, 65536, 0"), "{out}");

    // An old-style client (no structured replies) reads and writes as before.
    let out = nbdsh_ok(&format!(
        r#"import nbd
h.set_request_structured_replies(False)
h.connect_uri({uri:?})
assert not h.get_structured_replies_negotiated() and not h.can_df()
assert h.pread(65536, 1 << 20) == b"\xab" * 65536
assert h.pread(8192, 8 << 20) == b"\x22" * 8192
h.pwrite(b"\x33" * 4096, 12 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 12 << 20) == b"\x33" * 4096
print("simple ok")
"#
    ));
    assert!(out.contains("simple ok"), "{out}");

    // nbdcopy (structured, sparse-aware) out and back in, byte for byte.
    let back = tmp.path().join("back.bin");
    let o = run_bounded(Command::new("nbdcopy").arg(&uri).arg(&back), WAIT);
    assert!(o.status.success(), "nbdcopy out: {}", text(&o));
    let copy = std::fs::read(&back).unwrap();
    assert!(copy == a.data()[..SIZE as usize], "nbdcopy read differs");
    // qemu-img convert through the structured path into a local file, and compare.
    let conv = tmp.path().join("conv.raw");
    let o = run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&conv),
        WAIT,
    );
    assert!(o.status.success(), "qemu-img convert: {}", text(&o));
    assert!(
        std::fs::read(&conv).unwrap() == copy,
        "qemu-img convert differs"
    );
}

#[test]
fn volume_writes_reach_every_replica_and_new_replicas_get_a_full_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    let mut c = Node::create(tmp.path(), "c", false);
    a.start(&[b.peer(), c.peer()], &[]);
    // b and c do not exist yet: the operator vouches that they hold nothing newer.
    a.ok(&["promote", "--peer-fenced", "b", "--peer-fenced", "c"]);
    // Data written before the others exist must reach them by full sync.
    qemu_io_ok(&a.uri(), &[s("write -P 0x77 8M 1M")]);
    b.start(&[a.peer(), c.peer()], &[]);
    c.start(&[a.peer(), b.peer()], &[]);
    a.wait_in_sync("b");
    a.wait_in_sync("c");
    // A secondary that is Inconsistent-then-synced is UpToDate; status says so.
    let st = b.wait_for("b up to date", |s| s["disk"] == "UpToDate");
    assert_eq!(st["role"], "Secondary");
    qemu_io_ok(
        &a.uri(),
        &[
            s("write -P 0x21 0 64k"),
            s("write -f -P 0x22 100k 8k"),
            s("write -z 8M 4k"),
            s("flush"),
        ],
    );
    assert_identical(&a, &b);
    assert_identical(&a, &c);
    // Promotion of b is refused while a is primary and connected.
    let o = b.ctl(&["promote"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("primary"),
        "{}",
        text(&o)
    );
}

#[test]
fn volume_reconnect_resyncs_only_dirty_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &[]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x01 0 4M")]);
    a.ok(&["disconnect", "--peer", "b"]);
    a.wait_for("b disconnected", |s| {
        Node::peer_status(s, "b")["connection"] == "StandAlone"
    });
    // Three regions change while b is away (one write spans two regions).
    qemu_io_ok(
        &a.uri(),
        &[s("write -P 0x02 128k 4k"), s("write -P 0x03 1020k 8k")],
    );
    let st = a.status().unwrap();
    assert_eq!(Node::peer_status(&st, "b")["out_of_sync_bytes"], 3 * REGION);
    let before = Node::peer_status(&st, "b")["resynced_bytes_total"]
        .as_u64()
        .unwrap();
    a.ok(&["connect", "--peer", "b"]);
    let st = a.wait_in_sync("b");
    let resynced = Node::peer_status(&st, "b")["resynced_bytes_total"]
        .as_u64()
        .unwrap()
        - before;
    assert_eq!(resynced, 3 * REGION, "only the dirty regions are resynced");
    qemu_io_ok(&a.uri(), &[s("flush")]);
    assert_identical(&a, &b);
}

#[test]
fn volume_killed_primary_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(tmp.path(), &[]);
    const N: u64 = SIZE / 4096;
    let cmds: Vec<String> = (0..N)
        .map(|i| format!("write -P {} {} 4k", i % 250 + 1, i * 4096))
        .collect();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in &cmds {
        c.args(["-c", cmd]);
    }
    c.arg(a.uri());
    let writer = std::thread::spawn(move || run_bounded(&mut c, Duration::from_secs(300)));
    // Kill the primary once the secondary has seen a good part of the stream.
    let probe = 200 * 4096;
    let deadline = Instant::now() + WAIT;
    let bf = std::fs::File::open(b.dir.join("data.img")).unwrap();
    loop {
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&bf, &mut byte, probe).unwrap();
        if byte[0] != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write stream never reached b"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    a.kill();
    let out = writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 4096/4096 bytes at offset "))
        .filter_map(|o| o.trim().parse().ok())
        .collect();
    assert!(
        acked.len() >= 200,
        "too few acknowledged writes: {}",
        acked.len()
    );
    assert!(
        (acked.len() as u64) < N,
        "the primary died before the stream ended"
    );

    // Without the cluster's word that a is fenced, b must not be promoted.
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    let o = b.ctl(&["promote"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("fenced"),
        "{}",
        text(&o)
    );
    b.ok(&["promote", "--peer-fenced", "a"]);
    let out = tmp.path().join("b.bin");
    let o = run_bounded(Command::new("nbdcopy").arg(b.uri()).arg(&out), WAIT);
    assert!(o.status.success(), "{}", text(&o));
    let data = std::fs::read(&out).unwrap();
    for off in &acked {
        let i = off / 4096;
        let want = (i % 250 + 1) as u8;
        let block = &data[*off as usize..*off as usize + 4096];
        assert!(
            block.iter().all(|x| *x == want),
            "acknowledged write {i} at offset {off} is missing on the promoted replica"
        );
    }
}

/// Splits `a` (primary) from `b`, lets each side write while primary on its own, and
/// leaves both secondary and disconnected. Returns the pair.
fn split_brain(tmp: &Path, policy: &str, a_writes: &[String], b_writes: &[String]) -> (Node, Node) {
    let (a, b) = pair(tmp, &["--after-sb", policy]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x10 0 1M")]);
    a.ok(&["disconnect", "--peer", "b"]);
    b.ok(&["disconnect", "--peer", "a"]);
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    if !a_writes.is_empty() {
        qemu_io_ok(&a.uri(), a_writes);
    }
    a.ok(&["demote"]);
    b.ok(&["promote", "--peer-fenced", "a"]);
    if !b_writes.is_empty() {
        qemu_io_ok(&b.uri(), b_writes);
    }
    b.ok(&["demote"]);
    (a, b)
}

fn reconnect(a: &Node, b: &Node) {
    a.ok(&["connect", "--peer", "b"]);
    b.ok(&["connect", "--peer", "a"]);
}

#[test]
fn volume_split_brain_disconnect_policy_waits_for_manual_resolution() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = split_brain(
        tmp.path(),
        "disconnect",
        &[s("write -P 0xaa 2M 4k")],
        &[s("write -P 0xbb 3M 4k")],
    );
    reconnect(&a, &b);
    for n in [&a, &b] {
        let other = if n.name == "a" { "b" } else { "a" };
        n.wait_for("split brain detected", |s| {
            let p = Node::peer_status(s, other);
            p["split_brain"] == true && p["connection"] == "StandAlone"
        });
    }
    // The operator discards a's changes.
    a.ok(&["resolve", "--peer", "b", "--discard", "a"]);
    b.ok(&["connect", "--peer", "a"]);
    b.wait_in_sync("a");
    a.wait_for("a up to date", |s| s["disk"] == "UpToDate");
    assert_identical(&a, &b);
    let d = a.data();
    assert_eq!(d[3 << 20], 0xbb, "b's change survives");
    assert_eq!(d[2 << 20], 0, "a's change is discarded");
}

#[test]
fn volume_split_brain_automatic_policies() {
    // (policy, a's writes, b's writes, the side that should survive)
    let cases: [(&str, Vec<String>, Vec<String>, &str); 3] = [
        (
            "discard-zero-changes",
            vec![],
            vec![s("write -P 0xbb 3M 4k")],
            "b",
        ),
        (
            "discard-least-changes",
            vec![s("write -P 0xaa 2M 4k"), s("write -P 0xaa 5M 4k")],
            vec![s("write -P 0xbb 3M 4k")],
            "a",
        ),
        (
            // b was promoted after a, so b's changes go.
            "discard-younger-primary",
            vec![s("write -P 0xaa 2M 4k")],
            vec![s("write -P 0xbb 3M 4k"), s("write -P 0xbb 6M 4k")],
            "a",
        ),
    ];
    for (policy, aw, bw, survivor) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = split_brain(tmp.path(), policy, &aw, &bw);
        reconnect(&a, &b);
        let (win, lose) = if survivor == "a" { (&a, &b) } else { (&b, &a) };
        win.wait_in_sync(&lose.name);
        lose.wait_for("loser up to date", |s| s["disk"] == "UpToDate");
        assert_identical(&a, &b);
        let d = a.data();
        let (won, lost) = if survivor == "a" {
            (&aw, &bw)
        } else {
            (&bw, &aw)
        };
        let byte = |w: &String| {
            let parts: Vec<&str> = w.split_whitespace().collect();
            let off: u64 = parts[3].trim_end_matches('M').parse::<u64>().unwrap() << 20;
            (
                off,
                u8::from_str_radix(parts[2].trim_start_matches("0x"), 16).unwrap(),
            )
        };
        for w in won {
            let (off, v) = byte(w);
            assert_eq!(
                d[off as usize], v,
                "{policy}: surviving change at {off} lost"
            );
        }
        for w in lost {
            let (off, _) = byte(w);
            assert_eq!(
                d[off as usize], 0,
                "{policy}: discarded change at {off} kept"
            );
        }
    }
}

#[test]
fn volume_deposed_primary_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &[]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x10 0 1M")]);
    // A partition: each side stops talking to the other; a stays primary.
    a.ok(&["disconnect", "--peer", "b"]);
    b.ok(&["disconnect", "--peer", "a"]);
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    qemu_io_ok(&b.uri(), &[s("write -P 0xbb 3M 4k")]);
    // The old primary still takes writes locally while alone...
    qemu_io_ok(&a.uri(), &[s("write -P 0xaa 3M 4k")]);
    reconnect(&a, &b);
    // ...but on contact it learns the newer epoch: it is demoted and outdated, and b
    // keeps its data.
    let st = a.wait_for("a deposed", |s| {
        s["role"] == "Secondary" && s["disk"] == "Outdated"
    });
    assert!(st["epoch"].as_u64().unwrap() >= 2);
    let o = qemu_io(&a.uri(), &[s("write -P 0xcc 3M 4k")]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Operation not permitted"),
        "{}",
        text(&o)
    );
    let sb = b.status().unwrap();
    assert_eq!(sb["role"], "Primary");
    assert_eq!(b.data()[3 << 20], 0xbb);
    // An Outdated replica cannot be promoted.
    let o = a.ctl(&["promote", "--peer-fenced", "b"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Outdated"),
        "{}",
        text(&o)
    );
}

#[test]
fn volume_resync_progress_is_visible_and_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--resync-rate", "4M"]);
    a.ok(&["disconnect", "--peer", "b"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x42 4M 8M")]);
    a.ok(&["connect", "--peer", "b"]);
    let st = a.wait_for("resync under way", |s| {
        let r = &Node::peer_status(s, "b")["resync"];
        r["done_bytes"]
            .as_u64()
            .is_some_and(|d| d > 0 && d < 8 << 20)
    });
    let p = Node::peer_status(&st, "b");
    assert_eq!(p["replication"], "SyncSource");
    assert_eq!(p["resync"]["total_bytes"], 8u64 << 20);
    assert!(p["resync"]["eta_s"].is_u64(), "{p:#}");
    let o = a.ok(&["status"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("replication:SyncSource"),
        "{}",
        text(&o)
    );
    let sb = b.status().unwrap();
    assert_eq!(
        sb["disk"], "Inconsistent",
        "a sync target is not up to date"
    );
    a.wait_in_sync("b");
    assert_identical(&a, &b);
}

#[test]
fn volume_crashed_primary_rejoins_with_a_full_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(tmp.path(), &[]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x31 0 2M")]);
    a.kill();
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    qemu_io_ok(
        &b.uri(),
        &[s("write -P 0x32 1M 64k"), s("write -P 0x33 9M 4k")],
    );
    let before = Node::peer_status(&b.status().unwrap(), "a")["resynced_bytes_total"]
        .as_u64()
        .unwrap();
    a.start(&[b.peer()], &[]);
    // a died as primary: it comes back secondary and flagged, and takes everything from
    // b, because its last in-flight writes are unknown.
    let st = b.wait_in_sync("a");
    let resynced = Node::peer_status(&st, "a")["resynced_bytes_total"]
        .as_u64()
        .unwrap();
    assert_eq!(
        resynced - before,
        SIZE,
        "a crashed primary gets a full sync"
    );
    let sa = a.wait_for("a up to date", |s| s["disk"] == "UpToDate");
    assert_eq!(sa["role"], "Secondary");
    assert_eq!(sa["crashed_primary"], false);
    qemu_io_ok(&b.uri(), &[s("flush")]);
    assert_identical(&a, &b);
}

fn signal(n: &Node, sig: &str) {
    let pid = n.child.as_ref().expect("node not running").id();
    let o = run_bounded(Command::new("kill").args([sig, &pid.to_string()]), WAIT);
    assert!(o.status.success(), "kill {sig} {pid}: {}", text(&o));
}

#[test]
fn volume_hung_peer_is_dropped_and_resynced_later() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--peer-timeout", "1"]);
    signal(&b, "-STOP");
    // The write completes once a gives up on b; b's share goes to the bitmap.
    qemu_io_ok(&a.uri(), &[s("write -P 0x66 64k 64k")]);
    let st = a.status().unwrap();
    let p = Node::peer_status(&st, "b");
    assert_ne!(p["connection"], "Connected", "{p:#}");
    assert_eq!(p["out_of_sync_bytes"], REGION);
    signal(&b, "-CONT");
    a.wait_in_sync("b");
    assert_identical(&a, &b);
}

#[test]
fn volume_dual_primary_only_inside_an_explicit_window() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--allow-two-primaries"]);
    // A live-migration window: both primary, writes from either reach the other.
    b.ok(&["promote"]);
    qemu_io_ok(&b.uri(), &[s("write -P 0x71 0 64k")]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x72 64k 64k")]);
    assert_identical(&a, &b);
    a.ok(&["demote"]);
    let sb = b.wait_for("a secondary", |s| {
        Node::peer_status(s, "a")["role"] == "Secondary"
    });
    assert_eq!(sb["role"], "Primary");
    let o = qemu_io(&a.uri(), &[s("write -P 0x73 0 4k")]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Operation not permitted"),
        "{}",
        text(&o)
    );
}

/// A TCG guest from scripts/build-guest whose disk is a Haven volume over NBD. Its init
/// writes `HAVEN-COUNTER n` to sector 0 with fsync every 0.5 s and prints the same line
/// after each write is durable; at boot it prints `HAVEN-RESUME n` from the disk.
struct Guest {
    child: Child,
    console: PathBuf,
}

impl Guest {
    fn start(dir: &Path, name: &str, nbd: &Path) -> Guest {
        let g = std::env::var_os("HAVEN_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
        assert!(
            g.join("vmlinux").is_file() && g.join("initramfs.cpio").is_file(),
            "no test guest in {}: run scripts/build-guest (or set HAVEN_GUEST_DIR)",
            g.display()
        );
        let console = dir.join(format!("{name}.console"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "128", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none", "-net", "none"])
            .arg("-kernel")
            .arg(g.join("vmlinux"))
            .arg("-initrd")
            .arg(g.join("initramfs.cpio"))
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=nbd,node-name=n0,server.type=unix,server.path={},export=vol",
                nbd.display()
            ))
            .args(["-blockdev", "driver=raw,node-name=d0,file=n0"])
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64 (Debian package qemu-system-x86)");
        Guest { child, console }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits (bounded) until the console has a line `prefix N` and returns the last N.
    fn wait_line(&self, prefix: &str, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let last = self
                .console()
                .lines()
                .filter_map(|l| l.trim().strip_prefix(prefix))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .next_back();
            if let Some(n) = last.filter(|n| *n >= at_least) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "guest never printed `{prefix} >= {at_least}`; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn volume_guest_fails_over_to_the_secondary_without_losing_a_counter() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(tmp.path(), &[]);
    let mut g1 = Guest::start(tmp.path(), "g1", &a.nbd);
    g1.wait_line("HAVEN-RESUME", 0);
    g1.wait_line("HAVEN-COUNTER", 3);
    // Power loss of the primary's host: volume server and guest die together.
    a.kill();
    g1.kill();
    let seen = g1.wait_line("HAVEN-COUNTER", 3);
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    let g2 = Guest::start(tmp.path(), "g2", &b.nbd);
    let resumed = g2.wait_line("HAVEN-RESUME", 0);
    assert!(
        resumed >= seen,
        "the guest saw counter {seen} durable, but the promoted replica resumed at {resumed}"
    );
    g2.wait_line("HAVEN-COUNTER", resumed + 2);
}

#[test]
fn volume_silent_primary_is_detected_so_the_secondary_can_be_promoted() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--peer-timeout", "1"]);
    // A frozen host sends no FIN: b must notice the silence by itself.
    signal(&a, "-STOP");
    b.wait_for("a declared gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    qemu_io_ok(&b.uri(), &[s("write -P 0x81 0 64k")]);
    // a wakes up believing it is still primary; its first contact deposes it.
    signal(&a, "-CONT");
    a.wait_for("a deposed", |s| s["role"] == "Secondary");
    assert_eq!(b.status().unwrap()["role"], "Primary");
}

#[test]
fn volume_cli_errors_name_the_file_field_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let _a = Node::create(tmp.path(), "a", true);
    let run = |args: &[&str]| {
        let o = run_bounded(Command::new(HAVEN).args(args), WAIT);
        assert!(!o.status.success(), "{args:?} should fail: {}", text(&o));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let dir = tmp.path().join("a");
    let dir = dir.to_str().unwrap();
    let e = run(&[
        "volume", "create", "--dir", dir, "--volume", "vol", "--node", "a", "--size", "1M",
    ]);
    assert!(
        e.contains("meta.json") && e.contains("already exists"),
        "{e}"
    );
    let e = run(&[
        "volume", "create", "--dir", dir, "--volume", "v", "--node", "a", "--size", "1Q",
    ]);
    assert!(e.contains("--size") && e.contains("not a size"), "{e}");
    let e = run(&[
        "volume",
        "serve",
        "--dir",
        dir,
        "--control",
        "/nonexistent/c",
        "--peer",
        "b",
    ]);
    assert!(e.contains("NAME=ADDR"), "{e}");
    let e = run(&["volume", "status", "--control", "/nonexistent/ctl"]);
    assert!(e.contains("/nonexistent/ctl"), "{e}");
    std::fs::write(tmp.path().join("a/meta.json"), "{\"volume\": 1}").unwrap();
    let ctl = tmp.path().join("c.ctl");
    let e = run(&[
        "volume",
        "serve",
        "--dir",
        dir,
        "--control",
        ctl.to_str().unwrap(),
    ]);
    assert!(
        e.contains("meta.json") && e.contains("not valid volume metadata"),
        "{e}"
    );
}

#[test]
fn volume_three_replicas_fail_over_and_the_old_primary_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    let mut c = Node::create(tmp.path(), "c", false);
    a.start(&[b.peer(), c.peer()], &[]);
    b.start(&[a.peer(), c.peer()], &[]);
    c.start(&[a.peer(), b.peer()], &[]);
    a.wait_in_sync("b");
    a.wait_in_sync("c");
    b.wait_in_sync("c");
    a.ok(&["promote"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x91 0 1M")]);
    a.kill();
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    // c follows the new primary at once: same data, newer epoch.
    qemu_io_ok(&b.uri(), &[s("write -P 0x92 512k 1M"), s("flush")]);
    let sc = c.wait_for("c follows b", |s| {
        Node::peer_status(s, "b")["role"] == "Primary" && s["epoch"] == 2
    });
    assert_eq!(sc["disk"], "UpToDate");
    assert_identical(&b, &c);
    // The old primary comes back, is behind, and catches up from the new one.
    a.start(&[b.peer(), c.peer()], &[]);
    b.wait_in_sync("a");
    a.wait_for("a in sync with c", |s| {
        s["disk"] == "UpToDate" && Node::peer_status(s, "c")["replication"] == "Established"
    });
    qemu_io_ok(&b.uri(), &[s("write -P 0x93 4M 64k"), s("flush")]);
    assert_identical(&a, &b);
    assert_identical(&b, &c);
    let d = a.data();
    assert_eq!((d[0], d[600 << 10], d[4 << 20]), (0x91, 0x92, 0x93));
}

#[test]
fn volume_replica_refuses_a_deposed_primary_still_connected_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    let mut c = Node::create(tmp.path(), "c", false);
    a.start(&[b.peer(), c.peer()], &[]);
    b.start(&[a.peer(), c.peer()], &[]);
    c.start(&[a.peer(), b.peer()], &[]);
    a.wait_in_sync("b");
    a.wait_in_sync("c");
    b.wait_in_sync("c");
    a.ok(&["promote"]);
    // Cut a from b only; a stays primary and still reaches c.
    a.ok(&["disconnect", "--peer", "b"]);
    b.ok(&["disconnect", "--peer", "a"]);
    b.wait_for("a gone", |s| {
        Node::peer_status(s, "a")["connection"] != "Connected"
    });
    b.ok(&["promote", "--peer-fenced", "a"]);
    // c learns the newer epoch from b and drops the old primary.
    c.wait_for("c drops a", |s| {
        s["epoch"] == 2 && Node::peer_status(s, "a")["role"] != "Primary"
    });
    qemu_io_ok(&b.uri(), &[s("write -P 0xbb 3M 4k")]);
    // Whatever a still writes never reaches c.
    let _ = qemu_io(
        &a.uri(),
        &[s("write -P 0xaa 3M 4k"), s("write -P 0xaa 5M 4k")],
    );
    a.wait_for("a deposed", |s| {
        s["role"] == "Secondary" && s["disk"] == "Outdated"
    });
    qemu_io_ok(&b.uri(), &[s("flush")]);
    let d = c.data();
    assert_eq!(d[3 << 20], 0xbb);
    assert_eq!(d[5 << 20], 0, "a deposed primary's write reached c");
    assert_identical(&b, &c);
}

#[test]
fn volume_writes_during_a_full_sync_land_on_the_new_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    let slow = ["--resync-rate", "4M"];
    a.start(&[b.peer()], &slow);
    a.ok(&["promote", "--peer-fenced", "b"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x11 0 16M")]);
    b.start(&[a.peer()], &slow);
    a.wait_for("full sync under way", |s| {
        Node::peer_status(s, "b")["replication"] == "SyncSource"
    });
    // The volume stays in service: writes all over it while the sync runs, some to
    // regions already sent, some to regions not yet sent.
    let cmds: Vec<String> = (0..64u64)
        .map(|i| format!("write -P {} {} 4k", 0x20 + i, (i * 977 % 4096) * 4096))
        .collect();
    qemu_io_ok(&a.uri(), &cmds);
    let st = a.status().unwrap();
    assert_eq!(
        Node::peer_status(&st, "b")["replication"],
        "SyncSource",
        "the writes should have overlapped the sync"
    );
    a.wait_in_sync("b");
    qemu_io_ok(&a.uri(), &[s("flush")]);
    assert_identical(&a, &b);
}

#[test]
fn volume_replication_refuses_a_plaintext_peer_and_a_foreign_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    // `a` (the smaller name) dials; `b` listens.
    a.start(&[b.peer()], &[]);
    b.start(&[a.peer()], &["--plaintext"]);
    a.ok(&["promote", "--peer-fenced", "b"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x5a 0 64k")]);
    let st = a.wait_for("a TLS failure towards plaintext b", |s| {
        Node::peer_status(s, "b")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("TLS"))
    });
    assert_ne!(Node::peer_status(&st, "b")["connection"], "Connected");
    let sb = b.status().expect("b's status");
    assert_ne!(Node::peer_status(&sb, "a")["connection"], "Connected");
    b.kill();

    // The same node name under another cluster's CA.
    let foreign = tls_args(tmp.path(), "other", "b");
    let refs: Vec<&str> = foreign.iter().map(String::as_str).collect();
    b.start(&[a.peer()], &refs);
    a.wait_for("a refusing b's foreign certificate", |s| {
        Node::peer_status(s, "b")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
    });
    let sb = b.status().expect("b's status");
    assert_ne!(Node::peer_status(&sb, "a")["connection"], "Connected");
    assert_eq!(
        sb["disk"], "Inconsistent",
        "b got data over a refused channel"
    );
    b.kill();

    // Under the cluster's CA the same pair connects and syncs: the refusals were TLS's.
    b.start(&[a.peer()], &[]);
    a.wait_in_sync("b");
    assert_identical(&a, &b);
}

#[test]
fn volume_replica_refuses_another_members_valid_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::create(tmp.path(), "a", true);
    let mut b = Node::create(tmp.path(), "b", false);
    // Node c's certificate: same cluster, same CA, valid, but it is c's.
    let c_cert = tls_args(tmp.path(), "lab", "c");
    let c_refs: Vec<&str> = c_cert.iter().map(String::as_str).collect();

    // b's replica holds c's certificate: `a` dials b and finds c there.
    a.start(&[b.peer()], &[]);
    b.start(&[a.peer()], &c_refs);
    let st = a.wait_for("a refusing c's certificate where b should be", |s| {
        Node::peer_status(s, "b")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("`c`") && e.contains("`b`"))
    });
    assert_ne!(Node::peer_status(&st, "b")["connection"], "Connected");
    b.kill();
    a.kill();

    // Now `a` holds c's certificate and dials b: b, accepting, sees a hello from `a`
    // over c's certificate and refuses; `a` is told why.
    b.start(&[a.peer()], &[]);
    a.start(&[b.peer()], &c_refs);
    let st = a.wait_for("b refusing a hello from `a` over c's certificate", |s| {
        Node::peer_status(s, "b")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("claims node `a`") && e.contains("`c`"))
    });
    assert_ne!(Node::peer_status(&st, "b")["connection"], "Connected");
    let sb = b.status().expect("b's status");
    assert_ne!(Node::peer_status(&sb, "a")["connection"], "Connected");
    assert_eq!(sb["disk"], "Inconsistent", "b took data from an impostor");
    a.kill();

    // With their own certificates the same pair connects and syncs.
    a.start(&[b.peer()], &[]);
    a.wait_in_sync("b");
    assert_identical(&a, &b);
}

#[test]
fn volume_serve_listens_on_loopback_only_and_replicates_only_under_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::create(tmp.path(), "a", true);
    let serve = |args: &[&str]| {
        let mut c = Command::new(HAVEN);
        c.args(["volume", "serve", "--dir"])
            .arg(&a.dir)
            .arg("--control")
            .arg(&a.ctl)
            .args(args);
        let o = run_bounded(&mut c, WAIT);
        assert!(!o.status.success(), "{args:?} should fail: {}", text(&o));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = serve(&["--listen", "0.0.0.0:7790", "--plaintext"]);
    assert!(
        e.contains("--listen 0.0.0.0:7790") && e.contains("not a loopback address"),
        "{e}"
    );
    let e = serve(&["--nbd-tcp", "192.0.2.1:10809"]);
    assert!(
        e.contains("--nbd-tcp 192.0.2.1:10809") && e.contains("--allow-non-loopback"),
        "{e}"
    );
    let e = serve(&["--listen", &format!("127.0.0.1:{}", a.port)]);
    assert!(e.contains("mutual TLS") && e.contains("--plaintext"), "{e}");
    let e = serve(&["--peer", "b=127.0.0.1:1"]);
    assert!(e.contains("mutual TLS"), "{e}");
}

/// A sequential `qemu-io` writer on `uri`: 4 KiB writes with pattern `i % 250 + 1` at
/// block `i`, for blocks `from..to`. Its acknowledged writes are counted as they come
/// (line-buffered through `stdbuf`, so the count is current).
struct Writer {
    child: Child,
    acked: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(uri: &str, from: u64, to: u64) -> Writer {
        let mut c = Command::new("stdbuf");
        c.args(["-oL", "qemu-io", "-f", "raw"]);
        for i in from..to {
            c.args(["-c", &format!("write -P {} {} 4k", i % 250 + 1, i * 4096)]);
        }
        c.arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawning qemu-io");
        let out = child.stdout.take().expect("qemu-io stdout");
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let a2 = acked.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(off) = line
                    .strip_prefix("wrote 4096/4096 bytes at offset ")
                    .and_then(|o| o.trim().parse().ok())
                {
                    a2.lock().unwrap().push(off);
                }
            }
        });
        Writer {
            child,
            acked,
            reader: Some(reader),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn wait_count(&self, what: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {} writes acknowledged, want {n}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("qemu-io status").is_none()
    }

    /// Waits for the writer to finish; returns the offsets it saw acknowledged.
    fn finish(mut self) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.running() {
            assert!(Instant::now() < deadline, "qemu-io did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn frozen_for(s: &Value, peer: &str) -> bool {
    s["frozen"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f["peer"] == peer))
}

#[test]
fn volume_primary_that_loses_its_peer_freezes_writes_until_the_peer_is_outdated() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(tmp.path(), &["--fence-peers"]);
    const N: u64 = 1024;
    let mut w = Writer::start(&a.uri(), 0, N);
    w.wait_count("writes to flow while both replicas are up", 50);
    // The secondary dies mid-stream: nobody has said yet that its data is stale.
    b.kill();
    let frozen = a.wait_for("the primary to freeze with a write waiting", |s| {
        frozen_for(s, "b") && s["frozen_requests"].as_u64() >= Some(1)
    });
    let before = w.count();
    assert!(
        (before as u64) < N,
        "the stream ended before the freeze: {before}"
    );
    // A sequential writer has at most one request out; while the replica still holds
    // one waiting, no acknowledgement can have slipped through.
    let again = a.wait_for("the freeze to be observed again", |s| {
        frozen_for(s, "b") && s["frozen_requests"].as_u64() >= Some(1)
    });
    assert_eq!(w.count(), before, "a write was acknowledged while frozen");
    assert!(w.running(), "the writer must wait, not fail");
    assert_eq!(again["frozen"][0]["expired"], false, "{again:#}");
    assert_eq!(
        frozen["frozen"][0]["generation"], frozen["generation"],
        "the freeze names the generation the peer has nothing of: {frozen:#}"
    );
    let shown = String::from_utf8_lossy(&a.ok(&["status"]).stdout).into_owned();
    assert!(shown.contains("I/O frozen: peer b"), "{shown}");

    // The cluster's word that b is outdated: writes resume and finish, none failed.
    a.ok(&["peer-outdated", "--peer", "b"]);
    let acked = w.finish();
    assert_eq!(
        acked.len() as u64,
        N,
        "every write acknowledged, none failed"
    );
    let s = a.status().expect("a's status");
    assert!(!frozen_for(&s, "b"), "{s:#}");

    // b returns and catches up on what it missed, by bitmap.
    b.start(&[a.peer()], &["--fence-peers"]);
    a.wait_in_sync("b");
    assert_identical(&a, &b);

    // Defence in depth: a replica the cluster calls outdated refuses promotion.
    a.ok(&["demote"]);
    b.wait_for("a secondary", |s| {
        Node::peer_status(s, "a")["role"] == "Secondary"
    });
    b.ok(&["outdate"]);
    let o = b.ctl(&["promote"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Outdated"),
        "{}",
        text(&o)
    );
}

#[test]
fn volume_freeze_is_bounded_and_a_returning_peer_ends_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(tmp.path(), &["--fence-peers", "--freeze-timeout", "1"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x21 0 64k")]);
    b.kill();
    a.wait_for("the primary to freeze", |s| frozen_for(s, "b"));
    // Past the bound a request fails: it is never acknowledged unreplicated.
    a.wait_for("the freeze to pass its bound", |s| {
        s["frozen"][0]["expired"] == true
    });
    let o = qemu_io(&a.uri(), &[s("write -P 0x22 0 64k")]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &text(&o);
    assert!(
        out.contains("Input/output error") || out.contains("failed"),
        "{out}"
    );
    // The peer coming back lifts the freeze (it is resynced from here).
    b.start(&[a.peer()], &["--fence-peers", "--freeze-timeout", "1"]);
    a.wait_in_sync("b");
    let st = a.status().expect("a's status");
    assert!(!frozen_for(&st, "b"), "{st:#}");
    qemu_io_ok(&a.uri(), &[s("write -P 0x23 0 64k")]);
    a.wait_in_sync("b");
    assert_identical(&a, &b);
}

#[test]
fn volume_window_cut_mid_migration_resyncs_the_target_from_the_source_without_the_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--fence-peers"]);
    // A live migration's window: b is promoted beside a and writes through it.
    b.ok(&["promote", "--migration-source", "a"]);
    a.wait_for("a to hold the source's side", |s| {
        s["window"]["side"] == "source"
    });
    qemu_io_ok(&b.uri(), &[s("write -P 0x31 0 64k")]);
    let before = b.status().expect("b's status");

    // Replication is cut inside the window.
    b.ok(&["disconnect", "--peer", "a"]);
    a.wait_for("a, which keeps the guest, to freeze for b", |s| {
        frozen_for(s, "b")
    });
    let cut = b.wait_for("b's window to close", |s| s["window"]["closed"] == true);
    assert!(
        !frozen_for(&cut, "a"),
        "the target must not have its source recorded outdated: {cut:#}"
    );
    assert_eq!(
        cut["generation"], before["generation"],
        "the target acknowledges nothing more, so it starts no generation: {cut:#}"
    );
    // The cluster records b outdated; a writes on alone.
    a.ok(&["peer-outdated", "--peer", "b"]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x32 64k 64k")]);
    // The migration failed: the cluster demotes the target, and the link heals. b
    // resyncs from a by itself: no split brain, no `resolve`.
    b.ok(&["demote"]);
    b.ok(&["connect", "--peer", "a"]);
    a.wait_in_sync("b");
    let s_b = b.wait_for("b up to date behind a", |s| {
        let p = Node::peer_status(s, "a");
        s["role"] == "Secondary"
            && s["disk"] == "UpToDate"
            && p["role"] == "Primary"
            && p["replication"] == "Established"
    });
    for (n, other) in [(&a, "b"), (&b, "a")] {
        let st = n.status().expect("status");
        assert_eq!(
            Node::peer_status(&st, other)["split_brain"],
            false,
            "{}: {st:#}",
            n.name
        );
    }
    assert_eq!(s_b["peers"][0]["out_of_sync_bytes"], 0, "{s_b:#}");
    assert_identical(&a, &b);
    let d = b.data();
    assert_eq!((d[0], d[64 << 10]), (0x31, 0x32), "both sides' writes");
}

/// Bytes of `n`'s backing file actually allocated on disk.
fn allocated(n: &Node) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(n.dir.join("data.img"))
        .expect("the backing file")
        .blocks()
        * 512
}

#[test]
fn volume_trim_punches_holes_on_every_replica_which_stay_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &[]);
    qemu_io_ok(&a.uri(), &[s("write -P 0x41 0 1M")]);
    a.wait_in_sync("b");
    let before = [allocated(&a), allocated(&b)];
    // qemu-io forwards a discard only with discard=unmap.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-d", "unmap"])
        .args(["-c", "discard 128k 512k"])
        .args(["-c", "read -P 0 128k 512k"])
        .args(["-c", "read -P 0x41 0 128k"])
        .args(["-c", "read -P 0x41 640k 384k"])
        .arg(a.uri());
    let o = run_bounded(&mut c, WAIT);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io: {}",
        text(&o)
    );
    a.wait_in_sync("b");
    assert_identical(&a, &b);
    for (n, was) in [(&a, before[0]), (&b, before[1])] {
        let d = n.data();
        assert!(
            d[128 << 10..640 << 10].iter().all(|x| *x == 0),
            "{}",
            n.name
        );
        assert_eq!((d[0], d[640 << 10]), (0x41, 0x41), "{}", n.name);
        let now = allocated(n);
        assert!(
            now + (256 << 10) <= was,
            "{}: the trimmed range is still allocated ({was} -> {now} bytes)",
            n.name
        );
    }
}

#[test]
fn volume_window_cut_after_the_guest_moved_resyncs_the_source_from_the_target_that_kept_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path(), &["--fence-peers"]);
    b.ok(&["promote", "--migration-source", "a"]);
    a.wait_for("a to hold the source's side", |s| {
        s["window"]["side"] == "source"
    });
    qemu_io_ok(&b.uri(), &[s("write -P 0x51 0 64k")]);
    // Cut inside the window; the migration completes anyway (its stream is not the
    // replication link), so the cluster demotes the source, which wrote nothing since.
    b.ok(&["disconnect", "--peer", "a"]);
    a.wait_for("a to freeze for b", |s| frozen_for(s, "b"));
    a.ok(&["demote"]);
    b.ok(&["connect", "--peer", "a"]);
    // b, which kept the guest, stays primary and a resyncs from it; b's held writes go
    // on once it sees a secondary.
    b.wait_in_sync("a");
    qemu_io_ok(&b.uri(), &[s("write -P 0x52 64k 64k")]);
    let s_b = b.wait_in_sync("a");
    assert_eq!(s_b["role"], "Primary", "{s_b:#}");
    assert!(s_b["window"].is_null(), "{s_b:#}");
    assert_eq!(
        Node::peer_status(&s_b, "a")["split_brain"],
        false,
        "{s_b:#}"
    );
    assert_identical(&a, &b);
    let d = a.data();
    assert_eq!((d[0], d[64 << 10]), (0x51, 0x52));
}
