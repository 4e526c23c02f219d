//! The control socket of a running replica: one JSON request per line, one JSON reply per
//! line. The CLI (`haven volume status|promote|…`) is its client.

use crate::volume::{Status, Volume};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_LINE: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    Promote {
        #[serde(default)]
        peer_fenced: Vec<String>,
    },
    /// Promote beside the primary `migration_source` for a live migration (a window).
    PromoteWindow {
        #[serde(default)]
        peer_fenced: Vec<String>,
        migration_source: String,
    },
    Demote,
    Connect {
        peer: String,
    },
    Disconnect {
        peer: String,
    },
    Resolve {
        peer: String,
        discard: String,
    },
    /// The cluster recorded `peer` as outdated: I/O frozen for it resumes.
    PeerOutdated {
        peer: String,
    },
    /// The cluster holds this replica outdated: it refuses promotion until resynced.
    Outdate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: no reply within {secs} s")]
    Timeout { path: String, secs: u64 },
    #[error("control socket {path}: bad reply: {reason}")]
    BadReply { path: String, reason: String },
    #[error("{0}")]
    Refused(String),
}

async fn execute(vol: &Volume, req: ControlRequest) -> ControlReply {
    let r = match req {
        ControlRequest::Status => Ok(()),
        ControlRequest::Promote { peer_fenced } => vol.promote(&peer_fenced).await,
        ControlRequest::PromoteWindow {
            peer_fenced,
            migration_source,
        } => vol.promote_window(&peer_fenced, &migration_source).await,
        ControlRequest::Demote => vol.demote().await,
        ControlRequest::Connect { peer } => vol.connect(&peer),
        ControlRequest::Disconnect { peer } => vol.disconnect(&peer),
        ControlRequest::Resolve { peer, discard } => vol.resolve(&peer, &discard),
        ControlRequest::PeerOutdated { peer } => vol.peer_outdated(&peer),
        ControlRequest::Outdate => vol.outdate(),
    };
    match r {
        Ok(()) => ControlReply {
            ok: true,
            error: None,
            status: Some(vol.status()),
        },
        Err(e) => ControlReply {
            ok: false,
            error: Some(e.to_string()),
            status: None,
        },
    }
}

pub async fn serve(path: &Path, vol: Arc<Volume>) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let l = UnixListener::bind(path).map_err(io)?;
    loop {
        let (s, _) = l.accept().await.map_err(io)?;
        let vol = vol.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = s.into_split();
            let mut lines = BufReader::new(rd.take(MAX_LINE)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(req) => execute(&vol, req).await,
                    Err(e) => ControlReply {
                        ok: false,
                        error: Some(format!("bad request: {e}")),
                        status: None,
                    },
                };
                let mut text = serde_json::to_string(&reply).unwrap_or_default();
                text.push('\n');
                if wr.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends one request to the replica behind `path` and returns its status, or the
/// replica's refusal as [`ControlError::Refused`].
pub async fn request(path: &Path, req: &ControlRequest) -> Result<Status, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    let fut = async {
        let s = UnixStream::connect(path).await.map_err(io)?;
        let (rd, mut wr) = s.into_split();
        let mut text = serde_json::to_string(req).unwrap_or_default();
        text.push('\n');
        wr.write_all(text.as_bytes()).await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(rd.take(16 << 20))
            .read_line(&mut line)
            .await
            .map_err(io)?;
        let reply: ControlReply =
            serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        match (reply.ok, reply.status, reply.error) {
            (true, Some(s), _) => Ok(s),
            (_, _, Some(e)) => Err(ControlError::Refused(e)),
            _ => Err(ControlError::BadReply {
                path: p.clone(),
                reason: "neither status nor error".into(),
            }),
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, fut)
        .await
        .map_err(|_| ControlError::Timeout {
            path: p.clone(),
            secs: CLIENT_TIMEOUT.as_secs(),
        })?
}
