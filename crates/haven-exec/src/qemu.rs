//! The `qemu` class: Haven's own QEMU driver, over QMP.
//!
//! Parameters:
//!
//! | name | meaning | default |
//! |---|---|---|
//! | `kernel` | kernel image (`-kernel`) | required |
//! | `initrd`, `append` | `-initrd`, `-append` | none |
//! | `disk` | raw disk image file, attached as virtio | none |
//! | `disk_nbd` | NBD export on a unix socket, attached as virtio (exclusive with `disk`) | none |
//! | `volume` | a `volume` resource's id: its local replica's NBD socket, attached as virtio; start refuses unless that replica is primary here (exclusive with `disk`, `disk_nbd`) | none |
//! | `memory` | MiB | 128 |
//! | `vcpus` | | 1 |
//! | `accel` | `kvm`, `tcg` or `auto` | `auto` |
//! | `qemu` | the QEMU binary | `qemu-system-x86_64` |
//! | `ready_marker` | a line the guest prints on its serial console when up; start waits for it | none |
//! | `powerdown_wait` | seconds stop waits after ACPI power-down before `quit` | half the stop timeout |
//! | `migrate_stall_timeout` | seconds without migration progress before `migrate_cancel` | 5 |
//!
//! Files in the state dir: `INSTANCE.qmp` (QMP socket), `INSTANCE.pid`,
//! `INSTANCE.serial` (the serial console), `INSTANCE.log` (QEMU's own output).
//!
//! `auto` tries KVM when `/dev/kvm` can be opened and falls back to TCG, with a note in
//! the result, when the KVM guest exits, reports an internal error or a panic, or — with
//! `ready_marker` set — does not print the marker within half the start timeout (some
//! nested KVMs hang instead of failing). A migration destination cannot fall back;
//! clusters that migrate should set `accel` explicitly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tokio::time::Instant;

use crate::agent::{AgentSpec, Migration, Op, OpCode, OpResult};
use crate::pidfile::{self, Tracked};
use crate::process::{reap_in_background, spawn_detached, wait_gone};
use crate::qmp::Qmp;
use crate::run::signal_group;

/// How often a wait re-checks QMP, the serial log or the process table.
const POLL: Duration = Duration::from_millis(50);
/// Starts each run's section of `INSTANCE.log`.
const LOG_HEADER: &str = "--- haven: starting QEMU";
/// Per-connection bound for QMP calls made while some other deadline governs.
const QMP_CALL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The validated parameters.
#[derive(Debug, Clone)]
struct Config {
    qemu: String,
    kernel: String,
    initrd: Option<String>,
    append: Option<String>,
    disk: Option<Disk>,
    memory: u32,
    vcpus: u32,
    accel: String,
    ready_marker: Option<String>,
    stall: Duration,
}

#[derive(Debug, Clone)]
enum Disk {
    File(String),
    Nbd(String),
    /// A Haven volume resource, attached through its replica's NBD socket here.
    Volume(String),
}

struct Paths {
    qmp: PathBuf,
    pid: PathBuf,
    serial: PathBuf,
    log: PathBuf,
}

fn paths(spec: &AgentSpec) -> Paths {
    let f = |ext: &str| spec.state_dir.join(format!("{}.{ext}", spec.instance));
    Paths {
        qmp: f("qmp"),
        pid: f("pid"),
        serial: f("serial"),
        log: f("log"),
    }
}

fn not_configured(spec: &AgentSpec, why: String) -> OpResult {
    OpResult::new(OpCode::NotConfigured, Duration::ZERO)
        .note(format!("resource {}: {why}", spec.instance))
}

