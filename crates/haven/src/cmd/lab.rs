//! `haven lab up|down|status`: a local cluster of real daemons on loopback addresses.
//!
//! Node i listens on 127.0.0.(10+i) (link0) and 127.0.1.(10+i) (link1), on ports the
//! kernel picks, so several labs (and tests) can run side by side without root.
//! With `--netns` (root) each node runs in a network namespace of its own, on real
//! links that `lab partition` really cuts (see [`netns`]).

pub mod libvirt;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;

use crate::daemon::api;
use crate::daemon::client::Client;
use crate::daemon::files::{ClientToml, write_file};
use crate::daemon::protocol::{
    ApplyConfig, ConfigReply, Empty, JoinTokenReply, JoinTokenRequest, StatusReport,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Start a lab cluster and return once it is quorate
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
        /// Run the nodes in network namespaces (root), for real link cuts
        #[arg(long)]
        netns: bool,
        /// Add a QEMU guest (TCG) to the demo configuration
        #[arg(long)]
        vms: bool,
        /// The guest to boot with --vms: vmlinux and initramfs.cpio (scripts/build-guest)
        #[arg(long, env = "HAVEN_GUEST_DIR")]
        guest_dir: Option<PathBuf>,
        /// Give each node a libvirt daemon of its own (root); with --vms the guest is
        /// an ocf:heartbeat:VirtualDomain resource
        #[arg(long)]
        libvirt: bool,
    },
    /// Stop every daemon the lab started
    Down {
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
    /// Show the lab's processes and the cluster's status
    Status {
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
    /// Power NODE off: kill its daemon and every resource process it started
    Kill {
        node: String,
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
    /// Power NODE on again: start its daemon (a fenced node stays out until
    /// `haven node online NODE`)
    Start {
        node: String,
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
    /// Cut NODE off from the others (all links, or only --link linkN)
    Partition {
        node: String,
        #[arg(long)]
        link: Option<String>,
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
    /// Undo every partition
    Heal {
        #[arg(long, default_value = "haven-lab")]
        dir: PathBuf,
    },
}

/// How long `lab up` waits for each step before giving up (and stopping what it started).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        LabCommand::Up {
            nodes,
            dir,
            netns,
            vms,
            guest_dir,
            libvirt,
        } => {
            let guest = if vms { Some(guest(guest_dir)?) } else { None };
            if !(1..=50).contains(&nodes) {
                anyhow::bail!("--nodes must be between 1 and 50, got {nodes}");
            }
            let rt = tokio::runtime::Runtime::new()?;
            match rt.block_on(up(nodes, &dir, guest.as_deref(), netns, libvirt)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    // Leave nothing running behind a failed start.
                    let _ = down(&dir);
                    Err(e)
                }
            }
        }
        LabCommand::Down { dir } => {
            let stopped = down(&dir)?;
            println!("lab in {}: stopped {stopped} daemon(s)", dir.display());
            Ok(())
        }
        LabCommand::Status { dir } => status(&dir),
        LabCommand::Kill { node, dir } => {
            let node_dir = lab_node_dir(&dir, &node)?;
            // In a lab of namespaces, the node's whole namespace too.
            let n = crate::daemon::fence::power_off(&node_dir).map_err(anyhow::Error::msg)?;
            println!("{node}: powered off ({n} process(es) killed)");
            Ok(())
        }
        LabCommand::Start { node, dir } => {
            let node_dir = lab_node_dir(&dir, &node)?;
            if let Some(pid) = crate::daemon::fence::lab_daemon_pid(&node_dir) {
                anyhow::bail!("{node}: its daemon already runs (pid {pid})");
            }
            let dir = dir.canonicalize()?;
            let pid = spawn_daemon(&dir, &node)?;
            println!("{node}: daemon started (pid {pid})");
            Ok(())
        }
        LabCommand::Partition { node, link, dir } => {
            let node_dir = lab_node_dir(&dir, &node)?;
            let index = match &link {
                None => None,
                Some(l) => Some(
                    l.strip_prefix("link")
                        .and_then(|i| i.parse::<u8>().ok())
                        .with_context(|| {
                            format!("--link: {l:?} is not a link name (link0, link1, ...)")
                        })?,
                ),
            };
            let what = link.clone().unwrap_or_else(|| "all".to_string());
            if let Some(rec) = netns::load(&dir.canonicalize()?)? {
                netns::set_links(&rec, &node, index, false)?;
                println!("{node}: {what} cut (switch port down)");
                return Ok(());
            }
            write_file(
                &node_dir.join(crate::daemon::fence::LAB_CUT_FILE),
                format!("{what}\n").as_bytes(),
                false,
            )?;
            println!("{node}: {what} cut");
            Ok(())
        }
        LabCommand::Heal { dir } => {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("{}: no lab here", dir.display()))?;
            if let Some(rec) = netns::load(&dir)? {
                for n in &rec.nodes {
                    let down = netns::link_states(&rec, &n.name)?.iter().any(|(_, up)| !up);
                    if down {
                        netns::set_links(&rec, &n.name, None, true)?;
                        println!("{}: healed", n.name);
                    }
                }
                return Ok(());
            }
            for (name, node_dir) in node_dirs(&dir) {
                let f = node_dir.join(crate::daemon::fence::LAB_CUT_FILE);
                if f.exists() {
                    std::fs::remove_file(&f)
                        .with_context(|| format!("cannot remove {}", f.display()))?;
                    println!("{name}: healed");
                }
            }
            Ok(())
        }
    }
}

