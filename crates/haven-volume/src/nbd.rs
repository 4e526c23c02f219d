//! The NBD server: fixed-newstyle handshake, then the transmission phase with simple
//! replies, or structured ones when the client asks (reads then skip what is known to
//! be zero, errors carry a message, and `base:allocation` answers block status).
//! Requests are handled concurrently (bounded per connection), so a client with a deep
//! queue keeps the replication pipeline full.

use crate::proto::{self, Cmd, ProtoError, Request};
use crate::volume::{IoFail, Volume};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};

/// What one connection's requests in progress may hold, in KiB: payload buffers are
/// bounded per client, however deep its queue (each request also costs 1 KiB).
const BUDGET_KIB: u32 = 64 << 10;
/// The id of `base:allocation` once selected (any value but the reserved 0 would do).
const BASE_ALLOCATION_ID: u32 = 1;
/// Extents looked up per read or block status request; past this, the rest of the
/// range counts as data (always a correct answer, just a less compact one).
const MAX_EXTENTS: usize = 256;

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

/// Buffers a connection keeps for reuse, and the largest kept: enough for a deep queue
/// of typical requests without holding on to a client's rare huge one.
const POOL_BUFFERS: usize = 64;
const POOL_MAX_BUFFER: usize = 4 << 20;

/// Request and reply buffers reused across one connection's requests: no allocation,
/// page faults or zeroing per request once the sizes a client uses are in the pool.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of exactly `len` bytes; contents unspecified (callers overwrite it).
    fn take(&self, len: usize) -> Vec<u8> {
        let got = self
            .0
            .lock()
            .ok()
            .and_then(|mut p| {
                // Prefer one already as long, so nothing needs zeroing.
                let i = p
                    .iter()
                    .position(|b| b.len() >= len)
                    .or(p.len().checked_sub(1))?;
                Some(p.swap_remove(i))
            })
            .unwrap_or_default();
        let mut b = got;
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() > POOL_MAX_BUFFER {
            return;
        }
        if let Ok(mut p) = self.0.lock()
            && p.len() < POOL_BUFFERS
        {
            p.push(b);
        }
    }
}

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Session {
    structured: bool,
    base_allocation: bool,
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

fn transmission_flags(s: Session) -> u16 {
    let f = proto::TF_HAS_FLAGS
        | proto::TF_SEND_FLUSH
        | proto::TF_SEND_FUA
        | proto::TF_SEND_TRIM
        | proto::TF_SEND_WRITE_ZEROES
        // Every connection shares one file and FLUSH syncs all of it, on every replica.
        | proto::TF_CAN_MULTI_CONN;
    // The protocol forbids advertising DF without structured replies.
    if s.structured {
        f | proto::TF_SEND_DF
    } else {
        f
    }
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
    if let Some(session) = handshake(&mut rd, &mut wr, &vol).await? {
        transmission(rd, wr, vol, session).await?;
    }
    Ok(())
}

/// Whether a meta context query selects `base:allocation`; when listing, the namespace
/// alone lists every context in it.
fn selects_base_allocation(query: &str, listing: bool) -> bool {
    query == proto::META_BASE_ALLOCATION || (listing && query == "base:")
}

/// Returns the session if the client entered the transmission phase.
async fn handshake<R, W>(rd: &mut R, wr: &mut W, vol: &Volume) -> Result<Option<Session>, NbdError>
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
    let mut session = Session::default();
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
                out.extend_from_slice(&transmission_flags(session).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(Some(session));
            }
            proto::OPT_ABORT => {
                proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                // The client may already have closed; that is its right after ABORT.
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(None);
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
            proto::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    proto::encode_option_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]);
                } else {
                    session.structured = true;
                    proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let listing = opt == proto::OPT_LIST_META_CONTEXT;
                match proto::decode_meta_context_request(&data) {
                    // Block status replies are structured: no contexts without them.
                    _ if !session.structured => proto::encode_option_reply(
                        &mut out,
                        opt,
                        proto::REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    ),
                    Err(_) => {
                        proto::encode_option_reply(&mut out, opt, proto::REP_ERR_INVALID, &[])
                    }
                    Ok(req) if !export_matches(vol, &req.name) => {
                        proto::encode_option_reply(&mut out, opt, proto::REP_ERR_UNKNOWN, &[])
                    }
                    Ok(req) => {
                        let wanted = (listing && req.queries.is_empty())
                            || req
                                .queries
                                .iter()
                                .any(|q| selects_base_allocation(q, listing));
                        if !listing {
                            session.base_allocation = wanted;
                        }
                        if wanted {
                            // Listing replies carry the reserved id 0.
                            let id = if listing { 0 } else { BASE_ALLOCATION_ID };
                            let mut rec = id.to_be_bytes().to_vec();
                            rec.extend_from_slice(proto::META_BASE_ALLOCATION.as_bytes());
                            proto::encode_option_reply(
                                &mut out,
                                opt,
                                proto::REP_META_CONTEXT,
                                &rec,
                            );
                        }
                        proto::encode_option_reply(&mut out, opt, proto::REP_ACK, &[]);
                    }
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
                    info.extend_from_slice(&transmission_flags(session).to_be_bytes());
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
                        return Ok(Some(session));
                    }
                }
            },
            _ => proto::encode_option_reply(&mut out, opt, proto::REP_ERR_UNSUP, &[]),
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
}

