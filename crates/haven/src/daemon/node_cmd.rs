//! `haven node standby|online|maintenance NODE`: node attributes in the configuration
//! (`[[nodes]]` standby / maintenance), where the scheduler reads them.

use std::path::PathBuf;

use clap::Subcommand;

use super::client::Client;

#[derive(clap::Args)]
pub struct Args {
    /// client.toml (default: $HAVEN_CONFIG)
    #[arg(long, env = "HAVEN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Move everything off NODE and run nothing there
    Standby { node: String },
    /// Undo standby and maintenance
    Online { node: String },
    /// Leave NODE's resources alone (no starts, stops or monitors acted upon)
    Maintenance { node: String },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (name, version) = rt.block_on(async {
        let client = Client::from_arg(args.config)?;
        apply(&client, args.command).await
    })?;
    println!("{name}: done (configuration version {version})");
    Ok(())
}

/// Carries out `cmd` (the CLI's and the dashboard's shared path); returns the node and
/// the configuration version that holds the change.
pub async fn apply(client: &Client, cmd: Command) -> anyhow::Result<(String, u64)> {
    let online = matches!(cmd, Command::Online { .. });
    let (name, standby, maintenance) = match cmd {
        Command::Standby { node } => (node, Some(true), None),
        Command::Online { node } => (node, Some(false), Some(false)),
        Command::Maintenance { node } => (node, None, Some(true)),
    };
    let version = super::client::edit_config(client, |config| {
        let node = config
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!("no node named {name:?} in the configuration's [[nodes]]")
            })?;
        if let Some(s) = standby {
            node.standby = s;
        }
        if let Some(m) = maintenance {
            node.maintenance = m;
        }
        Ok(())
    })
    .await?;
    if online {
        // A node fenced for a fault comes back only when an operator allows it.
        let _: super::protocol::Empty = client
            .call(
                super::fence::NODE_REJOIN,
                &super::fence::NodeName { node: name.clone() },
            )
            .await?;
    }
    Ok((name, version))
}
