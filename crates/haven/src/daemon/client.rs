//! The CLI's connection to the cluster, from client.toml (`--config` or HAVEN_CONFIG).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use haven_net::{RpcClient, RpcError, TlsIdentity};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::files::ClientToml;

pub struct Client {
    rpc: RpcClient,
    servers: Vec<String>,
}

/// The client.toml to use: `--config`, else HAVEN_CONFIG.
pub fn config_path(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    arg.or_else(|| std::env::var_os("HAVEN_CONFIG").map(PathBuf::from))
        .context("no cluster to talk to: pass --config FILE or set HAVEN_CONFIG to a client.toml (written by `haven cluster init` and `haven lab up`)")
}

impl Client {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let c: ClientToml =
            toml::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?;
        if c.servers.is_empty() {
            anyhow::bail!(
                "{}: field servers: at least one server address is required",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let read = |field: &str, rel: &str| {
            let p = base.join(rel);
            std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "{}: field {field}: cannot read {}",
                    path.display(),
                    p.display()
                )
            })
        };
        let identity = TlsIdentity::from_pem(
            &read("ca", &c.ca)?,
            &read("cert", &c.cert)?,
            &read("key", &c.key)?,
            &path.display().to_string(),
        )?;
        Ok(Client {
            rpc: RpcClient::new(identity.client_config()?, Duration::from_secs(12)),
            servers: c.servers,
        })
    }

    pub fn from_arg(arg: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::load(&config_path(arg)?)
    }

    /// Calls the first server that answers. A refusal is final: another server would
    /// refuse the same committed state.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
    ) -> anyhow::Result<R> {
        let mut last = None;
        for server in &self.servers {
            match self.rpc.call(server, path, req).await {
                Ok(r) => return Ok(r),
                Err(RpcError::Remote { message, .. }) => anyhow::bail!("{message}"),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(anyhow::anyhow!(
                "no server of the cluster answered; last: {e}"
            )),
            None => anyhow::bail!("no servers configured"),
        }
    }
}

/// How many times an edit is redone when other changes keep landing first.
const CAS_ATTEMPTS: usize = 5;

/// Applies `edit` to the cluster's configuration with compare-and-set, redoing it on
/// the new version if another change lands in between. Returns the new version. The
/// change is written into the stored text, so the operator's comments and layout stay.
pub async fn edit_config(
    client: &Client,
    mut edit: impl FnMut(&mut haven_model::Config) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    use super::protocol::{ApplyConfig, ConfigReply, Empty};
    for _ in 0..CAS_ATTEMPTS {
        let current: ConfigReply = client.call(super::api::CONFIG, &Empty {}).await?;
        let old = haven_model::Config::from_toml("the cluster configuration", &current.text)?;
        let mut config = old.clone();
        edit(&mut config)?;
        let text = haven_model::edit::render_preserving(&current.text, &old, &config)
            .context("rendering the configuration")?;
        let r: anyhow::Result<ConfigReply> = client
            .call(
                super::api::CONFIG_APPLY,
                &ApplyConfig {
                    based_on: current.version,
                    text,
                },
            )
            .await;
        match r {
            Ok(c) => return Ok(c.version),
            Err(e) if e.to_string().contains("configuration change refused") => continue,
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("the configuration kept changing under this edit; try again")
}
