//! `haven node standby|online|maintenance NODE`.

use std::path::PathBuf;

use clap::Subcommand;

use super::api;
use super::client::Client;
use super::protocol::{Empty, NodeAttrs};

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
    let req = match args.command {
        Command::Standby { node } => NodeAttrs {
            name: node,
            standby: Some(true),
            maintenance: None,
        },
        Command::Online { node } => NodeAttrs {
            name: node,
            standby: Some(false),
            maintenance: Some(false),
        },
        Command::Maintenance { node } => NodeAttrs {
            name: node,
            standby: None,
            maintenance: Some(true),
        },
    };
    let name = req.name.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let _: Empty = rt.block_on(async {
        Client::from_arg(args.config)?
            .call(api::NODE_ATTRS, &req)
            .await
    })?;
    println!("{name}: done");
    Ok(())
}