fn config(spec: &AgentSpec) -> Result<Config, OpResult> {
    let p = |k: &str| {
        spec.params
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let number = |k: &str, default: u32, max: u32| -> Result<u32, OpResult> {
        match p(k) {
            None => Ok(default),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(not_configured(
                    spec,
                    format!("parameter `{k}` = {v:?}: expected a whole number from 1 to {max}"),
                )),
            },
        }
    };
    let seconds = |k: &str| -> Result<Option<Duration>, OpResult> {
        match p(k) {
            None => Ok(None),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
                    Ok(Some(Duration::from_secs_f64(s)))
                }
                _ => Err(not_configured(
                    spec,
                    format!("parameter `{k}` = {v:?}: expected seconds from 0 to 86400"),
                )),
            },
        }
    };
    let Some(kernel) = p("kernel") else {
        return Err(not_configured(
            spec,
            "parameter `kernel` is required for the qemu class".into(),
        ));
    };
    let disk = match (p("disk"), p("disk_nbd"), p("volume")) {
        (Some(f), None, None) => Some(Disk::File(f)),
        (None, Some(s), None) => Some(Disk::Nbd(s)),
        (None, None, Some(v)) => {
            if let Err(why) = crate::agent::check_instance(&v) {
                return Err(not_configured(spec, format!("parameter `volume`: {why}")));
            }
            Some(Disk::Volume(v))
        }
        (None, None, None) => None,
        _ => {
            return Err(not_configured(
                spec,
                "parameters `disk`, `disk_nbd` and `volume` exclude each other".into(),
            ));
        }
    };
    // Read by stop, which must work even when the rest is broken; checked here so a
    // typo shows at start.
    seconds("powerdown_wait")?;
    let accel = p("accel").unwrap_or_else(|| "auto".into());
    if !matches!(accel.as_str(), "kvm" | "tcg" | "auto") {
        return Err(not_configured(
            spec,
            format!("parameter `accel` = {accel:?}: expected kvm, tcg or auto"),
        ));
    }
    Ok(Config {
        qemu: p("qemu").unwrap_or_else(|| "qemu-system-x86_64".into()),
        kernel,
        initrd: p("initrd"),
        append: spec.params.get("append").cloned(),
        disk,
        memory: number("memory", 128, 1 << 22)?,
        vcpus: number("vcpus", 1, 1024)?,
        accel,
        ready_marker: p("ready_marker"),
        stall: seconds("migrate_stall_timeout")?.unwrap_or(Duration::from_secs(5)),
    })
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

fn command_line(
    c: &Config,
    accel: Accel,
    p: &Paths,
    spec: &AgentSpec,
    incoming: Option<&str>,
) -> Vec<String> {
    let name = spec.instance.as_str();
    let mut a: Vec<String> = vec![
        "-name".into(),
        opt(name),
        "-accel".into(),
        accel.name().into(),
        "-m".into(),
        c.memory.to_string(),
        "-smp".into(),
        c.vcpus.to_string(),
        "-kernel".into(),
        c.kernel.clone(),
    ];
    if let Some(i) = &c.initrd {
        a.extend(["-initrd".into(), i.clone()]);
    }
    if let Some(ap) = &c.append {
        a.extend(["-append".into(), ap.clone()]);
    }
    match &c.disk {
        Some(Disk::File(f)) => a.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,cache=none,aio=threads",
                opt(f)
            ),
        ]),
        Some(Disk::Nbd(s)) => a.extend([
            "-drive".into(),
            format!("file=nbd:unix:{},format=raw,if=virtio", opt(s)),
        ]),
        Some(Disk::Volume(v)) => {
            let s = crate::volume::nbd_socket(&spec.state_dir, v);
            a.extend([
                "-drive".into(),
                format!(
                    "file=nbd:unix:{},format=raw,if=virtio",
                    opt(&s.display().to_string())
                ),
            ]);
        }
        None => {}
    }
    a.extend([
        "-display".into(),
        "none".into(),
        "-net".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", opt(&p.serial.display().to_string())),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            opt(&p.qmp.display().to_string())
        ),
    ]);
    if let Some(addr) = incoming {
        a.extend(["-incoming".into(), format!("tcp:{addr}")]);
    }
    a
}