/// Writes one whole reply (a header, then payload parts) under the writer's lock, so
/// replies to concurrent requests never interleave.
async fn send<W: AsyncWrite + Unpin>(wr: &Mutex<W>, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut w = wr.lock().await;
    for p in parts {
        if !p.is_empty() {
            w.write_all(p).await?;
        }
    }
    w.flush().await
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    error: u32,
    cookie: u64,
    data: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut h = [0u8; 16];
    proto::encode_simple_reply(&mut h, error, cookie);
    send(wr, &[&h, data.unwrap_or(&[])]).await
}

/// An error reply: a structured error chunk (with a message for people) when the
/// client negotiated structured replies, else a simple reply.
async fn reply_error<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    s: Session,
    cookie: u64,
    error: u32,
    message: &str,
) -> std::io::Result<()> {
    if !s.structured {
        return reply(wr, error, cookie, None).await;
    }
    let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 6 + message.len());
    proto::encode_error_chunk(&mut out, cookie, error, message);
    send(wr, &[&out]).await
}

/// Whether `flags` holds only flags the protocol defines for this command (and this
/// session): anything else is refused with EINVAL, as the protocol advises.
fn flags_valid(req: &Request, s: Session) -> bool {
    let mut allowed = proto::CMD_FLAG_FUA;
    match req.cmd {
        Cmd::Read if s.structured => allowed |= proto::CMD_FLAG_DF,
        Cmd::WriteZeroes => allowed |= proto::CMD_FLAG_NO_HOLE,
        Cmd::BlockStatus => allowed |= proto::CMD_FLAG_REQ_ONE,
        _ => {}
    }
    req.flags & !allowed == 0
}

/// One stretch of a requested range: data, or a hole that reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    offset: u64,
    len: u64,
    hole: bool,
}

