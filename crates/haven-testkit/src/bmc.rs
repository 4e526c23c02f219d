//! A BMC for `fence_ipmilan`: Debian openipmi's simulator `ipmi_sim` on 127.0.0.1,
//! powering a stand-in host process (`sleep`) that it starts in its own process group.

use std::path::Path;
use std::process::{Child, Command};

/// A running `ipmi_sim`, killed with its whole process group when dropped.
pub struct Bmc {
    child: Child,
    /// The UDP port its IPMI LAN interface listens on (127.0.0.1).
    pub port: u16,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Bmc {
    /// Starts a BMC in `dir` (its configuration, state and logs go there) with one
    /// admin user `admin` / `password`; the host is powered on at start.
    pub fn start(dir: &Path, password: &str) -> Bmc {
        for (bin, pkg) in [
            ("/usr/bin/ipmi_sim", "openipmi"),
            ("/usr/sbin/fence_ipmilan", "fence-agents"),
            ("/usr/bin/ipmitool", "ipmitool"),
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install -y --no-install-recommends {pkg}"
            );
        }
        let free_udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp port");
        let port = free_udp.local_addr().expect("addr").port();
        let free_tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp port");
        let serial = free_tcp.local_addr().expect("addr").port();
        drop((free_udp, free_tcp));
        // Power commands are refused without a system-interface serial channel.
        let conf = format!(
            "name \"haventest\"\n\
             set_working_mc 0x20\n\
             startlan 1\n\
             addr 127.0.0.1 {port}\n\
             priv_limit admin\n\
             allowed_auths_callback none md2 md5 straight\n\
             allowed_auths_user none md2 md5 straight\n\
             allowed_auths_operator none md2 md5 straight\n\
             allowed_auths_admin none md2 md5 straight\n\
             guid a123456789abcdefa123456789abcdef\n\
             endlan\n\
             serial 15 127.0.0.1 {serial} codec VM\n\
             startcmd \"/bin/sleep 3600\"\n\
             startnow true\n\
             poweroff_wait 2\n\
             kill_wait 2\n\
             user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n"
        );
        std::fs::write(dir.join("lan.conf"), conf).expect("lan.conf");
        std::fs::write(
            dir.join("cmds"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .expect("cmds");
        std::fs::create_dir_all(dir.join("state")).expect("state dir");
        use std::os::unix::process::CommandExt;
        let child = Command::new("/usr/bin/ipmi_sim")
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("cmds"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdout(std::fs::File::create(dir.join("sim.log")).expect("sim.log"))
            .stderr(std::fs::File::create(dir.join("sim.err")).expect("sim.err"))
            .process_group(0)
            .spawn()
            .expect("start ipmi_sim");
        Bmc { child, port }
    }

    /// Whether the simulated host (`sleep`, in the simulator's group) is powered.
    pub fn host_running(&self) -> bool {
        let pgid = self.child.id().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    return false;
                };
                let Some(close) = stat.rfind(')') else {
                    return false;
                };
                let comm = stat.split_once('(').map(|(_, r)| r).unwrap_or("");
                let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                comm.starts_with("sleep)")
                    && f.first() != Some(&"Z")
                    && f.get(2) == Some(&pgid.as_str())
            })
    }
}
