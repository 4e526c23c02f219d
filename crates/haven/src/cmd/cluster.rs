use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use haven_net::ca::CertRole;
use haven_net::{ClusterCa, JoinToken, RpcClient};

use crate::daemon::api;
use crate::daemon::client::Client;
use crate::daemon::files::{self, NodeDir, NodeToml, Timers};
use crate::daemon::protocol::{JoinReply, JoinRequest, JoinTokenReply, JoinTokenRequest};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a cluster: its CA, this node's certificate, a one-voter Raft group
    Init {
        /// The new node's directory (must not hold a node yet)
        #[arg(long)]
        dir: PathBuf,
        /// This node's name
        #[arg(long)]
        name: String,
        /// IP:PORT of each link, in order (repeat for a second heartbeat network)
        #[arg(long = "addr", required = true)]
        addrs: Vec<String>,
        /// The cluster's name
        #[arg(long, default_value = "haven")]
        cluster: String,
        /// Where to write client.toml for the CLI (default: DIR)
        #[arg(long)]
        client_dir: Option<PathBuf>,
    },
    /// Issue a single-use, expiring join token
    JoinToken {
        #[arg(long, env = "HAVEN_CONFIG")]
        config: Option<PathBuf>,
        /// Seconds until the token expires
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Join this host to a cluster (then start `haven daemon --dir DIR`)
    Join {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long = "addr", required = true)]
        addrs: Vec<String>,
        /// Join as a non-voting member
        #[arg(long)]
        learner: bool,
        /// Join as a witness: a voter that runs nothing
        #[arg(long, conflicts_with = "learner")]
        witness: bool,
        /// Address (IP:PORT) of any member
        seed: String,
        /// The token from `haven cluster join-token`
        token: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init {
            dir,
            name,
            addrs,
            cluster,
            client_dir,
        } => {
            let client = init(&dir, &name, &addrs, &cluster, client_dir.as_deref())?;
            println!("Cluster {cluster} created in {}.", dir.display());
            println!("Start it:   haven daemon --dir {}", dir.display());
            println!("Then:       HAVEN_CONFIG={} haven status", client.display());
            Ok(())
        }
        Command::JoinToken { config, ttl } => {
            let rt = tokio::runtime::Runtime::new()?;
            let reply: JoinTokenReply = rt.block_on(async {
                Client::from_arg(config)?
                    .call(api::JOIN_TOKEN, &JoinTokenRequest { ttl_secs: ttl })
                    .await
            })?;
            println!("{}", reply.token);
            Ok(())
        }
        Command::Join {
            dir,
            name,
            addrs,
            learner,
            witness,
            seed,
            token,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(join(&dir, &name, &addrs, learner, witness, &seed, &token))?;
            println!(
                "Joined as {name}. Start it: haven daemon --dir {}",
                dir.display()
            );
            Ok(())
        }
    }
}

/// The name goes into the node's certificate, so it must be one a certificate can carry.
fn check_name(name: &str) -> anyhow::Result<()> {
    if !haven_net::identity::valid_name(name) {
        anyhow::bail!("--name {name:?}: a node name is 1–63 characters of [A-Za-z0-9._-]");
    }
    Ok(())
}

fn check_addrs(addrs: &[String]) -> anyhow::Result<()> {
    for (i, a) in addrs.iter().enumerate() {
        a.parse::<std::net::SocketAddr>()
            .map_err(|_| anyhow::anyhow!("--addr #{}: {a:?} is not IP:PORT", i + 1))?;
    }
    Ok(())
}

/// Creates a founding node in `dir`; returns the client.toml path.
pub fn init(
    dir: &std::path::Path,
    name: &str,
    addrs: &[String],
    cluster: &str,
    client_dir: Option<&std::path::Path>,
) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    check_addrs(addrs)?;
    let nd = NodeDir::new(dir);
    nd.create()?;
    let ca = ClusterCa::generate(cluster)?;
    let cert = ca.issue(name, CertRole::Node)?;
    files::write_file(&nd.ca(), ca.cert_pem().as_bytes(), false)?;
    files::write_file(&nd.ca_key(), ca.key_pem().as_bytes(), true)?;
    files::write_file(&nd.cert(), cert.cert_pem.as_bytes(), false)?;
    files::write_file(&nd.key(), cert.key_pem.as_bytes(), true)?;
    nd.save(&NodeToml {
        name: name.to_string(),
        id: 1,
        cluster: cluster.to_string(),
        addrs: addrs.to_vec(),
        witness: false,
        learner: false,
        bootstrap: true,
        seeds: Vec::new(),
        timers: Timers::default(),
    })?;
    files::write_client(client_dir.unwrap_or(dir), &ca, vec![addrs[0].clone()])
}

/// Asks `seed` to admit this host with `token`, and writes the node directory.
pub async fn join(
    dir: &std::path::Path,
    name: &str,
    addrs: &[String],
    learner: bool,
    witness: bool,
    seed: &str,
    token: &str,
) -> anyhow::Result<()> {
    check_name(name)?;
    check_addrs(addrs)?;
    let parsed: JoinToken = token.parse()?;
    let nd = NodeDir::new(dir);
    nd.create()?;
    let rpc = RpcClient::new(
        haven_net::tls::pinned_client_config(&parsed.ca_fingerprint)?,
        Duration::from_secs(15),
    );
    let reply: JoinReply = rpc
        .call(
            seed,
            api::JOIN,
            &JoinRequest {
                token: token.trim().to_string(),
                name: name.to_string(),
                addrs: addrs.to_vec(),
                witness,
                learner,
            },
        )
        .await
        .map_err(|e| match e {
            haven_net::RpcError::Remote { message, .. } => anyhow::anyhow!("{message}"),
            e => anyhow::anyhow!(e),
        })
        .with_context(|| format!("joining via {seed}"))?;
    let want = haven_net::PeerIdentity::new(
        &reply.cluster,
        if witness {
            CertRole::Witness
        } else {
            CertRole::Node
        },
        name,
    );
    let issued = haven_net::TlsIdentity::from_pem(
        &reply.ca_pem,
        &reply.cert_pem,
        &reply.key_pem,
        &format!("the certificate {seed} issued"),
    )?;
    if issued.identity().as_ref() != Some(&want) {
        anyhow::bail!(
            "joining via {seed}: the cluster issued a certificate for {}, not for {want}; no node files were written",
            issued
                .identity()
                .map_or("no one".to_string(), |i| i.to_string())
        );
    }
    files::write_file(&nd.ca(), reply.ca_pem.as_bytes(), false)?;
    files::write_file(&nd.ca_key(), reply.ca_key_pem.as_bytes(), true)?;
    files::write_file(&nd.cert(), reply.cert_pem.as_bytes(), false)?;
    files::write_file(&nd.key(), reply.key_pem.as_bytes(), true)?;
    let mut seeds = reply.seeds;
    if !seeds.iter().any(|s| s == seed) {
        seeds.push(seed.to_string());
    }
    nd.save(&NodeToml {
        name: name.to_string(),
        id: reply.id,
        cluster: reply.cluster,
        addrs: addrs.to_vec(),
        witness,
        learner,
        bootstrap: false,
        seeds,
        timers: Timers::default(),
    })
}