/// The data and holes of `file` over `[offset, offset + len)`, from the file system's
/// own record (SEEK_DATA/SEEK_HOLE). Without a file, or when the file system cannot
/// say, everything is data: never wrong, only less compact.
fn extents(file: Option<&File>, offset: u64, len: u64) -> Vec<Extent> {
    use nix::unistd::{Whence, lseek};
    let end = offset.saturating_add(len);
    let all_data = vec![Extent {
        offset,
        len,
        hole: false,
    }];
    let Some(f) = file else { return all_data };
    let pos = |at: u64, whence| -> Result<u64, nix::errno::Errno> {
        let at = i64::try_from(at).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
        lseek(f, at, whence).map(|p| p.max(0) as u64)
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    while at < end {
        if out.len() >= MAX_EXTENTS {
            out.push(Extent {
                offset: at,
                len: end - at,
                hole: false,
            });
            break;
        }
        let data = match pos(at, Whence::SeekData) {
            Ok(d) => d.clamp(at, end),
            // No data from `at` to the end of the file: all hole.
            Err(nix::errno::Errno::ENXIO) => end,
            Err(_) => return all_data,
        };
        if data > at {
            out.push(Extent {
                offset: at,
                len: data - at,
                hole: true,
            });
            at = data;
            continue;
        }
        let hole = match pos(at, Whence::SeekHole) {
            Ok(h) => h.clamp(at, end),
            Err(_) => return all_data,
        };
        // A file system that reports no progress cannot be trusted for the rest.
        let stop = if hole > at { hole } else { end };
        out.push(Extent {
            offset: at,
            len: stop - at,
            hole: false,
        });
        at = stop;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let mut acc = 0u128;
    for w in &mut words {
        let mut a = [0u8; 16];
        a.copy_from_slice(w);
        acc |= u128::from_ne_bytes(a);
    }
    acc == 0 && words.remainder().iter().all(|x| *x == 0)
}

fn read_message(e: IoFail) -> &'static str {
    match e {
        IoFail::NotPrimary => "this replica is not primary",
        IoFail::OutOfRange => "read beyond the end of the volume",
        IoFail::Io => "I/O error on the backing file",
    }
}

/// A structured read: holes the file system knows of, and data that turns out to be
/// all zeroes, go as hole chunks; the rest as data chunks. Everything is read before
/// the first chunk is sent, so an error is one error chunk and nothing else. With DF,
/// one content chunk covers the whole range.
async fn structured_read<W: AsyncWrite + Unpin>(
    vol: &Volume,
    file: Option<&File>,
    wr: &Mutex<W>,
    req: &Request,
    df: bool,
    pool: &Pool,
) -> std::io::Result<()> {
    let s = Session {
        structured: true,
        base_allocation: false,
    };
    let len = u64::from(req.length);
    if len == 0 {
        // Nothing to describe: a content chunk must cover at least one byte.
        return match vol.read(req.offset, &mut []) {
            Ok(()) => {
                let mut h = Vec::with_capacity(proto::CHUNK_HEADER_LEN);
                proto::encode_chunk_header(
                    &mut h,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    req.cookie,
                    0,
                );
                send(wr, &[&h]).await
            }
            Err(e) => reply_error(wr, s, req.cookie, read_errno(e), read_message(e)).await,
        };
    }
    // The range check and the primary check come first: a hole is no answer for a
    // replica that may not serve reads.
    if let Err(e) = vol
        .read(req.offset, &mut [])
        .and_then(|()| match req.offset.checked_add(len) {
            Some(end) if end <= vol.size() => Ok(()),
            _ => Err(IoFail::OutOfRange),
        })
    {
        return reply_error(wr, s, req.cookie, read_errno(e), read_message(e)).await;
    }
    let mut parts = extents(file, req.offset, len);
    let mut buf = pool.take(req.length as usize);
    let r = structured_read_into(vol, wr, req, df, &mut parts, &mut buf).await;
    pool.give(buf);
    r
}

async fn structured_read_into<W: AsyncWrite + Unpin>(
    vol: &Volume,
    wr: &Mutex<W>,
    req: &Request,
    df: bool,
    parts: &mut Vec<Extent>,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let s = Session {
        structured: true,
        base_allocation: false,
    };
    let len = u64::from(req.length);
    // Pooled buffers hold old data: holes must read as zeroes.
    for x in parts.iter().filter(|x| x.hole) {
        let at = (x.offset - req.offset) as usize;
        if let Some(dst) = buf.get_mut(at..at + x.len as usize) {
            dst.fill(0);
        }
    }
    for x in parts.iter().filter(|x| !x.hole) {
        let at = (x.offset - req.offset) as usize;
        let Some(dst) = buf.get_mut(at..at + x.len as usize) else {
            continue;
        };
        if let Err(e) = vol.read(x.offset, dst) {
            return reply_error(wr, s, req.cookie, read_errno(e), read_message(e)).await;
        }
    }
    for x in parts.iter_mut().filter(|x| !x.hole) {
        let at = (x.offset - req.offset) as usize;
        x.hole = buf.get(at..at + x.len as usize).is_some_and(is_zero);
    }
    if df {
        let hole = parts.iter().all(|x| x.hole);
        *parts = vec![Extent {
            offset: req.offset,
            len,
            hole,
        }];
    }
    // Neighbours of the same kind are one chunk.
    let mut merged: Vec<Extent> = Vec::with_capacity(parts.len());
    for x in parts.iter().copied() {
        match merged.last_mut() {
            Some(m) if m.hole == x.hole && m.offset + m.len == x.offset => m.len += x.len,
            _ => merged.push(x),
        }
    }
    let mut heads = Vec::with_capacity(merged.len() * 32);
    let mut spans = Vec::with_capacity(merged.len());
    for (i, x) in merged.iter().enumerate() {
        let flags = if i + 1 == merged.len() {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        let start = heads.len();
        // Each extent lies inside the request, whose length is a u32.
        let xlen = x.len as u32;
        if x.hole {
            proto::encode_hole_chunk(&mut heads, flags, req.cookie, x.offset, xlen);
            spans.push((start, heads.len(), 0, 0));
        } else {
            proto::encode_data_chunk_head(&mut heads, flags, req.cookie, x.offset, xlen);
            let at = (x.offset - req.offset) as usize;
            spans.push((start, heads.len(), at, at + x.len as usize));
        }
    }
    let mut w = wr.lock().await;
    for (hs, he, ds, de) in spans {
        w.write_all(heads.get(hs..he).unwrap_or(&[])).await?;
        if de > ds {
            w.write_all(buf.get(ds..de).unwrap_or(&[])).await?;
        }
    }
    w.flush().await
}

/// Answers NBD_CMD_BLOCK_STATUS for `base:allocation`: holes in the backing file read
/// as zeroes (HOLE|ZERO), the rest is allocated.
async fn block_status<W: AsyncWrite + Unpin>(
    vol: &Volume,
    file: Option<&File>,
    wr: &Mutex<W>,
    req: &Request,
    s: Session,
) -> std::io::Result<()> {
    let len = u64::from(req.length);
    let in_range = len > 0
        && req
            .offset
            .checked_add(len)
            .is_some_and(|end| end <= vol.size());
    if !in_range {
        let m = "block status beyond the end of the volume, or empty";
        return reply_error(wr, s, req.cookie, proto::EINVAL, m).await;
    }
    if let Err(e) = vol.read(req.offset, &mut []) {
        return reply_error(wr, s, req.cookie, read_errno(e), read_message(e)).await;
    }
    let mut descs: Vec<(u32, u32)> = Vec::new();
    for x in extents(file, req.offset, len) {
        let flags = if x.hole {
            proto::STATE_HOLE | proto::STATE_ZERO
        } else {
            0
        };
        match descs.last_mut() {
            Some((l, f)) if *f == flags => *l += x.len as u32,
            _ => descs.push((x.len as u32, flags)),
        }
    }
    if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
        descs.truncate(1);
    }
    let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + descs.len() * 8);
    proto::encode_chunk_header(
        &mut out,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        4 + 8 * descs.len() as u32,
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in descs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    send(wr, &[&out]).await
}

async fn transmission<R, W>(
    mut rd: R,
    wr: W,
    vol: Arc<Volume>,
    session: Session,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let wr = Arc::new(Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(BUDGET_KIB as usize));
    // A descriptor of our own for SEEK_DATA/SEEK_HOLE: reads and writes go through the
    // volume; this one only asks the file system where the holes are.
    let holes = if session.structured {
        File::open(vol.data_path()).ok().map(Arc::new)
    } else {
        None
    };
    let pool = Arc::new(Pool::default());
    let mut header = [0u8; proto::REQUEST_LEN];
    loop {
        rd.read_exact(&mut header).await?;
        let req = proto::decode_request(&header)?;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let refuse = if !flags_valid(&req, session) {
            Some((proto::EINVAL, "flags not valid for this command"))
        } else if matches!(req.cmd, Cmd::Read | Cmd::Write) && req.length > proto::MAX_PAYLOAD {
            Some((proto::EOVERFLOW, "request larger than the 32 MiB maximum"))
        } else {
            match req.cmd {
                Cmd::Other(_) => Some((proto::EINVAL, "unknown command")),
                Cmd::BlockStatus if !session.base_allocation => {
                    Some((proto::EINVAL, "no metadata context was selected"))
                }
                _ => None,
            }
        };
        if req.cmd == Cmd::Disc {
            // Finish what is in flight, then close.
            let _all = slots.acquire_many(BUDGET_KIB).await;
            return Ok(());
        }
        if let Some((errno, why)) = refuse {
            if req.cmd == Cmd::Write {
                // Skip the payload so the stream stays in step, then refuse.
                let mut skip = (&mut rd).take(u64::from(req.length));
                tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
            }
            reply_error(&wr, session, req.cookie, errno, why).await?;
            continue;
        }
        // Reserve before reading the payload, so a deep queue waits instead of growing.
        let cost = match req.cmd {
            Cmd::Read | Cmd::Write => 1 + req.length / 1024,
            _ => 1,
        };
        let permit = match slots.clone().acquire_many_owned(cost).await {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let payload = if req.cmd == Cmd::Write {
            let mut d = pool.take(req.length as usize);
            rd.read_exact(&mut d).await?;
            Some(Arc::new(d))
        } else {
            None
        };
        let vol = vol.clone();
        let wr = wr.clone();
        let holes = holes.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let res = match req.cmd {
                Cmd::Read if session.structured => {
                    let df = req.flags & proto::CMD_FLAG_DF != 0;
                    structured_read(&vol, holes.as_deref(), &wr, &req, df, &pool).await
                }
                Cmd::Read => {
                    let mut buf = pool.take(req.length as usize);
                    let r = match vol.read(req.offset, &mut buf) {
                        Ok(()) => reply(&wr, 0, req.cookie, Some(&buf)).await,
                        Err(e) => reply(&wr, read_errno(e), req.cookie, None).await,
                    };
                    pool.give(buf);
                    r
                }
                Cmd::BlockStatus => block_status(&vol, holes.as_deref(), &wr, &req, session).await,
                Cmd::Write => {
                    let r = vol
                        .write(req.offset, req.length, payload.clone(), fua)
                        .await;
                    // Every replication frame holding the payload is sent by now; if
                    // one is somehow still held, the buffer is simply not reused.
                    if let Some(b) = payload.and_then(|p| Arc::try_unwrap(p).ok()) {
                        pool.give(b);
                    }
                    done(&wr, session, req.cookie, r).await
                }
                Cmd::Trim | Cmd::WriteZeroes => {
                    // Trimmed ranges read back as zeroes, the same on every replica.
                    let r = vol.write(req.offset, req.length, None, fua).await;
                    done(&wr, session, req.cookie, r).await
                }
                Cmd::Flush => {
                    let r = vol.flush().await;
                    done(&wr, session, req.cookie, r).await
                }
                Cmd::Disc | Cmd::Other(_) => Ok(()),
            };
            if let Err(e) = res {
                tracing::debug!("nbd reply: {e}");
            }
        });
    }
}

