//! A small QMP client: JSON objects, one per line, over a unix socket.
//!
//! The server greets (`{"QMP": ...}`), the client must send `qmp_capabilities` before
//! anything else, then each command gets exactly one `return` or `error`; asynchronous
//! `event` objects may arrive in between and are kept for the caller. Every read is
//! bounded by the deadline given to the call.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: no answer before the deadline")]
    Timeout,
    #[error("QMP: the server closed the connection")]
    Closed,
    #[error("QMP: expected a greeting with a \"QMP\" member, got {0}")]
    BadGreeting(String),
    #[error("QMP: a line is not a JSON object: {0}")]
    BadJson(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous event QEMU sent (`POWERDOWN`, `SHUTDOWN`, `STOP`, `RESUME`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// A negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: Vec<QmpEvent>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout)?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = qmp.read_object(deadline).await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadGreeting(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None, deadline).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout_at(deadline, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout)??;
        loop {
            let obj = self.read_object(deadline).await?;
            if let Some(r) = obj.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = obj.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            self.keep_if_event(obj);
        }
    }

    /// `query-status`'s `status` string (`running`, `paused`, `postmigrate`, ...).
    pub async fn status(&mut self, deadline: Instant) -> Result<String, QmpError> {
        let r = self.execute("query-status", None, deadline).await?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Waits for an event called `name` (or one already received), up to `deadline`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        deadline: Instant,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(i));
        }
        loop {
            let obj = self.read_object(deadline).await?;
            if obj.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(to_event(obj));
            }
            self.keep_if_event(obj);
        }
    }

    /// Events received so far and not yet consumed.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    fn keep_if_event(&mut self, obj: Value) {
        if obj.get("event").is_some() {
            // QEMU is chatty during migration; keep a bounded tail.
            if self.events.len() >= 256 {
                self.events.remove(0);
            }
            self.events.push(to_event(obj));
        }
    }

    async fn read_object(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout)??;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::BadJson(line.trim().chars().take(200).collect())),
        }
    }
}

fn to_event(obj: Value) -> QmpEvent {
    QmpEvent {
        name: obj
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        data: obj.get("data").cloned().unwrap_or(Value::Null),
    }
}

#[cfg(test)]
fn after(d: std::time::Duration) -> Instant {
    Instant::now() + d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::UnixListener;

    /// A scripted peer: for unit-testing the framing only; QEMU itself is exercised by
    /// the integration tests.
    async fn serve(listener: UnixListener, replies: Vec<&'static str>) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut line = String::new();
        for reply in replies {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_and_separates_events_from_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve(
            l,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\", \"data\": {}}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        ));
        let deadline = after(Duration::from_secs(10));
        let mut q = Qmp::connect(&path, deadline).await.unwrap();
        assert_eq!(q.status(deadline).await.unwrap(), "paused");
        let e = q.execute("cont", None, deadline).await.unwrap_err();
        assert!(
            e.to_string().contains("cont failed: GenericError: nope"),
            "{e}"
        );
        assert_eq!(q.wait_event("STOP", deadline).await.unwrap().name, "STOP");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let _l = UnixListener::bind(&path).unwrap();
        let r = Qmp::connect(&path, after(Duration::from_millis(200))).await;
        assert!(matches!(r, Err(QmpError::Timeout)));
    }
}
