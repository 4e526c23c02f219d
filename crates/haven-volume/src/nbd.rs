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

/// What one connection's requests in progress may hold, in KiB: payload buffers are
/// bounded per client, however deep its queue (each request also costs 1 KiB).
const BUDGET_KIB: u32 = 64 << 10;

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
    let slots = Arc::new(Semaphore::new(BUDGET_KIB as usize));
    let mut header = [0u8; proto::REQUEST_LEN];
    loop {
        rd.read_exact(&mut header).await?;
        let req = proto::decode_request(&header)?;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        match req.cmd {
            Cmd::Disc => {
                // Finish what is in flight, then close.
                let _all = slots.acquire_many(BUDGET_KIB).await;
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
            let mut d = vec![0u8; req.length as usize];
            rd.read_exact(&mut d).await?;
            Some(Arc::new(d))
        } else {
            None
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::SplitBrainPolicy;
    use crate::volume::VolumeConfig;
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    fn volume(dir: &Path) -> Arc<Volume> {
        crate::meta::create(dir, "vol", "a", 1 << 20, 65536, true).unwrap();
        Volume::open(VolumeConfig {
            dir: dir.to_owned(),
            listen: None,
            peers: vec![],
            policy: SplitBrainPolicy::Disconnect,
            allow_two_primaries: false,
            resync_rate: None,
            peer_timeout: Duration::from_secs(5),
            tls: None,
            fence_peers: false,
            freeze_timeout: Duration::from_secs(60),
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
        count_panics();
        let before = PANICS.load(std::sync::atomic::Ordering::SeqCst);
        FUZZING.with(|f| f.set(true));
        let r = fuzz_inner(bytes, after_go);
        FUZZING.with(|f| f.set(false));
        prop_assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), before);
        r
    }

    fn fuzz_inner(bytes: Vec<u8>, after_go: bool) -> Result<(), TestCaseError> {
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
        fn random_requests_never_panic(
            reqs in proptest::collection::vec((0u16..10, any::<u16>(), any::<u64>(), any::<u32>()), 1..8),
        ) {
            let mut b = Vec::new();
            for (cmd, flags, off, len) in reqs {
                // Cap lengths so a write's payload is what the test supplies.
                let len = len % 8192;
                b.extend_from_slice(&request(cmd, flags, 1, off % (2 << 20), len));
                if cmd == 1 {
                    b.extend(std::iter::repeat_n(0xee, len as usize));
                }
            }
            fuzz(b, true)?;
        }
    }
}
