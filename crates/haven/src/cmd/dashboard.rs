//! `haven dashboard`: the cluster's REST API and web dashboard, served on loopback by
//! the operator's own CLI.
//!
//! Why here and not in the daemon: the daemons speak only mutually authenticated TLS,
//! and browsers are poor at client certificates. The operator already holds a client
//! certificate (client.toml); this gateway uses it towards the cluster and admits the
//! local browser or script with a random bearer token it prints at start (as Jupyter
//! does). It binds loopback only, so the token never crosses a network.
//!
//! REST (JSON; `Authorization: Bearer TOKEN`, or the cookie the dashboard URL sets):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/status` | nodes, quorum, resources (as `haven status --json`) |
//! | GET | `/api/v1/config` | the configuration text and its version |
//! | GET | `/api/v1/fence` | members, victims, frozen resources (`haven fence ls`) |
//! | GET | `/api/v1/fence/history` | fence attempts and confirmations |
//! | POST | `/api/v1/nodes/{node}/{standby,online,maintenance}` | as `haven node …` |
//! | POST | `/api/v1/resources/{id}/{start,stop,clear,cleanup}` | as `haven resource …` |
//! | POST | `/api/v1/resources/{id}/move` | body `{"node": "NAME"}` |
//! | POST | `/api/v1/fence/{node}/{fence,ack}` | fence now / acknowledge by hand |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use haven_store::FenceRecord;
use serde::Deserialize;
use serde_json::json;

use crate::daemon::api;
use crate::daemon::client::{Client, config_path};
use crate::daemon::fence::{
    Acked, FENCE_ACK, FENCE_HISTORY, FENCE_LS, FENCE_NODE, FenceLs, NodeName,
};
use crate::daemon::protocol::{ConfigReply, Empty, StatusReport};
use crate::daemon::{node_cmd, resource_cmd};

const PAGE: &str = include_str!("dashboard.html");
const COOKIE: &str = "haven_token";

#[derive(clap::Args)]
pub struct Args {
    /// client.toml (default: $HAVEN_CONFIG)
    #[arg(long, env = "HAVEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to serve: a loopback address (port 0 picks a free one)
    #[arg(long, default_value = "127.0.0.1:8006")]
    pub listen: SocketAddr,
    /// Read the access token from this file instead of making a random one (for
    /// scripts that start the gateway and call the API)
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

struct Gateway {
    client: Client,
    token: String,
}

type G = State<Arc<Gateway>>;

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: the dashboard serves loopback addresses only (127.0.0.0/8 or ::1); reach it from elsewhere through an SSH tunnel",
            args.listen
        );
    }
    let client = Client::load(&config_path(args.config)?)?;
    let token = match &args.token_file {
        Some(p) => read_token(p)?,
        None => (0..24)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
        let addr = listener.local_addr()?;
        // The first line is the contract with scripts and tests: where, and how to get in.
        if args.token_file.is_some() {
            println!("Haven dashboard: http://{addr}/ (token from the token file)");
        } else {
            println!("Haven dashboard: http://{addr}/?token={token}");
        }
        let gw = Arc::new(Gateway { client, token });
        axum::serve(listener, router(gw))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving the dashboard")
    })
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}: cannot read", path.display()))?;
    let token = text.trim().to_string();
    if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
        anyhow::bail!(
            "--token-file {}: the token must be at least 16 printable characters without spaces",
            path.display()
        );
    }
    Ok(token)
}

fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/v1/status", get(status))
        .route("/api/v1/config", get(config))
        .route("/api/v1/fence", get(fence_ls))
        .route("/api/v1/fence/history", get(fence_history))
        .route("/api/v1/nodes/{node}/{action}", post(node_action))
        .route("/api/v1/resources/{id}/{action}", post(resource_action))
        .route("/api/v1/fence/{node}/{action}", post(fence_action))
        .fallback(not_found)
        .with_state(gw)
}

/// An API error: a status and `{"error": "..."}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for Failure {
    /// The cluster's refusals are the request's fault (400, with the cluster's reason);
    /// a cluster that cannot be reached is the gateway's (502).
    fn from(e: anyhow::Error) -> Self {
        let msg = format!("{e:#}");
        if msg.starts_with("no server of the cluster answered") {
            Failure(StatusCode::BAD_GATEWAY, msg)
        } else {
            Failure(StatusCode::BAD_REQUEST, msg)
        }
    }
}

type ApiResult = Result<Response, Failure>;

/// Equal without an early exit, so the time taken says nothing of how much matched.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return auth.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn check(gw: &Gateway, headers: &HeaderMap) -> Result<(), Failure> {
    match presented_token(headers) {
        Some(t) if same_secret(t, &gw.token) => Ok(()),
        Some(_) => Err(Failure(
            StatusCode::UNAUTHORIZED,
            "wrong token: use the one `haven dashboard` printed".into(),
        )),
        None => Err(Failure(
            StatusCode::UNAUTHORIZED,
            "no token: send `Authorization: Bearer TOKEN` (printed by `haven dashboard`)".into(),
        )),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    token: Option<String>,
}