/// The reply to a write, trim, zero or flush: success as a simple reply (allowed, and
/// the smallest), failure with a message when structured.
async fn done<W: AsyncWrite + Unpin>(
    wr: &Mutex<W>,
    s: Session,
    cookie: u64,
    r: Result<(), IoFail>,
) -> std::io::Result<()> {
    match r {
        Ok(()) => reply(wr, 0, cookie, None).await,
        Err(e) => {
            let why = match e {
                IoFail::NotPrimary => "this replica is not primary",
                IoFail::OutOfRange => "write beyond the end of the volume",
                IoFail::Io => "I/O error, or the volume is frozen awaiting a lost peer's outdating",
            };
            reply_error(wr, s, cookie, e.errno(), why).await
        }
    }
}

fn read_errno(e: IoFail) -> u32 {
    match e {
        IoFail::OutOfRange => proto::EINVAL,
        o => o.errno(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::SplitBrainPolicy;
    use crate::volume::VolumeConfig;
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    fn volume(dir: &Path) -> Arc<Volume> {
        volume_with_peers(dir, vec![])
    }

    fn volume_with_peers(dir: &Path, peers: Vec<(String, std::net::SocketAddr)>) -> Arc<Volume> {
        crate::meta::create(dir, "vol", "a", 1 << 20, 65536, true).unwrap();
        Volume::open(VolumeConfig {
            dir: dir.to_owned(),
            listen: None,
            peers,
            policy: SplitBrainPolicy::Disconnect,
            allow_two_primaries: false,
            resync_rate: None,
            peer_timeout: Duration::from_secs(5),
            tls: None,
            fence_peers: false,
            freeze_timeout: Duration::from_secs(60),
            window_timeout: crate::volume::DEFAULT_WINDOW_TIMEOUT,
        })
        .unwrap()
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = proto::OPTS_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Reads one option reply: (option, reply type, data).
    async fn option_reply(c: &mut DuplexStream) -> (u32, u32, Vec<u8>) {
        assert_eq!(c.read_u64().await.unwrap(), proto::REP_MAGIC);
        let opt = c.read_u32().await.unwrap();
        let typ = c.read_u32().await.unwrap();
        let len = c.read_u32().await.unwrap();
        let mut d = vec![0; len as usize];
        c.read_exact(&mut d).await.unwrap();
        (opt, typ, d)
    }

    async fn greet(c: &mut DuplexStream) {
        assert_eq!(c.read_u64().await.unwrap(), proto::INIT_MAGIC);
        assert_eq!(c.read_u64().await.unwrap(), proto::OPTS_MAGIC);
        let flags = c.read_u16().await.unwrap();
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        c.write_u32(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
            .await
            .unwrap();
    }

    fn request(cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) -> Vec<u8> {
        let mut v = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    async fn simple_reply(c: &mut DuplexStream) -> (u32, u64) {
        assert_eq!(c.read_u32().await.unwrap(), proto::SIMPLE_REPLY_MAGIC);
        (c.read_u32().await.unwrap(), c.read_u64().await.unwrap())
    }

    #[tokio::test]
    async fn options_are_answered_and_unknown_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let vol = volume(d.path());
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle_client(s, vol));
        greet(&mut c).await;

        c.write_all(&option(99, b"xyz")).await.unwrap();
        assert_eq!(
            option_reply(&mut c).await,
            (99, proto::REP_ERR_UNSUP, vec![])
        );

        c.write_all(&option(proto::OPT_LIST, b"junk"))
            .await
            .unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ERR_INVALID);

        c.write_all(&option(proto::OPT_LIST, b"")).await.unwrap();
        let (_, t, data) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_SERVER);
        assert_eq!(&data[4..], b"vol");
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);

        let mut info = 4u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"nope");
        info.extend_from_slice(&0u16.to_be_bytes());
        c.write_all(&option(proto::OPT_INFO, &info)).await.unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ERR_UNKNOWN);

        // A truncated INFO payload is invalid, not fatal.
        c.write_all(&option(proto::OPT_INFO, &[0, 0]))
            .await
            .unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ERR_INVALID);

        let mut info = 3u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"vol");
        info.extend_from_slice(&1u16.to_be_bytes());
        info.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        c.write_all(&option(proto::OPT_INFO, &info)).await.unwrap();
        let (_, t, data) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_INFO);
        assert_eq!(&data[..2], &proto::INFO_EXPORT.to_be_bytes());
        assert_eq!(&data[2..10], &(1u64 << 20).to_be_bytes());
        let (_, t, data) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_INFO);
        assert_eq!(&data[..2], &proto::INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);

        c.write_all(&option(proto::OPT_ABORT, b"")).await.unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn transmission_reads_writes_and_refuses_bad_requests() {
        let d = tempfile::tempdir().unwrap();
        let vol = volume(d.path());
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(handle_client(s, vol.clone()));
        greet(&mut c).await;
        c.write_all(&option(proto::OPT_EXPORT_NAME, b"vol"))
            .await
            .unwrap();
        assert_eq!(c.read_u64().await.unwrap(), 1 << 20);
        let _flags = c.read_u16().await.unwrap();

        // Secondary: no I/O.
        c.write_all(&request(0, 0, 1, 0, 512)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EPERM, 1));
        vol.promote(&[]).await.unwrap();

        let mut w = request(1, proto::CMD_FLAG_FUA, 2, 4096, 4);
        w.extend_from_slice(b"abcd");
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 2));
        c.write_all(&request(0, 0, 3, 4096, 4)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 3));
        let mut data = [0u8; 4];
        c.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"abcd");

        c.write_all(&request(0, 0, 4, (1 << 20) - 2, 4))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EINVAL, 4));
        let mut w = request(1, 0, 5, u64::MAX - 1, 4);
        w.extend_from_slice(b"abcd");
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::ENOSPC, 5));
        c.write_all(&request(42, 0, 6, 0, 0)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EINVAL, 6));
        // DF and block status need structured replies, which this client did not ask for.
        c.write_all(&request(0, proto::CMD_FLAG_DF, 61, 0, 4))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EINVAL, 61));
        c.write_all(&request(7, 0, 62, 0, 4096)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EINVAL, 62));
        // A write with a bad flag is refused and its payload skipped.
        let mut w = request(1, 1 << 9, 63, 0, 4);
        w.extend_from_slice(b"zzzz");
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (proto::EINVAL, 63));
        c.write_all(&request(6, 0, 7, 4096, 2)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 7));
        c.write_all(&request(3, 0, 8, 0, 0)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 8));
        c.write_all(&request(0, 0, 9, 4096, 4)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 9));
        c.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"\0\0cd");

        c.write_all(&request(2, 0, 10, 0, 0)).await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(server.await.unwrap().is_ok());
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(c.read_u32().await.unwrap(), proto::STRUCTURED_REPLY_MAGIC);
        let flags = c.read_u16().await.unwrap();
        let typ = c.read_u16().await.unwrap();
        let cookie = c.read_u64().await.unwrap();
        let len = c.read_u32().await.unwrap();
        let mut d = vec![0; len as usize];
        c.read_exact(&mut d).await.unwrap();
        (flags, typ, cookie, d)
    }

    /// Reads chunks until the one marked done: the reply's content as (offset, bytes,
    /// hole), and its error if any.
    async fn structured(c: &mut DuplexStream, cookie: u64) -> (Vec<(u64, Vec<u8>, bool)>, u32) {
        let mut content = Vec::new();
        let mut error = 0;
        loop {
            let (flags, typ, ck, d) = chunk(c).await;
            assert_eq!(ck, cookie);
            match typ {
                proto::REPLY_TYPE_OFFSET_DATA => content.push((
                    u64::from_be_bytes(d[..8].try_into().unwrap()),
                    d[8..].to_vec(),
                    false,
                )),
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let len = u32::from_be_bytes(d[8..12].try_into().unwrap());
                    content.push((
                        u64::from_be_bytes(d[..8].try_into().unwrap()),
                        vec![0; len as usize],
                        true,
                    ))
                }
                proto::REPLY_TYPE_ERROR => {
                    error = u32::from_be_bytes(d[..4].try_into().unwrap());
                    let mlen = u16::from_be_bytes(d[4..6].try_into().unwrap()) as usize;
                    assert_eq!(d.len(), 6 + mlen);
                    assert!(mlen > 0, "error chunks say why");
                }
                proto::REPLY_TYPE_NONE => assert!(d.is_empty()),
                t => panic!("unexpected chunk type {t}"),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                return (content, error);
            }
        }
    }

    fn meta_query(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    #[tokio::test]
    async fn structured_replies_send_holes_data_errors_and_block_status() {
        let d = tempfile::tempdir().unwrap();
        let vol = volume(d.path());
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(handle_client(s, vol.clone()));
        greet(&mut c).await;
        // Meta contexts need structured replies first.
        c.write_all(&option(
            proto::OPT_SET_META_CONTEXT,
            &meta_query("vol", &["base:allocation"]),
        ))
        .await
        .unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ERR_INVALID);
        c.write_all(&option(proto::OPT_STRUCTURED_REPLY, b"x"))
            .await
            .unwrap();
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ERR_INVALID);
        c.write_all(&option(proto::OPT_STRUCTURED_REPLY, b""))
            .await
            .unwrap();
        assert_eq!(
            option_reply(&mut c).await,
            (proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, vec![])
        );
        c.write_all(&option(
            proto::OPT_LIST_META_CONTEXT,
            &meta_query("vol", &["base:"]),
        ))
        .await
        .unwrap();
        let (_, t, data) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_META_CONTEXT);
        assert_eq!(&data[..4], &0u32.to_be_bytes());
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);
        c.write_all(&option(
            proto::OPT_SET_META_CONTEXT,
            &meta_query("vol", &["qemu:nothing", "base:allocation"]),
        ))
        .await
        .unwrap();
        let (_, t, data) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_META_CONTEXT);
        assert_eq!(&data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&0u16.to_be_bytes());
        c.write_all(&option(proto::OPT_GO, &go)).await.unwrap();
        let (_, t, info) = option_reply(&mut c).await;
        assert_eq!(t, proto::REP_INFO);
        let tflags = u16::from_be_bytes([info[10], info[11]]);
        assert_ne!(tflags & proto::TF_SEND_DF, 0);
        assert_eq!(option_reply(&mut c).await.1, proto::REP_ACK);

        // A secondary's refusal is an error chunk with a message.
        c.write_all(&request(0, 0, 1, 0, 512)).await.unwrap();
        assert_eq!(structured(&mut c, 1).await, (vec![], proto::EPERM));
        vol.promote(&[]).await.unwrap();

        let mut w = request(1, proto::CMD_FLAG_FUA, 2, 8192, 4);
        w.extend_from_slice(b"abcd");
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 2));

        // Fragmented: what reads as zeroes goes as holes; together the chunks cover
        // the request exactly, and the data is there.
        c.write_all(&request(0, 0, 3, 0, 16384)).await.unwrap();
        let (content, err) = structured(&mut c, 3).await;
        assert_eq!(err, 0);
        let mut whole = vec![0xffu8; 16384];
        let mut covered = 0;
        for (off, bytes, hole) in &content {
            if *hole {
                assert!(bytes.iter().all(|b| *b == 0));
            }
            whole[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
            covered += bytes.len();
        }
        assert_eq!(covered, 16384);
        assert_eq!(&whole[8192..8196], b"abcd");
        assert!(whole[..8192].iter().all(|b| *b == 0));
        assert!(content.iter().any(|(_, _, hole)| *hole));
        // Fill the connection's buffers with something other than zeroes first: reused
        // buffers must not leak old data into holes.
        let mut w = request(1, 0, 31, 32768, 16384);
        w.extend(std::iter::repeat_n(0xee, 16384));
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 31));
        c.write_all(&request(0, 0, 32, 32768, 16384)).await.unwrap();
        let (content, _) = structured(&mut c, 32).await;
        assert!(content.iter().all(|(_, b, _)| b.iter().all(|x| *x == 0xee)));
        // DF: one content chunk, data with its zeroes.
        c.write_all(&request(0, proto::CMD_FLAG_DF, 4, 0, 16384))
            .await
            .unwrap();
        let (content, err) = structured(&mut c, 4).await;
        assert_eq!(err, 0);
        assert_eq!(content.len(), 1);
        assert_eq!(content[0].0, 0);
        assert!(!content[0].2);
        assert_eq!(&content[0].1[8192..8196], b"abcd");
        assert!(content[0].1[..8192].iter().all(|x| *x == 0));
        assert!(content[0].1[8196..].iter().all(|x| *x == 0));
        // Nothing but zeroes: a single hole, even with DF.
        c.write_all(&request(0, proto::CMD_FLAG_DF, 5, 65536, 65536))
            .await
            .unwrap();
        let (content, err) = structured(&mut c, 5).await;
        assert_eq!((content.len(), content[0].2, err), (1, true, 0));
        // Errors: out of range, and a bad flag.
        c.write_all(&request(0, 0, 6, (1 << 20) - 2, 4))
            .await
            .unwrap();
        assert_eq!(structured(&mut c, 6).await, (vec![], proto::EINVAL));
        c.write_all(&request(0, proto::CMD_FLAG_REQ_ONE, 7, 0, 4))
            .await
            .unwrap();
        assert_eq!(structured(&mut c, 7).await, (vec![], proto::EINVAL));

        // Block status: descriptors cover the range; the written block is data.
        c.write_all(&request(7, 0, 8, 0, 1 << 20)).await.unwrap();
        let (flags, typ, ck, d) = chunk(&mut c).await;
        assert_eq!(
            (flags, typ, ck),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, 8)
        );
        assert_eq!(&d[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        let descs: Vec<(u32, u32)> = d[4..]
            .chunks(8)
            .map(|x| {
                (
                    u32::from_be_bytes(x[..4].try_into().unwrap()),
                    u32::from_be_bytes(x[4..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(descs.iter().map(|x| u64::from(x.0)).sum::<u64>(), 1 << 20);
        let mut at = 0u64;
        for (l, f) in &descs {
            if (at..at + u64::from(*l)).contains(&8192) {
                assert_eq!(*f, 0, "the written block is allocated: {descs:?}");
            }
            at += u64::from(*l);
        }
        c.write_all(&request(7, proto::CMD_FLAG_REQ_ONE, 9, 0, 1 << 20))
            .await
            .unwrap();
        let (_, _, _, d) = chunk(&mut c).await;
        assert_eq!(d.len(), 12);
        c.write_all(&request(7, 0, 10, 1 << 20, 1)).await.unwrap();
        assert_eq!(structured(&mut c, 10).await, (vec![], proto::EINVAL));

        c.write_all(&request(2, 0, 11, 0, 0)).await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(server.await.unwrap().is_ok());
    }

    /// Writes while a peer is away mark its dirty bitmap; the bits reach the disk in one
    /// save per batch of concurrent writes, and every write is acknowledged only after
    /// the save that covers it.
    #[tokio::test]
    async fn dirty_bits_are_saved_once_per_batch_and_before_the_ack() {
        let d = tempfile::tempdir().unwrap();
        // `b` is configured but never reachable (the replica is not started).
        let vol = volume_with_peers(d.path(), vec![("b".into(), "127.0.0.1:9".parse().unwrap())]);
        vol.promote(&["b".into()]).await.unwrap();
        let writes: Vec<_> = (0..16u64)
            .map(|i| {
                let v = vol.clone();
                tokio::spawn(async move {
                    v.write(i * 65536, 4096, Some(Arc::new(vec![7u8; 4096])), false)
                        .await
                        .map(|()| {
                            // Acknowledged: this write's region must be on disk already.
                            let m = crate::meta::Meta::load(v.dir()).unwrap();
                            assert!(m.dirty["b"].contains(&i), "region {i} acked before saved");
                        })
                })
            })
            .collect();
        for w in writes {
            w.await.unwrap().unwrap();
        }
        let m = crate::meta::Meta::load(vol.dir()).unwrap();
        assert_eq!(m.dirty_count("b"), 16);
        let saves = vol.bitmap_saves();
        assert!(
            (1..16).contains(&saves),
            "{saves} saves for 16 concurrent writes"
        );
        // Writing a region already saved dirty saves nothing.
        vol.write(0, 4096, Some(Arc::new(vec![8u8; 4096])), false)
            .await
            .unwrap();
        assert_eq!(vol.bitmap_saves(), saves);
    }

    #[test]
    fn pooled_buffers_have_the_asked_length_and_are_reused() {
        let p = Pool::default();
        let a = p.take(4096);
        assert_eq!(a.len(), 4096);
        let addr = a.as_ptr();
        p.give(a);
        let b = p.take(1024);
        assert_eq!((b.len(), b.as_ptr()), (1024, addr));
        p.give(b);
        assert_eq!(p.take(8192).len(), 8192);
        // Huge buffers are not kept.
        p.give(vec![0; POOL_MAX_BUFFER + 1]);
        assert!(
            p.0.lock()
                .unwrap()
                .iter()
                .all(|b| b.capacity() <= POOL_MAX_BUFFER)
        );
    }

    thread_local!(static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();

    /// Counts panics on a fuzzing thread, including those in spawned request tasks (which
    /// tokio would otherwise swallow into a JoinError nobody reads).
    fn count_panics() {
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if FUZZING.with(|f| f.get()) {
                    PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                prev(info)
            }));
        });
    }

    /// Feeds `bytes` to a fresh server (optionally after a valid GO) and checks that the
    /// server ends, with no panic in it or its request tasks, once the client hangs up.
    fn fuzz(bytes: Vec<u8>, after_go: bool) -> Result<(), TestCaseError> {
        fuzz_session(bytes, after_go, false)
    }

    /// As [`fuzz`]; `structured` negotiates structured replies and `base:allocation`
    /// before GO, so the structured read and block status paths get the traffic.
    fn fuzz_session(bytes: Vec<u8>, after_go: bool, structured: bool) -> Result<(), TestCaseError> {
        count_panics();
        let before = PANICS.load(std::sync::atomic::Ordering::SeqCst);
        FUZZING.with(|f| f.set(true));
        let r = fuzz_inner(bytes, after_go, structured);
        FUZZING.with(|f| f.set(false));
        prop_assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), before);
        r
    }

    fn fuzz_inner(bytes: Vec<u8>, after_go: bool, structured: bool) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let d = tempfile::tempdir().unwrap();
            let vol = volume(d.path());
            vol.promote(&[]).await.unwrap();
            let (c, s) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(handle_client(s, vol));
            let (mut cr, mut cw) = tokio::io::split(c);
            let feed = async move {
                let mut pre = (proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
                    .to_be_bytes()
                    .to_vec();
                if structured {
                    pre.extend_from_slice(&option(proto::OPT_STRUCTURED_REPLY, b""));
                    pre.extend_from_slice(&option(
                        proto::OPT_SET_META_CONTEXT,
                        &meta_query("vol", &["base:allocation"]),
                    ));
                }
                if after_go {
                    let mut info = 3u32.to_be_bytes().to_vec();
                    info.extend_from_slice(b"vol");
                    info.extend_from_slice(&0u16.to_be_bytes());
                    pre.extend_from_slice(&option(proto::OPT_GO, &info));
                }
                let _ = cw.write_all(&pre).await;
                let _ = cw.write_all(&bytes).await;
                let _ = cw.shutdown().await;
            };
            let read_all = async move {
                let mut sink = Vec::new();
                let _ = cr.read_to_end(&mut sink).await;
            };
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(feed, read_all);
                server.await
            })
            .await;
            match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(TestCaseError::fail(format!("server task failed: {e}"))),
                Err(_) => Err(TestCaseError::fail("server did not finish")),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_handshake_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz(b, false)?;
        }

        #[test]
        fn random_request_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz(b, true)?;
        }

        /// Valid-looking requests with random fields (the decoder's magic is right, so the
        /// fuzzing reaches the command handlers).
        #[test]
        fn random_structured_option_and_request_bytes_never_panic(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            go: bool,
        ) {
            fuzz_session(b, go, true)?;
        }

        #[test]
        fn random_requests_never_panic(
            structured: bool,
            reqs in proptest::collection::vec((0u16..10, any::<u16>(), any::<u64>(), any::<u32>()), 1..8),
        ) {
            let mut b = Vec::new();
            for (cmd, flags, off, len) in reqs {
                // Cap lengths so a write's payload is what the test supplies.
                let len = len % 8192;
                b.extend_from_slice(&request(cmd, flags & 0x1f, 1, off % (2 << 20), len));
                if cmd == 1 {
                    b.extend(std::iter::repeat_n(0xee, len as usize));
                }
            }
            fuzz_session(b, true, structured)?;
        }
    }
}