/// The directory of lab node `node`, which must exist.
fn lab_node_dir(dir: &Path, node: &str) -> anyhow::Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}: no lab here", dir.display()))?;
    let node_dir = dir.join(node);
    if node.contains('/') || !node_dir.join("node.toml").exists() {
        anyhow::bail!("{}: the lab has no node {node:?}", dir.display());
    }
    Ok(node_dir)
}

fn node_name(i: u8) -> String {
    format!("n{i}")
}

/// A free port on `ip`, as the kernel picks it.
fn free_port(ip: &str) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("cannot bind {ip}"))?;
    Ok(l.local_addr()?.port())
}

fn addrs_for(i: u8) -> anyhow::Result<Vec<String>> {
    let host = 10 + u16::from(i);
    let mut out = Vec::new();
    for net in ["127.0.0", "127.0.1"] {
        let ip = format!("{net}.{host}");
        out.push(format!("{ip}:{}", free_port(&ip)?));
    }
    Ok(out)
}

fn pidfile(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("daemon.pid")
}

/// Starts the daemon of node `name` of the lab in `dir` (canonical), in the node's
/// namespace when the lab has them.
pub fn spawn_daemon(dir: &Path, name: &str) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let node_dir = dir.join(name);
    let log = std::fs::File::create(node_dir.join("daemon.log"))
        .with_context(|| format!("cannot create {}/daemon.log", node_dir.display()))?;
    let exe = std::env::current_exe()?;
    // `ip netns exec` execs the daemon in place: the pid stays the daemon's.
    let rec = netns::load(dir)?;
    let ns = match &rec {
        Some(rec) => Some(rec.node(name)?.netns.as_str()),
        None => None,
    };
    // The node's hypervisor first, as a host's libvirtd runs before the cluster.
    let libvirt_uri = libvirt::start(&node_dir, ns)?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    if let Some(uri) = libvirt_uri {
        cmd.env("LIBVIRT_DEFAULT_URI", uri);
    }
    let child = cmd
        .arg("daemon")
        .arg("--lab")
        .arg("--dir")
        .arg(&node_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the daemon outlives `lab up` and a Ctrl-C in its terminal.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the daemon of {name}"))?;
    let pid = child.id();
    write_file(&pidfile(dir, name), format!("{pid}\n").as_bytes(), false)?;
    Ok(pid)
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {STEP_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn up(
    nodes: u8,
    dir: &Path,
    guest: Option<&Path>,
    netns: bool,
    libvirt: bool,
) -> anyhow::Result<()> {
    let (client_path, report) = start_lab(nodes, dir, guest, netns, libvirt).await?;
    print!("{}", super::status::render(&report));
    let c = client_path.display();
    let dir = dir.canonicalize()?;
    println!(
        "\nThe lab is up ({} nodes, logs in {}/NODE/daemon.log). Try:",
        nodes,
        dir.display()
    );
    println!("  export HAVEN_CONFIG={c}");
    println!("  haven status");
    println!("  haven config show > cluster.toml   # edit, then: haven config apply cluster.toml");
    println!("  haven node standby n2");
    if guest.is_some() && !libvirt && nodes >= 2 {
        // vm1 boots from vol1 on whichever replica was promoted: n1 or n2.
        println!(
            "  haven volume status --control {}/n1/resources/vol1.ctl   # vol1's replica on n1: role, peers, sync",
            dir.display()
        );
        println!(
            "  haven resource move vm1 n2          # (or n1) a live migration with its volume"
        );
        println!(
            "  haven lab kill n1 --dir {}   # power vm1's node off: fenced, vm1 boots on the other replica",
            dir.display()
        );
    }
    if let Some(rec) = netns::load(&dir)? {
        println!(
            "  haven lab partition n2 --dir {0}   # its switch ports go down; lab heal --dir {0}",
            dir.display()
        );
        let names: Vec<String> = rec
            .nodes
            .iter()
            .map(|n| format!("{} in {}", n.name, n.netns))
            .collect();
        println!(
            "  ip netns exec NETNS ...            # look inside a node: {}",
            names.join(", ")
        );
    }
    println!("  haven lab down --dir {}", dir.display());
    Ok(())
}

/// Starts a lab of `nodes` daemons in `dir` and returns its client.toml and first
/// quorate status. On error, what was started is still running: call [`down`].
pub async fn start(
    nodes: u8,
    dir: &Path,
    guest: Option<&Path>,
) -> anyhow::Result<(PathBuf, StatusReport)> {
    start_lab(nodes, dir, guest, false, false).await
}

/// As [`start`], with each node in a network namespace when `netns`, and a libvirt
/// daemon of its own when `libvirt`.
pub async fn start_lab(
    nodes: u8,
    dir: &Path,
    guest: Option<&Path>,
    netns: bool,
    libvirt: bool,
) -> anyhow::Result<(PathBuf, StatusReport)> {
    if dir.join("client.toml").exists() {
        anyhow::bail!(
            "{} already holds a lab; run `haven lab down --dir {0}` and remove it first",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let rec = if netns {
        Some(netns::create(&dir, nodes)?)
    } else {
        None
    };
    let addrs_for = |i: u8| -> anyhow::Result<Vec<String>> {
        match &rec {
            Some(r) => Ok(r.node(&node_name(i))?.addrs.clone()),
            None => addrs_for(i),
        }
    };
    let mut all_addrs = Vec::new();
    let first = addrs_for(1)?;
    let client_path = super::cluster::init(
        &dir.join(node_name(1)),
        &node_name(1),
        &first,
        "lab",
        Some(&dir),
    )?;
    if libvirt {
        libvirt::prepare(&dir.join(node_name(1)), ip_of(&first)?)?;
    }
    all_addrs.push(first);
    spawn_daemon(&dir, &node_name(1))?;
    let client = Client::load(&client_path)?;
    wait_for("node n1 to found the cluster", async || {
        let c: ConfigReply = client.call(api::CONFIG, &Empty {}).await.ok()?;
        (c.version >= 1).then_some(())
    })
    .await?;
    let seed = all_addrs[0][0].clone();
    for i in 2..=nodes {
        let name = node_name(i);
        let addrs = addrs_for(i)?;
        let token: JoinTokenReply = client
            .call(api::JOIN_TOKEN, &JoinTokenRequest { ttl_secs: 300 })
            .await?;
        super::cluster::join(
            &dir.join(&name),
            &name,
            &addrs,
            false,
            false,
            &seed,
            &token.token,
        )
        .await
        .with_context(|| format!("joining {name}"))?;
        if libvirt {
            libvirt::prepare(&dir.join(&name), ip_of(&addrs)?)?;
        }
        spawn_daemon(&dir, &name)?;
        all_addrs.push(addrs);
    }

    // Every node is a server for the CLI, so it keeps working when n1 is down.
    let mut ct: ClientToml = toml::from_str(&std::fs::read_to_string(&client_path)?)?;
    ct.servers = all_addrs.iter().map(|a| a[0].clone()).collect();
    write_file(&client_path, toml::to_string(&ct)?.as_bytes(), false)?;
    let client = Client::load(&client_path)?;

    let current: ConfigReply = client.call(api::CONFIG, &Empty {}).await?;
    let vm = match guest {
        Some(g) if libvirt => Some(DemoVm::Libvirt(libvirt::write_demo_domain(&dir, g)?)),
        Some(g) => Some(DemoVm::Qemu(g, demo_volume(&all_addrs, rec.is_some())?)),
        None => None,
    };
    let demo = demo_config(&dir, &all_addrs, vm);
    let _: ConfigReply = client
        .call(
            api::CONFIG_APPLY,
            &ApplyConfig {
                based_on: current.version,
                text: demo,
            },
        )
        .await
        .context("applying the demo configuration")?;

    let n = usize::from(nodes);
    let report = wait_for(
        "every node to be online and a voter, with quorum",
        async || {
            let r: StatusReport = client.call(api::STATUS, &Empty {}).await.ok()?;
            let ready = r.quorate
                && r.nodes.len() == n
                && r.nodes
                    .iter()
                    .all(|x| x.state == "online" && x.role == "voter");
            ready.then_some(r)
        },
    )
    .await?;
    Ok((client_path, report))
}

/// A few supervised processes and a group, on the lab's nodes.
/// The guest for `--vms`, checked before anything starts.
fn guest(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = dir.context(
        "--vms needs a guest: build one with scripts/build-guest and pass --guest-dir (or set HAVEN_GUEST_DIR)",
    )?;
    for f in ["vmlinux", "initramfs.cpio"] {
        if !dir.join(f).is_file() {
            anyhow::bail!(
                "--guest-dir {}: {f} is missing (scripts/build-guest makes it)",
                dir.display()
            );
        }
    }
    Ok(dir.canonicalize()?)
}

/// The node's first address's IP: where it receives live migrations.
fn ip_of(addrs: &[String]) -> anyhow::Result<&str> {
    addrs
        .first()
        .and_then(|a| a.rsplit_once(':'))
        .map(|(ip, _)| ip)
        .context("a lab node without an address")
}

/// The demo's guest: Haven's own QEMU driver (on a replicated volume when the lab has
/// two nodes to hold its replicas), or a libvirt domain (its XML's path).
enum DemoVm<'a> {
    Qemu(&'a Path, Option<DemoVolume>),
    Libvirt(PathBuf),
}

/// The demo guest's disk: a volume with replicas on n1 and n2.
struct DemoVolume {
    /// `NODE=IP:PORT` for n1 and n2, the `replicas` param.
    replicas: String,
    /// Netns nodes replicate over their namespaces' 10.x addresses.
    non_loopback: bool,
}

/// Replication port inside a netns lab: each node has its namespace to itself.
const NETNS_VOLUME_PORT: u16 = 7790;

/// `vol1`'s replicas on n1 and n2, on each node's last link (the one a real cluster
/// would give to replication); none with fewer than two nodes.
fn demo_volume(addrs: &[Vec<String>], in_netns: bool) -> anyhow::Result<Option<DemoVolume>> {
    if addrs.len() < 2 {
        return Ok(None);
    }
    let mut replicas = Vec::new();
    for (i, a) in addrs.iter().take(2).enumerate() {
        let ip = a
            .last()
            .and_then(|x| x.rsplit_once(':'))
            .map(|(ip, _)| ip)
            .context("a lab node without an address")?;
        // Loopback labs share the host's ports with each other: ask the kernel.
        let port = if in_netns {
            NETNS_VOLUME_PORT
        } else {
            free_port(ip)?
        };
        replicas.push(format!("{}={ip}:{port}", node_name(i as u8 + 1)));
    }
    Ok(Some(DemoVolume {
        replicas: replicas.join(" "),
        non_loopback: in_netns,
    }))
}

fn demo_config(dir: &Path, addrs: &[Vec<String>], vm: Option<DemoVm>) -> String {
    // Fencing is on, as in production: a lost node is powered off by the lab's switch
    // (its daemon and every process it started are killed) before anything of it is
    // recovered elsewhere.
    let mut s = format!(
        "# Haven lab demo: supervised processes and an ordered group (and with --vms, a guest).\n\
         [options]\nstonith-enabled = true\nno-quorum-policy = \"stop\"\nresource-stickiness = 100\n\
         \n[[fencing.devices]]\nid = \"lab-power\"\nagent = \"lab\"\nparams = {{ lab-dir = \"{}\" }}\n",
        dir.display()
    );
    for (i, a) in addrs.iter().enumerate() {
        let ips: Vec<String> = a
            .iter()
            .filter_map(|x| x.rsplit_once(':').map(|(ip, _)| format!("\"{ip}\"")))
            .collect();
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{}\"\naddrs = [{}]\n",
            node_name(i as u8 + 1),
            ips.join(", ")
        ));
    }
    for id in ["db", "web", "worker"] {
        s.push_str(&format!(
            "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\nparams = {{ command = \"sleep 1000000\" }}\nops = [{{ name = \"monitor\", interval = 2, timeout = 10 }}]\n"
        ));
    }
    s.push_str("\n[[groups]]\nid = \"app\"\nmembers = [\"db\", \"web\"]\n");
    if let Some(DemoVm::Libvirt(xml)) = &vm {
        // The same guest under libvirt. Each node's daemon names its own libvirt
        // (LIBVIRT_DEFAULT_URI), so no `hypervisor` param; `remoteuri` is the target's.
        // The disk is one file both "hosts" see, which libvirt cannot know is shared.
        s.push_str(&format!(
            "\n[[resources]]\nid = \"vm1\"\nclass = \"ocf\"\nprovider = \"heartbeat\"\ntype = \"VirtualDomain\"\n\
             params = {{ config = \"{}\", remoteuri = \"{}\", migrate_options = \"--unsafe\" }}\n\
             meta = {{ allow-migrate = true }}\n\
             ops = [{{ name = \"start\", timeout = 120 }}, {{ name = \"stop\", timeout = 60 }}, \
             {{ name = \"monitor\", interval = 5, timeout = 30 }}, {{ name = \"migrate_to\", timeout = 120 }}]\n",
            xml.display(),
            libvirt::remote_uri(dir)
        ));
    }
    if let Some(DemoVm::Qemu(g, volume)) = vm {
        if let Some(v) = &volume {
            s.push_str(&volume_demo(v, addrs.len()));
        }
        // A TCG guest (the lab cannot count on KVM); start waits for its ready line.
        // On the volume it migrates live; without one it has no disk and just restarts.
        let (disk, meta) = match volume {
            Some(_) => (", volume = \"vol1\"", "meta = { allow-migrate = true }\n"),
            None => ("", ""),
        };
        s.push_str(&format!(
            "\n[[resources]]\nid = \"vm1\"\nclass = \"qemu\"\ntype = \"vm\"\n\
             params = {{ kernel = \"{}\", initrd = \"{}\", append = \"console=ttyS0 panic=-1 quiet\", \
             accel = \"tcg\", memory = \"128\", ready_marker = \"HAVEN-GUEST-UP\"{disk} }}\n{meta}\
             ops = [{{ name = \"start\", timeout = 120 }}, {{ name = \"stop\", timeout = 30 }}, \
             {{ name = \"monitor\", interval = 5, timeout = 10 }}, \
             {{ name = \"migrate_to\", timeout = 120 }}, {{ name = \"migrate_from\", timeout = 120 }}]\n",
            g.join("vmlinux").display(),
            g.join("initramfs.cpio").display()
        ));
        if volume.is_some() {
            s.push_str(
                "\n# The guest runs where its disk is primary, and starts after the promotion.\n\
                 [[constraints.colocation]]\nid = \"vm1-with-primary\"\nrsc = \"vm1\"\n\
                 with = \"vol1-clone\"\nwith-role = \"Promoted\"\nscore = \"INFINITY\"\n\
                 \n[[constraints.order]]\nid = \"promote-before-vm1\"\nfirst = \"vol1-clone\"\n\
                 first-action = \"promote\"\nthen = \"vm1\"\nthen-action = \"start\"\n",
            );
        }
    }
    s
}

/// `vol1`, a promotable clone of two replicas on n1 and n2 (examples/volume-guest.toml
/// on the lab's addresses); the other `nodes` never run it.
fn volume_demo(v: &DemoVolume, nodes: usize) -> String {
    // Small, so the second replica's first full sync takes a moment.
    let mut s = format!(
        "\n# The guest's disk: a replicated volume (n1's replica is the initial one, n2's\n\
         # gets a full sync), replicating over mutual TLS with the nodes' certificates.\n\
         [[resources]]\nid = \"vol1\"\nclass = \"volume\"\ntype = \"volume\"\n\
         params = {{ replicas = \"{}\", size = \"16M\"{} }}\n\
         ops = [{{ name = \"start\", timeout = 60 }}, {{ name = \"promote\", timeout = 60 }}, \
         {{ name = \"monitor\", interval = 2, timeout = 10 }}]\n\
         \n[[clones]]\nid = \"vol1-clone\"\nchild = \"vol1\"\nclone-max = 2\npromotable = true\npromoted-max = 1\n",
        v.replicas,
        if v.non_loopback {
            ", allow_non_loopback = \"true\""
        } else {
            ""
        }
    );
    for i in 3..=nodes {
        let n = node_name(i as u8);
        s.push_str(&format!(
            "\n[[constraints.location]]\nid = \"vol1-not-{n}\"\nrsc = \"vol1-clone\"\nnode = \"{n}\"\nscore = \"-INFINITY\"\n"
        ));
    }
    // Either replica may be primary (stickiness keeps it); one not UpToDate refuses.
    for n in ["n1", "n2"] {
        s.push_str(&format!(
            "\n[[constraints.location]]\nid = \"vol1-primary-{n}\"\nrsc = \"vol1-clone\"\nrole = \"Promoted\"\nnode = \"{n}\"\nscore = \"10\"\n"
        ));
    }
    s
}

/// The lab's daemon pidfiles, by node directory.
fn pidfiles(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path().join("daemon.pid");
            if p.exists() {
                out.push((e.file_name().to_string_lossy().into_owned(), p));
            }
        }
    }
    out.sort();
    out
}

