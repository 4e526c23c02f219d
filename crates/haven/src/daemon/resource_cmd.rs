//! `haven resource start|stop|move|clear|cleanup ID`.
//!
//! start/stop/move/clear are configuration changes (Pacemaker's target-role and
//! cli-prefer location), applied with the same compare-and-set as `config apply`; if
//! another change lands in between, the edit is redone on the new version. Only the
//! changed fields are rewritten in the stored text (haven_model::edit), so the
//! operator's comments and layout stay.

use std::path::PathBuf;

use clap::Subcommand;
use haven_model::config::{Location, Role};
use haven_model::{Config, Score};

use super::api;
use super::client::Client;
use super::protocol::{Cleanup, Empty};

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
    /// Let the cluster run it (clears target-role=Stopped)
    Start { id: String },
    /// Stop it everywhere (target-role=Stopped)
    Stop { id: String },
    /// Prefer NODE for it (a location constraint cli-prefer-ID, score INFINITY)
    Move { id: String, node: String },
    /// Remove what `move` added
    Clear { id: String },
    /// Forget its failures and re-probe it everywhere
    Cleanup { id: String },
}

fn set_role(config: &mut Config, id: &str, role: Option<Role>) -> anyhow::Result<()> {
    if let Some(p) = config.resources.iter_mut().find(|p| p.id == id) {
        p.meta.target_role = role;
    } else if let Some(g) = config.groups.iter_mut().find(|g| g.id == id) {
        g.meta.target_role = role;
    } else if let Some(c) = config.clones.iter_mut().find(|c| c.id == id) {
        c.meta.target_role = role;
    } else {
        anyhow::bail!("no resource, group or clone named {id:?} in the configuration");
    }
    Ok(())
}

fn prefer_id(id: &str) -> String {
    format!("cli-prefer-{id}")
}

fn edit(config: &mut Config, cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Start { id } => set_role(config, id, None),
        Command::Stop { id } => set_role(config, id, Some(Role::Stopped)),
        Command::Move { id, node } => {
            set_role(config, id, config_role(config, id))?;
            if !config.nodes.iter().any(|n| n.name == *node) {
                anyhow::bail!("no node named {node:?} in the configuration");
            }
            let cid = prefer_id(id);
            config.constraints.location.retain(|l| l.id != cid);
            config.constraints.location.push(Location {
                id: cid,
                rsc: id.clone(),
                node: Some(node.clone()),
                score: Some(Score::INFINITY),
                ..Location::default()
            });
            Ok(())
        }
        Command::Clear { id } => {
            let cid = prefer_id(id);
            let before = config.constraints.location.len();
            config.constraints.location.retain(|l| l.id != cid);
            if before == config.constraints.location.len() {
                anyhow::bail!("{id} has no {cid} constraint to clear");
            }
            Ok(())
        }
        Command::Cleanup { .. } => Ok(()),
    }
}

/// The current target role (so `move` checks the id exists without changing it).
fn config_role(config: &Config, id: &str) -> Option<Role> {
    config
        .resources
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.meta.target_role)
        .or_else(|| {
            config
                .groups
                .iter()
                .find(|g| g.id == id)
                .map(|g| g.meta.target_role)
        })
        .or_else(|| {
            config
                .clones
                .iter()
                .find(|c| c.id == id)
                .map(|c| c.meta.target_role)
        })
        .flatten()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::from_arg(args.config)?;
        match apply(&client, args.command).await? {
            Applied::CleanedUp(id) => println!("{id}: failures cleared, re-probing"),
            Applied::Version(version) => println!("done: configuration version {version}"),
        }
        Ok(())
    })
}

/// What [`apply`] did.
pub enum Applied {
    /// Failures of this resource cleared; it is being re-probed.
    CleanedUp(String),
    /// The configuration version that holds the change.
    Version(u64),
}

/// Carries out `cmd` (the CLI's and the dashboard's shared path).
pub async fn apply(client: &Client, cmd: Command) -> anyhow::Result<Applied> {
    if let Command::Cleanup { id } = cmd {
        let _: Empty = client
            .call(
                api::CLEANUP,
                &Cleanup {
                    resource: id.clone(),
                },
            )
            .await?;
        return Ok(Applied::CleanedUp(id));
    }
    let version = super::client::edit_config(client, |c| edit(c, &cmd)).await?;
    Ok(Applied::Version(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[[nodes]]\nname = \"n1\"\n\n[[resources]]\nid = \"web\"\nclass = \"process\"\ntype = \"web\"\nparams = { command = \"sleep 1\" }\n";

    #[test]
    fn stop_start_move_and_clear_edit_the_configuration() {
        let mut c = Config::from_toml("t", BASE).unwrap();
        edit(&mut c, &Command::Stop { id: "web".into() }).unwrap();
        assert_eq!(c.resources[0].meta.target_role, Some(Role::Stopped));
        edit(&mut c, &Command::Start { id: "web".into() }).unwrap();
        assert_eq!(c.resources[0].meta.target_role, None);
        edit(
            &mut c,
            &Command::Move {
                id: "web".into(),
                node: "n1".into(),
            },
        )
        .unwrap();
        assert_eq!(c.constraints.location[0].node.as_deref(), Some("n1"));
        let again = Config::from_toml("t", &c.to_toml().unwrap()).unwrap();
        assert_eq!(again.constraints.location.len(), 1);
        edit(&mut c, &Command::Clear { id: "web".into() }).unwrap();
        assert!(c.constraints.location.is_empty());
    }

    #[test]
    fn a_move_away_from_a_failback_home_is_accepted() {
        // The scheduler weighs a failback home below the move's INFINITY
        // (haven-sched's home_failback tests), so the move takes effect.
        let text = format!("{BASE}home = \"n1\"\nfailback = true\n\n[[nodes]]\nname = \"n2\"\n");
        let mut c = Config::from_toml("t", &text).unwrap();
        edit(
            &mut c,
            &Command::Move {
                id: "web".into(),
                node: "n2".into(),
            },
        )
        .unwrap();
        assert_eq!(c.constraints.location[0].node.as_deref(), Some("n2"));
    }

    #[test]
    fn unknown_ids_and_nodes_are_refused() {
        let mut c = Config::from_toml("t", BASE).unwrap();
        assert!(edit(&mut c, &Command::Stop { id: "nope".into() }).is_err());
        assert!(
            edit(
                &mut c,
                &Command::Move {
                    id: "web".into(),
                    node: "n9".into()
                }
            )
            .is_err()
        );
        assert!(edit(&mut c, &Command::Clear { id: "web".into() }).is_err());
    }
}
