//! The NBD server: fixed-newstyle handshake, then the transmission phase with simple
//! replies. Requests are handled concurrently (bounded per connection), so a client with
//! a deep queue keeps the replication pipeline full.

use crate::proto::{self, Cmd, ProtoError};
use crate::volume::{IoFail, Volume};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};

/// Requests one client may have in progress at once.
const MAX_INFLIGHT: u32 = 64;

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client asked for unknown export `{0}`")]
    UnknownExport(String),
    #[error("binding {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Serves `vol` on a unix socket at `path` until the task is dropped.
pub async fn serve_unix(path: &Path, vol: Arc<Volume>) -> Result<(), NbdError> {
    let l = UnixListener::bind(path).map_err(|source| NbdError::Bind {
        path: path.display().to_string(),
        source,
    })?;
    loop {
        let (s, _) = l.accept().await?;
        let v = vol.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_client(s, v).await {
                tracing::debug!("nbd client: {e}");
            }
        });
    }
}

/// Serves `vol` on a bound TCP listener (the caller chooses a loopback address).
pub async fn serve_tcp(l: TcpListener, vol: Arc<Volume>) -> Result<(), NbdError> {
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let v = vol.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_client(s, v).await {
                tracing::debug!("nbd client: {e}");
            }
        });
    }
}

fn transmission_flags() -> u16 {
    proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_TRIM
        | proto::TF_SEND_WRITE_ZEROES
        // Every connection shares one file and FLUSH syncs all of it, on every replica.
        | proto::TF_CAN_MULTI_CONN
}

fn export_matches(vol: &Volume, name: &str) -> bool {
    name.is_empty() || name == vol.name()
}

/// Runs one client from handshake to disconnect.
pub async fn handle_client<S>(s: S, vol: Arc<Volume>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(s);
    if handshake(&mut rd, &mut wr, &vol).await? {
        transmission(rd, wr, vol).await?;
    }
    Ok(())
}

/// Returns whether the client entered the transmission phase.
async fn handshake<R, W>(rd: &mut R, wr: &mut W, vol: &Volume) -> Result<bool, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&proto::INIT_MAGIC.to_be_bytes());
    out.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&out).await?;
    wr.flush().await?;
    let cflags = rd.read_u32().await?;
    if cflags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags(cflags));
    }
    let no_zeroes = cflags & proto::CLIENT_NO_ZEROES != 0;
    let mut header = [0u8; proto::OPTION_HEADER_LEN];
    let mut data = Vec::new();
    loop {
        rd.read_exact(&mut header).await?;
        let (opt, len) = proto::decode_option_header(&header)?;
        data.resize(len as usize, 0);
        rd.read_exact(&mut data).await?;
        out.clear();
        match opt {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export_matches(vol, &name) {
                    // This option has no error reply: the protocol says to hang up.
                    return Err(NbdError::UnknownExport(name));
                }
                out.extend_from_slice(&vol.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(true);
            }
            proto::OPT_ABORT => {
                proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                // The client may already have closed; that is its right after ABORT.
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(false);
            }
            proto::OPT_LIST => {
                if len != 0 {
                    proto::encode_option_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]);
                } else {
                    let name = vol.name();
                    let mut rec = (name.len() as u32).to_be_bytes().to_vec();
                    rec.extend_from_slice(name.as_bytes());
                    proto::encode_option_reply(&mut out, opt, proto::REP_SERVER, &rec);
                    proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::decode_info_request(&data) {
                Err(_) => proto::encode_option_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]),
                Ok(req) if !export_matches(vol, &req.name) => {
                    proto::encode_option_reply(&mut out, opt, proto::REP_ERR_UNKNOWN, &[])
                }
                Ok(req) => {
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&vol.size().to_be_bytes());
                    info.extend_from_slice(&transmission_flags().to_be_bytes());
                    proto::encode_option_reply(&mut out, opt, proto::REP_INFO, &info);
                    if req.infos.contains(&proto::INFO_NAME) {
                        let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
                        info.extend_from_slice(vol.name().as_bytes());
                        proto::encode_option_reply(&mut out, opt, proto::REP_INFO, &info);
                    }
                    if req.infos.contains(&proto::INFO_BLOCK_SIZE) {
                        let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        info.extend_from_slice(&1u32.to_be_bytes());
                        info.extend_from_slice(&4096u32.to_be_bytes());
                        info.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
                        proto::encode_option_reply(&mut out, opt, proto::REP_INFO, &info);
                    }
                    proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                    if opt == proto::OPT_GO {
                        wr.write_all(&out).await?;
                        wr.flush().await?;
                        return Ok(true);
                    }
                }
            },
            _ => proto::encode_option_reply(&mut out, opt, proto::REP_ERR_UNSUP, &[]),
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    error: u32,
    cookie: u64,
    data: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut h = [0u8; 16];
    proto::encode_simple_reply(&mut h, error, cookie);
    let mut w = wr.lock().await;
    w.write_all(&h).await?;
    if let Some(d) = data {
        w.write_all(d).await?;
    }
    w.flush().await
}