/// The pid in `pidfile`, if that process is still the lab's daemon for `node_dir` (a
/// recycled pid belonging to something else is never signalled).
fn live_daemon(pidfile: &Path, node_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = node_dir.to_string_lossy();
    (args.iter().any(|a| a == "daemon") && args.iter().any(|a| *a == dir)).then_some(pid)
}

/// Stops every daemon of the lab in `dir`: SIGTERM, then SIGKILL after 30 s; a netns
/// lab's namespaces, bridges and veths go too.
pub fn down(dir: &Path) -> anyhow::Result<usize> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}: no lab here", dir.display()))?;
    let mut stopped = 0;
    for (name, pf) in pidfiles(&dir) {
        let node_dir = dir.join(&name);
        if let Some(pid) = live_daemon(&pf, &node_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            // A daemon stops its resources before it exits (guests shut down over ACPI).
            let deadline = Instant::now() + Duration::from_secs(30);
            while live_daemon(&pf, &node_dir).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if live_daemon(&pf, &node_dir).is_some() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            stopped += 1;
        }
        let _ = std::fs::remove_file(&pf);
    }
    // After the daemons, which stop their guests through it.
    for (name, node_dir) in node_dirs(&dir) {
        if let Err(e) = libvirt::stop(&node_dir) {
            eprintln!("{name}: stopping its libvirtd: {e:#}");
        }
    }
    stop_resources(&dir);
    netns::destroy(&dir)?;
    Ok(stopped)
}

