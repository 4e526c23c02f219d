//! `haven lab up --libvirt` (root): each lab node gets a libvirt daemon of its own.
//!
//! The nodes of a lab share one host, but each must see only its own hypervisor, or
//! every node's monitor would find every guest. libvirtd as root is always the
//! privileged (`qemu:///system`) daemon, whose QEMU driver keeps its state in fixed
//! paths (`/run/libvirt/qemu`, `/var/lib/libvirt/qemu`, ...) under a lock, so a second
//! daemon cannot run beside the first. Each node's libvirtd therefore runs in a mount
//! namespace of its own, where those paths are the node's directories (and `/run/libvirt`
//! a fresh tmpfs, as after a real power cycle), and in a PID namespace of its own, so
//! that killing the namespace's first process kills the daemon and every QEMU it
//! daemonised: that is the lab's power switch for the hypervisor. The pidfile of that
//! process lies among the node's resource pidfiles, which the switch already kills.
//!
//! Each node's socket is `NODE/libvirt/sock/libvirt-sock`; the node's daemon gets it as
//! `LIBVIRT_DEFAULT_URI`, which `virsh` (and so `ocf:heartbeat:VirtualDomain` without
//! a `hypervisor` param) uses. A resource reaches another node's libvirt for a live
//! migration through `remoteuri`, with `%n` standing for the target node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::daemon::files::write_file;

/// The node's libvirt directory; its presence is what marks a node as having one.
pub const DIR: &str = "libvirt";
/// The pidfile of the node's hypervisor namespace, among the resources' pidfiles (so
/// `lab kill` and the lab fence device kill it with the node); a resource would need
/// the id `lab.libvirtd` to share it.
const PIDFILE: &str = "resources/lab.libvirtd.pid";
/// How long the node's libvirtd may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping libvirtd may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The URI of `node_dir`'s libvirt daemon.
pub fn uri(node_dir: &Path) -> String {
    format!("qemu+unix:///system?socket={}", socket(node_dir).display())
}

/// `remoteuri` for a VirtualDomain resource in the lab at `lab_dir`: `%n` is the
/// migration's target node.
pub fn remote_uri(lab_dir: &Path) -> String {
    format!(
        "qemu+unix:///system?socket={}/%n/{DIR}/sock/libvirt-sock",
        lab_dir.display()
    )
}

fn socket(node_dir: &Path) -> PathBuf {
    node_dir.join(DIR).join("sock").join("libvirt-sock")
}

/// Writes the configuration of `node_dir`'s libvirt daemon. `ip` is the node's own
/// address, where it receives live migrations (libvirt would otherwise listen on every
/// interface).
pub fn prepare(node_dir: &Path, ip: &str) -> anyhow::Result<()> {
    let base = node_dir.join(DIR);
    for d in ["etc", "lib", "cache", "log/qemu", "sock"] {
        let p = base.join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    // Migration refuses a destination with the source's host UUID, and on one host
    // they would all read the same one from the firmware.
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("cannot read /proc/sys/kernel/random/uuid")?;
    let sock_dir = base.join("sock");
    write_file(
        &base.join("etc/libvirtd.conf"),
        format!(
            "# Written by `haven lab up --libvirt`: this node's libvirtd only.\n\
             unix_sock_dir = \"{}\"\n\
             unix_sock_rw_perms = \"0700\"\n\
             unix_sock_ro_perms = \"0700\"\n\
             unix_sock_admin_perms = \"0700\"\n\
             # root only (the socket's mode), as polkit would allow.\n\
             auth_unix_rw = \"none\"\n\
             auth_unix_ro = \"none\"\n\
             host_uuid = \"{}\"\n\
             log_outputs = \"3:stderr\"\n",
            sock_dir.display(),
            uuid.trim()
        )
        .as_bytes(),
        false,
    )?;
    write_file(
        &base.join("etc/qemu.conf"),
        format!(
            "# Written by `haven lab up --libvirt`.\n\
             # Guests run as root with no confinement: the lab has no libvirt-qemu user\n\
             # (libvirt-daemon-system would create it) and shares the guest's files\n\
             # between nodes, so nothing may chown them.\n\
             user = \"root\"\ngroup = \"root\"\n\
             dynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = \"none\"\n\
             cgroup_controllers = [ ]\n\
             # QEMU's output goes to /var/log/libvirt/qemu (this node's), not to virtlogd.\n\
             stdio_handler = \"file\"\n\
             migration_address = \"{ip}\"\nmigration_host = \"{ip}\"\n"
        )
        .as_bytes(),
        false,
    )?;
    // libvirtd refuses to start when the user its build names for QEMU does not exist,
    // even though qemu.conf overrides it; the namespace gets a passwd that has it.
    for (file, line) in [
        (
            "passwd",
            "libvirt-qemu:x:64055:64055:Libvirt Qemu (haven lab):/var/lib/libvirt:/usr/sbin/nologin",
        ),
        ("group", "libvirt-qemu:x:64055:"),
    ] {
        let host = format!("/etc/{file}");
        let mut text =
            std::fs::read_to_string(&host).with_context(|| format!("cannot read {host}"))?;
        if !text.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(line);
            text.push('\n');
        }
        write_file(&base.join(file), text.as_bytes(), false)?;
    }
    write_file(&base.join("init.sh"), INIT.as_bytes(), false)?;
    Ok(())
}