pub(crate) async fn run(spec: &AgentSpec, op: &Op, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    let p = paths(spec);
    match op {
        Op::Monitor { .. } => return monitor(&p, deadline).await,
        Op::Stop => return stop(spec, &p, timeout).await,
        Op::MetaData => {
            return OpResult::new(OpCode::Unimplemented, Duration::ZERO)
                .note("the qemu class documents its parameters in haven-exec's qemu module");
        }
        Op::Promote { .. } | Op::Demote | Op::Reload => {
            return OpResult::new(OpCode::Unimplemented, Duration::ZERO)
                .note(format!("the qemu class has no {} action", op.action()));
        }
        _ => {}
    }
    let c = match config(spec) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match op {
        Op::Start => start(spec, &c, &p, timeout).await,
        Op::MigrateTo(m) => migrate_to(&c, &p, m, deadline).await,
        Op::MigrateFrom(m) => migrate_from(spec, &c, &p, m, deadline).await,
        Op::ValidateAll => {
            if Path::new(&c.kernel).is_file() {
                OpResult::new(OpCode::Success, Duration::ZERO)
            } else {
                OpResult::new(OpCode::NotInstalled, Duration::ZERO)
                    .note(format!("kernel {} does not exist", c.kernel))
            }
        }
        _ => OpResult::new(OpCode::Unimplemented, Duration::ZERO),
    }
}

/// The QEMU process this resource's pidfile names, if it still runs.
fn running(p: &Paths) -> Result<Option<Tracked>, OpResult> {
    pidfile::read(&p.pid)
        .map(|t| t.filter(Tracked::alive))
        .map_err(|e| OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string()))
}

async fn status(p: &Paths, deadline: Instant) -> Result<String, String> {
    let d = deadline.min(Instant::now() + QMP_CALL);
    let mut q = Qmp::connect(&p.qmp, d).await.map_err(|e| e.to_string())?;
    q.status(d).await.map_err(|e| e.to_string())
}