/// Stops the supervised processes the lab's agents left behind (their daemons are gone,
/// so nobody else will): each through its pidfile, which haven-exec checks still names
/// the process it started.
fn stop_resources(dir: &Path) {
    let Ok(rt) = tokio::runtime::Runtime::new() else {
        return;
    };
    for (name, _) in node_dirs(dir) {
        let state_dir = dir.join(&name).join("resources");
        let Ok(entries) = std::fs::read_dir(&state_dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let Some(instance) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            let spec = haven_exec::AgentSpec::new(
                instance.clone(),
                haven_exec::AgentClass::Process,
                state_dir.clone(),
            );
            let r = rt.block_on(haven_exec::run_op(
                &spec,
                haven_exec::Op::Stop,
                Duration::from_secs(10),
            ));
            if r.code != haven_exec::OpCode::Success {
                eprintln!(
                    "{name}: stopping {instance}: {:?} {}",
                    r.code,
                    r.notes.join(" ")
                );
            }
        }
    }
}

/// The lab's node directories (those with a node.toml).
fn node_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().join("node.toml").exists() {
                out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
            }
        }
    }
    out.sort();
    out
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}: no lab here", dir.display()))?;
    let rec = netns::load(&dir)?;
    for (name, pf) in pidfiles(&dir) {
        match live_daemon(&pf, &dir.join(&name)) {
            Some(pid) => print!("{name}: daemon running (pid {pid})"),
            None => print!("{name}: daemon NOT running"),
        }
        match rec
            .as_ref()
            .map(|r| (r.node(&name), netns::link_states(r, &name)))
        {
            Some((Ok(n), Ok(links))) => {
                let links: Vec<String> = links
                    .iter()
                    .map(|(l, up)| format!("link{l} {}", if *up { "up" } else { "CUT" }))
                    .collect();
                println!("  netns {}  {}", n.netns, links.join(", "));
            }
            Some((Err(e), _) | (_, Err(e))) => println!("  netns: {e}"),
            None => println!(),
        }
    }
    let report = super::status::fetch(Some(dir.join("client.toml")))?;
    print!("{}", super::status::render(&report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<Vec<String>> {
        (1..=n)
            .map(|i| {
                vec![
                    format!("127.0.0.{}:7000", 10 + i),
                    format!("127.0.1.{}:7001", 10 + i),
                ]
            })
            .collect()
    }

    fn demo(nodes: u8, in_netns: bool) -> haven_model::Config {
        let a = addrs(nodes);
        let volume = demo_volume(&a, in_netns).expect("addresses");
        let text = demo_config(
            Path::new("/lab"),
            &a,
            Some(DemoVm::Qemu(Path::new("/g"), volume)),
        );
        haven_model::Config::from_toml("demo", &text).expect("the demo configuration parses")
    }

    #[test]
    fn the_vms_demo_boots_its_guest_from_a_volume_replicated_on_n1_and_n2_only() {
        let c = demo(3, false);
        let vol = c.resources.iter().find(|r| r.id == "vol1").expect("vol1");
        let replicas = &vol.params["replicas"];
        assert!(
            replicas.starts_with("n1=127.0.1.11:") && replicas.contains(" n2=127.0.1.12:"),
            "{replicas}"
        );
        assert!(!vol.params.contains_key("allow_non_loopback"));
        let vm = c.resources.iter().find(|r| r.id == "vm1").expect("vm1");
        assert_eq!(vm.params["volume"], "vol1");
        let banned: Vec<&str> = c
            .constraints
            .location
            .iter()
            .filter(|l| l.score == Some(haven_model::Score::NEG_INFINITY))
            .filter_map(|l| l.node.as_deref())
            .collect();
        assert_eq!(banned, ["n3"]);
        assert!(
            c.constraints
                .colocation
                .iter()
                .any(|x| x.rsc.as_deref() == Some("vm1") && x.with.as_deref() == Some("vol1-clone"))
        );
    }

    #[test]
    fn a_netns_lab_replicates_on_its_namespace_addresses_and_one_node_has_no_volume() {
        let c = demo(2, true);
        let vol = c.resources.iter().find(|r| r.id == "vol1").expect("vol1");
        assert_eq!(vol.params["allow_non_loopback"], "true");
        assert!(c.constraints.location.iter().all(|l| l.role.is_some()));
        let c = demo(1, false);
        assert!(c.resources.iter().all(|r| r.id != "vol1"));
        let vm = c.resources.iter().find(|r| r.id == "vm1").expect("vm1");
        assert!(!vm.params.contains_key("volume"));
    }
}