/// PID 1 of the node's hypervisor namespace: mounts the node's directories over
/// libvirt's, runs libvirtd, and reaps what it orphans (the QEMUs it daemonises), which
/// a PID 1 must. SIGTERM stops libvirtd; when PID 1 exits, the kernel kills the rest.
const INIT: &str = r#"set -eu
base=$1
# libvirt's own directories, as its packages create them: empty mount points.
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
mount --bind "$base/etc" /etc/libvirt
mount --bind "$base/lib" /var/lib/libvirt
mount --bind "$base/cache" /var/cache/libvirt
mount --bind "$base/log" /var/log/libvirt
mount --bind "$base/passwd" /etc/passwd
mount --bind "$base/group" /etc/group
rm -f "$base/sock/"*
libvirtd --pid-file /run/libvirt/libvirtd.pid &
lv=$!
trap 'kill -TERM $lv' TERM
while kill -0 $lv 2>/dev/null; do wait || true; done
"#;

/// Starts `node_dir`'s libvirt daemon (in `netns` when the lab has namespaces) unless
/// it runs; returns its URI, or None for a node without libvirt.
pub fn start(node_dir: &Path, netns: Option<&str>) -> anyhow::Result<Option<String>> {
    use std::os::unix::process::CommandExt;
    let base = node_dir.join(DIR);
    if !base.join("init.sh").is_file() {
        return Ok(None);
    }
    let pidfile = node_dir.join(PIDFILE);
    if running(&pidfile)?.is_some() {
        return Ok(Some(uri(node_dir)));
    }
    if let Some(parent) = pidfile.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let log = std::fs::File::create(base.join("libvirtd.log"))
        .with_context(|| format!("cannot create {}/libvirtd.log", base.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "unshare"]);
            c
        }
        None => Command::new("unshare"),
    };
    // --kill-child: if unshare itself is killed, so is the namespace.
    let mut child = cmd
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", "sh"])
        .arg(base.join("init.sh"))
        .arg(&base)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!(
                "{}: cannot start its libvirtd (needs root and util-linux's unshare)",
                node_dir.display()
            )
        })?;
    let unshare = child.id();
    let started = Instant::now();
    let mut init = None;
    loop {
        if init.is_none() {
            init = first_child(unshare);
            if let Some(pid) = init {
                let t = haven_exec::pidfile::Tracked::of(pid).with_context(|| {
                    format!(
                        "{}: its libvirtd namespace died at once",
                        node_dir.display()
                    )
                })?;
                haven_exec::pidfile::write(&pidfile, t)?;
            }
        }
        if init.is_some() && std::os::unix::net::UnixStream::connect(socket(node_dir)).is_ok() {
            return Ok(Some(uri(node_dir)));
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || started.elapsed() > START_TIMEOUT {
            let _ = stop(node_dir);
            let log = std::fs::read_to_string(base.join("libvirtd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            anyhow::bail!(
                "{}: its libvirtd did not open {} within {START_TIMEOUT:?}{}; libvirtd.log ends:\n{}",
                node_dir.display(),
                socket(node_dir).display(),
                exited
                    .map(|s| format!(" (exited: {s})"))
                    .unwrap_or_default(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops `node_dir`'s libvirt daemon: SIGTERM (libvirtd leaves its guests running,
/// and the namespace's end kills them), then SIGKILL. Returns whether one ran.
pub fn stop(node_dir: &Path) -> anyhow::Result<bool> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pidfile = node_dir.join(PIDFILE);
    let Some(t) = running(&pidfile)? else {
        haven_exec::pidfile::remove(&pidfile);
        return Ok(false);
    };
    let _ = kill(Pid::from_raw(t.pid), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while t.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if t.alive() {
        let _ = kill(Pid::from_raw(t.pid), Signal::SIGKILL);
    }
    haven_exec::pidfile::remove(&pidfile);
    Ok(true)
}

fn running(pidfile: &Path) -> anyhow::Result<Option<haven_exec::pidfile::Tracked>> {
    Ok(haven_exec::pidfile::read(pidfile)?.filter(|t| t.alive()))
}

/// The first child of `pid`: the namespace's PID 1, which `unshare --fork` starts.
fn first_child(pid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The demo's libvirt guest: the lab's TCG test guest as a libvirt domain, with its
/// 1 MiB disk (where the guest keeps a counter), both in `lab_dir` so every node reads
/// the same definition. Returns the XML's path.
pub fn write_demo_domain(lab_dir: &Path, guest: &Path) -> anyhow::Result<PathBuf> {
    let disk = lab_dir.join("vm1.img");
    let f = std::fs::File::create(&disk)
        .with_context(|| format!("cannot create {}", disk.display()))?;
    f.set_len(1 << 20)
        .with_context(|| format!("cannot size {}", disk.display()))?;
    let xml = lab_dir.join("vm1.xml");
    write_file(&xml, domain_xml("vm1", guest, &disk).as_bytes(), false)?;
    Ok(xml)
}

/// A TCG domain booting `guest`'s kernel and initramfs. Its serial console goes to
/// `/var/log/libvirt/qemu/NAME-console.log`, which is the running node's own.
pub fn domain_xml(name: &str, guest: &Path, disk: &Path) -> String {
    format!(
        "<domain type='qemu'>\n\
         \x20 <name>{name}</name>\n\
         \x20 <memory unit='MiB'>128</memory>\n\
         \x20 <vcpu>1</vcpu>\n\
         \x20 <os>\n\
         \x20   <type arch='x86_64' machine='pc'>hvm</type>\n\
         \x20   <kernel>{kernel}</kernel>\n\
         \x20   <initrd>{initrd}</initrd>\n\
         \x20   <cmdline>console=ttyS0 panic=-1 quiet</cmdline>\n\
         \x20 </os>\n\
         \x20 <features><acpi/></features>\n\
         \x20 <on_reboot>destroy</on_reboot>\n\
         \x20 <devices>\n\
         \x20   <disk type='file' device='disk'>\n\
         \x20     <driver name='qemu' type='raw' cache='none'/>\n\
         \x20     <source file='{disk}'/>\n\
         \x20     <target dev='vda' bus='virtio'/>\n\
         \x20   </disk>\n\
         \x20   <serial type='file'>\n\
         \x20     <source path='/var/log/libvirt/qemu/{name}-console.log'/>\n\
         \x20     <target port='0'/>\n\
         \x20   </serial>\n\
         \x20   <memballoon model='none'/>\n\
         \x20 </devices>\n\
         </domain>\n",
        kernel = escape(&guest.join("vmlinux")),
        initrd = escape(&guest.join("initramfs.cpio")),
        disk = escape(disk),
    )
}

/// A path as XML text or attribute value.
fn escape(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_reaches_another_nodes_libvirt_by_its_name_in_the_remote_uri() {
        let lab = Path::new("/tmp/lab");
        assert_eq!(remote_uri(lab).replace("%n", "n2"), uri(&lab.join("n2")));
    }

    #[test]
    fn paths_in_the_domain_xml_are_escaped() {
        let xml = domain_xml("vm1", Path::new("/g/a'b&c"), Path::new("/d/<disk>.img"));
        assert!(
            xml.contains("<kernel>/g/a&apos;b&amp;c/vmlinux</kernel>"),
            "{xml}"
        );
        assert!(
            xml.contains("<source file='/d/&lt;disk&gt;.img'/>"),
            "{xml}"
        );
        assert!(!xml.contains("a'b"), "{xml}");
    }
}