async fn monitor(p: &Paths, deadline: Instant) -> OpResult {
    match running(p) {
        Ok(Some(_)) => {}
        Ok(None) => return OpResult::new(OpCode::NotRunning, Duration::ZERO),
        Err(r) => return r,
    }
    match status(p, deadline).await {
        Ok(s) if matches!(s.as_str(), "running" | "paused" | "suspended") => {
            let r = OpResult::new(OpCode::Success, Duration::ZERO);
            if s == "running" {
                r
            } else {
                r.note(format!("the guest is {s}"))
            }
        }
        Ok(s) => {
            OpResult::new(OpCode::Error, Duration::ZERO).note(format!("QEMU reports status {s}"))
        }
        Err(e) => OpResult::new(OpCode::Error, Duration::ZERO)
            .note(format!("QEMU runs but does not answer: {e}")),
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

async fn start(spec: &AgentSpec, c: &Config, p: &Paths, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    match running(p) {
        Ok(Some(_)) => {
            return match status(p, deadline).await {
                Ok(s) if s == "running" => OpResult::new(OpCode::Success, Duration::ZERO),
                Ok(s) => OpResult::new(OpCode::Error, Duration::ZERO).note(format!(
                    "QEMU already runs for this resource, with status {s}"
                )),
                Err(e) => OpResult::new(OpCode::Error, Duration::ZERO).note(format!(
                    "QEMU already runs for this resource but does not answer: {e}"
                )),
            };
        }
        Ok(None) => {}
        Err(r) => return r,
    }
    if let Some(Disk::Volume(v)) = &c.disk
        && let Err(why) = crate::volume::primary_socket(&spec.state_dir, v, deadline).await
    {
        return OpResult::new(OpCode::NotConfigured, Duration::ZERO).note(why);
    }
    let mut notes = Vec::new();
    let plan: Vec<Accel> = match c.accel.as_str() {
        "kvm" => vec![Accel::Kvm],
        "tcg" => vec![Accel::Tcg],
        _ if kvm_usable() => vec![Accel::Kvm, Accel::Tcg],
        _ => {
            notes.push("accel auto: /dev/kvm is not usable; using TCG".to_string());
            vec![Accel::Tcg]
        }
    };
    let mut last = None;
    for (i, accel) in plan.iter().enumerate() {
        let has_fallback = i + 1 < plan.len();
        // A KVM attempt that may fall back gets half the time, so TCG still has time.
        let attempt_deadline = if has_fallback {
            Instant::now() + deadline.saturating_duration_since(Instant::now()) / 2
        } else {
            deadline
        };
        match launch(spec, c, p, *accel, None, attempt_deadline).await {
            Ok(()) => {
                let mut r = OpResult::new(OpCode::Success, Duration::ZERO);
                r.notes = notes;
                return r;
            }
            Err((code, why)) => {
                if has_fallback {
                    notes.push(format!(
                        "accel auto: KVM could not run the guest ({why}); fell back to TCG"
                    ));
                } else {
                    notes.push(why);
                }
                last = Some(code);
            }
        }
    }
    let mut r = OpResult::new(last.unwrap_or(OpCode::Error), Duration::ZERO);
    r.notes = notes;
    r
}

/// Starts QEMU and waits until the guest runs (and printed the ready marker, if any).
/// On failure nothing is left running.
async fn launch(
    spec: &AgentSpec,
    c: &Config,
    p: &Paths,
    accel: Accel,
    incoming: Option<&str>,
    deadline: Instant,
) -> Result<(), (OpCode, String)> {
    // A socket left by a killed QEMU would make the new one fail to bind; an old
    // console would show the ready marker of the previous boot.
    let _ = std::fs::remove_file(&p.qmp);
    let _ = std::fs::remove_file(&p.serial);
    // The log accumulates across starts; a header lets errors quote only this run.
    let _ = std::fs::create_dir_all(&spec.state_dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
    {
        use std::io::Write;
        let _ = writeln!(f, "{LOG_HEADER} with {}", accel.name());
    }
    let mut cmd = tokio::process::Command::new(&c.qemu);
    cmd.args(command_line(c, accel, p, spec, incoming));
    let mut child =
        spawn_detached(cmd, &spec.state_dir, &p.log).map_err(|why| (OpCode::SpawnFailed, why))?;
    let Some(t) = child.id().and_then(|pid| Tracked::of(pid as i32)) else {
        let _ = child.wait().await;
        return Err((
            OpCode::Error,
            format!("QEMU exited at once: {}", log_tail(&p.log)),
        ));
    };
    if let Err(e) = pidfile::write(&p.pid, t) {
        signal_group(t.pid as u32, Signal::SIGKILL);
        let _ = child.wait().await;
        return Err((OpCode::Error, e.to_string()));
    }
    reap_in_background(child);
    let want_marker = if incoming.is_some() {
        None
    } else {
        c.ready_marker.as_deref()
    };
    match wait_ready(p, t, want_marker, incoming.is_some(), deadline).await {
        Ok(()) => Ok(()),
        Err((code, why)) => {
            signal_group(t.pid as u32, Signal::SIGKILL);
            wait_gone(t, std::time::Instant::now() + Duration::from_secs(5)).await;
            pidfile::remove(&p.pid);
            Err((
                code,
                format!("{} with {}: {why}", accel_verb(incoming), accel.name()),
            ))
        }
    }
}

fn accel_verb(incoming: Option<&str>) -> &'static str {
    if incoming.is_some() {
        "incoming migration"
    } else {
        "start"
    }
}

/// Waits for QMP `running` (for a migration destination: until the migration has
/// completed and the guest runs), then for the marker line on the console.
async fn wait_ready(
    p: &Paths,
    t: Tracked,
    marker: Option<&str>,
    incoming: bool,
    deadline: Instant,
) -> Result<(), (OpCode, String)> {
    let mut qmp: Option<Qmp> = None;
    let mut running = false;
    loop {
        if !t.alive() {
            return Err((OpCode::Error, format!("QEMU exited: {}", log_tail(&p.log))));
        }
        if Instant::now() >= deadline {
            let what = if running {
                "ready marker on the console"
            } else {
                "QMP status `running`"
            };
            return Err((OpCode::Timeout, format!("no {what} before the timeout")));
        }
        if !running {
            if qmp.is_none() {
                let d = deadline.min(Instant::now() + QMP_CALL);
                qmp = Qmp::connect(&p.qmp, d).await.ok();
            }
            if let Some(q) = qmp.as_mut() {
                let d = deadline.min(Instant::now() + QMP_CALL);
                match q.status(d).await {
                    Ok(s) if s == "running" => running = true,
                    Ok(s)
                        if matches!(
                            s.as_str(),
                            "internal-error" | "guest-panicked" | "shutdown"
                        ) =>
                    {
                        return Err((OpCode::Error, format!("the guest is {s}")));
                    }
                    // A destination whose migration failed sits in `paused` or stays in
                    // `inmigrate`; the caller's deadline decides.
                    Ok(s) if incoming && s == "postmigrate" => {
                        return Err((OpCode::Error, "unexpected status postmigrate".into()));
                    }
                    Ok(_) => {}
                    Err(_) => qmp = None,
                }
            }
        }
        if running {
            match marker {
                None => return Ok(()),
                Some(m) => {
                    if serial_has(&p.serial, m) {
                        return Ok(());
                    }
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn serial_has(serial: &Path, marker: &str) -> bool {
    std::fs::read(serial)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .any(|l| l.trim_end() == marker)
        })
        .unwrap_or(false)
}

/// The last lines of QEMU's own output, for error notes.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let this_run = text
        .rsplit_once(LOG_HEADER)
        .map_or(text.as_str(), |(_, r)| r);
    let all: Vec<&str> = this_run
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let lines: Vec<&str> = all.into_iter().rev().take(3).collect();
    if lines.is_empty() {
        format!("no output in {}", log.display())
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

async fn stop(spec: &AgentSpec, p: &Paths, timeout: Duration) -> OpResult {
    let t = match running(p) {
        Ok(Some(t)) => t,
        Ok(None) => {
            pidfile::remove(&p.pid);
            let _ = std::fs::remove_file(&p.qmp);
            return OpResult::new(OpCode::Success, Duration::ZERO);
        }
        Err(r) => return r,
    };
    let start = std::time::Instant::now();
    let deadline = start + timeout;
    let kill_at = start + timeout.mul_f64(0.8);
    let powerdown_wait = spec
        .params
        .get("powerdown_wait")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(timeout / 2)
        .min(timeout.mul_f64(0.6));
    let qmp_deadline = |limit: std::time::Instant| {
        let now = std::time::Instant::now();
        Instant::now() + limit.saturating_duration_since(now).min(QMP_CALL)
    };
    let mut notes = Vec::new();
    let done = |notes: Vec<String>| {
        pidfile::remove(&p.pid);
        let _ = std::fs::remove_file(&p.qmp);
        let mut r = OpResult::new(OpCode::Success, Duration::ZERO);
        r.notes = notes;
        r
    };

    let mut qmp = Qmp::connect(&p.qmp, qmp_deadline(start + powerdown_wait))
        .await
        .ok();
    if let Some(q) = qmp.as_mut() {
        let asked = q
            .execute(
                "system_powerdown",
                None,
                qmp_deadline(start + powerdown_wait),
            )
            .await
            .is_ok();
        if asked && wait_gone(t, start + powerdown_wait).await {
            signal_group(t.pid as u32, Signal::SIGKILL);
            return done(notes);
        }
        notes.push("the guest did not power off on ACPI power-down; sent quit".into());
        let _ = q.execute("quit", None, qmp_deadline(kill_at)).await;
    } else {
        notes.push("QMP did not answer; killing QEMU".into());
    }
    if wait_gone(t, kill_at).await {
        signal_group(t.pid as u32, Signal::SIGKILL);
        return done(notes);
    }
    signal_group(t.pid as u32, Signal::SIGKILL);
    notes.push("QEMU did not quit; killed with SIGKILL".into());
    if wait_gone(t, deadline).await {
        return done(notes);
    }
    let mut r = OpResult::new(OpCode::Timeout, Duration::ZERO);
    notes.push(format!("QEMU {} survived SIGKILL", t.pid));
    r.notes = notes;
    r
}

fn check_address(m: &Migration) -> Result<(), OpResult> {
    let ok = m
        .address
        .rsplit_once(':')
        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && !m.address.contains([',', ' ']);
    if ok {
        Ok(())
    } else {
        Err(
            OpResult::new(OpCode::InvalidArgs, Duration::ZERO).note(format!(
                "migration address {:?}: expected HOST:PORT",
                m.address
            )),
        )
    }
}

async fn migrate_to(c: &Config, p: &Paths, m: &Migration, deadline: Instant) -> OpResult {
    if let Err(r) = check_address(m) {
        return r;
    }
    let t = match running(p) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return OpResult::new(OpCode::NotRunning, Duration::ZERO)
                .note("no QEMU runs for this resource here");
        }
        Err(r) => return r,
    };
    let mut q = match Qmp::connect(&p.qmp, deadline.min(Instant::now() + QMP_CALL)).await {
        Ok(q) => q,
        Err(e) => return OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string()),
    };
    let uri = format!("tcp:{}", m.address);
    let fail = |code, why: String| OpResult::new(code, Duration::ZERO).note(why);
    // The destination may not listen yet: a migration that fails before sending
    // anything is retried until the deadline.
    let mut last_failure = String::from("no attempt finished");
    'attempt: loop {
        if Instant::now() >= deadline {
            return fail(
                OpCode::Timeout,
                format!("migration to {uri} could not start before the timeout: {last_failure}"),
            );
        }
        if let Err(e) = q
            .execute("migrate", Some(json!({ "uri": uri })), deadline)
            .await
        {
            last_failure = e.to_string();
            tokio::time::sleep(POLL).await;
            continue 'attempt;
        }
        let mut transferred = 0u64;
        let mut progress_at = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = q.execute("migrate_cancel", None, now + QMP_CALL).await;
                let why = if transferred == 0 {
                    format!("migration to {uri} could not start before the timeout: {last_failure}")
                } else {
                    format!("migration to {uri} did not finish in time; cancelled")
                };
                return fail(OpCode::Timeout, why);
            }
            let info = match q.execute("query-migrate", None, deadline).await {
                Ok(i) => i,
                Err(e) => return fail(OpCode::Error, format!("query-migrate: {e}")),
            };
            let status = info
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("none");
            let sent = info
                .pointer("/ram/transferred")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            match status {
                "completed" => break 'attempt,
                "failed" | "cancelled" if transferred == 0 && sent == 0 => {
                    last_failure = info
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or(status)
                        .to_string();
                    tokio::time::sleep(POLL).await;
                    continue 'attempt;
                }
                "failed" | "cancelled" => {
                    let why = info
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or(status);
                    return fail(OpCode::Error, format!("migration to {uri} {status}: {why}"));
                }
                _ => {}
            }
            if sent != transferred {
                transferred = sent;
                progress_at = now;
            } else if now.duration_since(progress_at) >= c.stall {
                let _ = q.execute("migrate_cancel", None, now + QMP_CALL).await;
                return fail(
                    OpCode::Error,
                    format!(
                        "migration to {uri} made no progress for {:?}; cancelled, the guest keeps running here",
                        c.stall
                    ),
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
    // The guest now runs on the destination; this copy must never resume.
    let _ = q.execute("quit", None, deadline).await;
    let until = std::time::Instant::now() + deadline.saturating_duration_since(Instant::now());
    if !wait_gone(t, until).await {
        signal_group(t.pid as u32, Signal::SIGKILL);
        wait_gone(t, std::time::Instant::now() + Duration::from_secs(5)).await;
    }
    signal_group(t.pid as u32, Signal::SIGKILL);
    pidfile::remove(&p.pid);
    let _ = std::fs::remove_file(&p.qmp);
    OpResult::new(OpCode::Success, Duration::ZERO)
}

async fn migrate_from(
    spec: &AgentSpec,
    c: &Config,
    p: &Paths,
    m: &Migration,
    deadline: Instant,
) -> OpResult {
    if let Err(r) = check_address(m) {
        return r;
    }
    match running(p) {
        Ok(Some(_)) => {
            return match status(p, deadline).await {
                Ok(s) if s == "running" => OpResult::new(OpCode::Success, Duration::ZERO),
                Ok(s) => OpResult::new(OpCode::Error, Duration::ZERO).note(format!(
                    "a QEMU for this resource already runs here with status {s}"
                )),
                Err(e) => OpResult::new(OpCode::Error, Duration::ZERO).note(e),
            };
        }
        Ok(None) => {}
        Err(r) => return r,
    }
    let mut notes = Vec::new();
    let accel = match c.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        _ if kvm_usable() => {
            notes.push("accel auto: migration destination uses KVM".to_string());
            Accel::Kvm
        }
        _ => {
            notes.push(
                "accel auto: /dev/kvm is not usable; migration destination uses TCG".to_string(),
            );
            Accel::Tcg
        }
    };
    let (code, extra) = match launch(spec, c, p, accel, Some(&m.address), deadline).await {
        Ok(()) => (OpCode::Success, None),
        Err((code, why)) => (code, Some(why)),
    };
    let mut r = OpResult::new(code, Duration::ZERO);
    r.notes = notes;
    r.notes.extend(extra);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentClass;

    fn spec() -> AgentSpec {
        AgentSpec::new("vm1", AgentClass::Qemu, "/run/haven")
            .param("kernel", "/k/vmlinux")
            .param("disk", "/d/a,b.raw")
            .param("accel", "tcg")
    }

    #[test]
    fn command_line_escapes_commas_and_sets_the_essentials() {
        let c = config(&spec()).unwrap();
        let a = command_line(
            &c,
            Accel::Tcg,
            &paths(&spec()),
            &spec(),
            Some("127.0.0.1:4444"),
        );
        let s = a.join(" ");
        assert!(
            s.contains("-accel tcg -m 128 -smp 1 -kernel /k/vmlinux"),
            "{s}"
        );
        assert!(s.contains("file=/d/a,,b.raw,format=raw,if=virtio"), "{s}");
        assert!(s.contains("-serial file:/run/haven/vm1.serial"), "{s}");
        assert!(
            s.contains("-qmp unix:/run/haven/vm1.qmp,server=on,wait=off"),
            "{s}"
        );
        assert!(s.ends_with("-incoming tcp:127.0.0.1:4444"), "{s}");
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let r = config(&spec().param("memory", "lots")).unwrap_err();
        assert_eq!(r.code, OpCode::NotConfigured);
        assert!(
            r.notes[0].contains("`memory`") && r.notes[0].contains("lots"),
            "{:?}",
            r.notes
        );
        let r = config(&spec().param("accel", "xen")).unwrap_err();
        assert!(r.notes[0].contains("kvm, tcg or auto"));
        let r = config(&spec().param("disk_nbd", "/s")).unwrap_err();
        assert!(r.notes[0].contains("exclude each other"));
        let r = config(&spec().param("volume", "vol1")).unwrap_err();
        assert!(r.notes[0].contains("exclude each other"));
        let mut s = spec();
        s.params.remove("disk");
        let r = config(&s.clone().param("volume", "../x")).unwrap_err();
        assert!(r.notes[0].contains("`volume`"), "{:?}", r.notes);
        let s = s.param("volume", "vol1");
        let a = command_line(&config(&s).unwrap(), Accel::Tcg, &paths(&s), &s, None).join(" ");
        assert!(
            a.contains("file=nbd:unix:/run/haven/vol1.nbd,format=raw,if=virtio"),
            "{a}"
        );
        let mut s = spec();
        s.params.remove("kernel");
        assert!(config(&s).unwrap_err().notes[0].contains("`kernel` is required"));
    }

    #[test]
    fn migration_addresses_are_checked() {
        let m = |a: &str| Migration {
            peer: "n2".into(),
            address: a.into(),
        };
        assert!(check_address(&m("127.0.0.1:4444")).is_ok());
        assert!(check_address(&m("127.0.0.1")).is_err());
        assert!(check_address(&m("h:1,server=on")).is_err());
        assert!(check_address(&m(":4444")).is_err());
    }
}