async fn transmission<R, W>(mut rd: R, wr: W, vol: Arc<Volume>) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let wr = Arc::new(Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT as usize));
    let mut header = [0u8; proto::REQUEST_LEN];
    loop {
        rd.read_exact(&mut header).await?;
        let req = proto::decode_request(&header)?;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        match req.cmd {
            Cmd::Disc => {
                // Finish what is in flight, then close.
                let _all = slots.acquire_many(MAX_INFLIGHT).await;
                return Ok(());
            }
            Cmd::Write if req.length > proto::MAX_PAYLOAD => {
                // Skip the payload so the stream stays in step, then refuse.
                let mut skip = (&mut rd).take(u64::from(req.length));
                tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
                reply(&wr, proto::EOVERFLOW, req.cookie, None).await?;
                continue;
            }
            Cmd::Read if req.length > proto::MAX_PAYLOAD => {
                reply(&wr, proto::EOVERFLOW, req.cookie, None).await?;
                continue;
            }
            Cmd::Other(_) => {
                reply(&wr, proto::EINVAL, req.cookie, None).await?;
                continue;
            }
            _ => {}
        }
        let payload = if req.cmd == Cmd::Write {
            let mut d = vec![0u8; req.length as usize];
            rd.read_exact(&mut d).await?;
            Some(Arc::new(d))
        } else {
            None
        };
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let vol = vol.clone();
        let wr = wr.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let res = match req.cmd {
                Cmd::Read => {
                    let mut buf = vec![0u8; req.length as usize];
                    match vol.read(req.offset, &mut buf) {
                        Ok(()) => reply(&wr, 0, req.cookie, Some(&buf)).await,
                        Err(e) => reply(&wr, read_errno(e), req.cookie, None).await,
                    }
                }
                Cmd::Write => {
                    let r = vol.write(req.offset, req.length, payload, fua).await;
                    reply(&wr, errno(r), req.cookie, None).await
                }
                Cmd::Trim | Cmd::WriteZeroes => {
                    // Trimmed ranges read back as zeroes, the same on every replica.
                    let r = vol.write(req.offset, req.length, None, fua).await;
                    reply(&wr, errno(r), req.cookie, None).await
                }
                Cmd::Flush => {
                    let r = vol.flush().await;
                    reply(&wr, errno(r), req.cookie, None).await
                }
                Cmd::Disc | Cmd::Other(_) => Ok(()),
            };
            if let Err(e) = res {
                tracing::debug!("nbd reply: {e}");
            }
        });
    }
}

fn errno(r: Result<(), IoFail>) -> u32 {
    r.err().map_or(0, IoFail::errno)
}

fn read_errno(e: IoFail) -> u32 {
    match e {
        IoFail::OutOfRange => proto::EINVAL,
        o => o.errno(),
    }
}