/// The dashboard. Opening the printed URL (`/?token=…`) trades the token for a cookie
/// that only this site's own requests carry (SameSite=Strict), then drops it from the
/// address bar.
async fn page(State(gw): G, Query(q): Query<PageQuery>, headers: HeaderMap) -> Response {
    if let Some(t) = q.token {
        if !same_secret(&t, &gw.token) {
            return (StatusCode::UNAUTHORIZED, Html(LOCKED)).into_response();
        }
        let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
        return ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response();
    }
    match check(&gw, &headers) {
        Ok(()) => ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response(),
        Err(_) => (StatusCode::UNAUTHORIZED, Html(LOCKED)).into_response(),
    }
}

const LOCKED: &str = "<!doctype html><title>Haven</title><p>Open the address that \
<code>haven dashboard</code> printed (it carries the access token).</p>";

async fn not_found() -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        "no such endpoint (see /api/v1/…)".into(),
    )
}

async fn status(State(gw): G, headers: HeaderMap) -> ApiResult {
    check(&gw, &headers)?;
    let r: StatusReport = gw.client.call(api::STATUS, &Empty {}).await?;
    Ok(Json(r).into_response())
}

async fn config(State(gw): G, headers: HeaderMap) -> ApiResult {
    check(&gw, &headers)?;
    let r: ConfigReply = gw.client.call(api::CONFIG, &Empty {}).await?;
    Ok(Json(json!({ "version": r.version, "text": r.text })).into_response())
}

async fn fence_ls(State(gw): G, headers: HeaderMap) -> ApiResult {
    check(&gw, &headers)?;
    let r: FenceLs = gw.client.call(FENCE_LS, &Empty {}).await?;
    Ok(Json(r).into_response())
}

async fn fence_history(State(gw): G, headers: HeaderMap) -> ApiResult {
    check(&gw, &headers)?;
    let r: Vec<FenceRecord> = gw.client.call(FENCE_HISTORY, &Empty {}).await?;
    Ok(Json(r).into_response())
}

fn unknown_action(action: &str, allowed: &str) -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        format!("unknown action {action:?}: one of {allowed}"),
    )
}

async fn node_action(
    State(gw): G,
    Path((node, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    check(&gw, &headers)?;
    let cmd = match action.as_str() {
        "standby" => node_cmd::Command::Standby { node },
        "online" => node_cmd::Command::Online { node },
        "maintenance" => node_cmd::Command::Maintenance { node },
        _ => return Err(unknown_action(&action, "standby, online, maintenance")),
    };
    let (node, version) = node_cmd::apply(&gw.client, cmd).await?;
    Ok(Json(json!({ "node": node, "action": action, "config_version": version })).into_response())
}

#[derive(Deserialize)]
struct MoveBody {
    node: String,
}

async fn resource_action(
    State(gw): G,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    check(&gw, &headers)?;
    let cmd = match action.as_str() {
        "start" => resource_cmd::Command::Start { id },
        "stop" => resource_cmd::Command::Stop { id },
        "clear" => resource_cmd::Command::Clear { id },
        "cleanup" => resource_cmd::Command::Cleanup { id },
        "move" => {
            let b: MoveBody = serde_json::from_slice(&body).map_err(|e| {
                Failure(
                    StatusCode::BAD_REQUEST,
                    format!("move needs a JSON body {{\"node\": \"NAME\"}}: {e}"),
                )
            })?;
            resource_cmd::Command::Move { id, node: b.node }
        }
        _ => {
            return Err(unknown_action(&action, "start, stop, move, clear, cleanup"));
        }
    };
    let reply = match resource_cmd::apply(&gw.client, cmd).await? {
        resource_cmd::Applied::CleanedUp(id) => json!({ "resource": id, "action": action }),
        resource_cmd::Applied::Version(v) => json!({ "action": action, "config_version": v }),
    };
    Ok(Json(reply).into_response())
}

async fn fence_action(
    State(gw): G,
    Path((node, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    check(&gw, &headers)?;
    let req = NodeName { node: node.clone() };
    match action.as_str() {
        "fence" => {
            let _: Empty = gw.client.call(FENCE_NODE, &req).await?;
            Ok(Json(json!({ "node": node, "fencing": "requested" })).into_response())
        }
        "ack" => {
            let a: Acked = gw.client.call(FENCE_ACK, &req).await?;
            if a.acked {
                Ok(Json(json!({ "node": node, "acked": true })).into_response())
            } else {
                Err(Failure(
                    StatusCode::CONFLICT,
                    format!("{node} is not being fenced: there is nothing to acknowledge"),
                ))
            }
        }
        _ => Err(unknown_action(&action, "fence, ack")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_bearer_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert(header::COOKIE, "a=b; haven_token=xyz; c=d".parse().unwrap());
        assert_eq!(presented_token(&h), Some("xyz"));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(presented_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented_token(&h), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abcd", "abcd"));
        assert!(!same_secret("abcd", "abce"));
        assert!(!same_secret("abcd", "abc"));
        assert!(!same_secret("", "a"));
    }
}
