//! The NBD wire protocol (fixed newstyle handshake; simple and structured replies;
//! the `base:allocation` metadata context): constants, decoders and encoders. Decoders take bytes and return values or a [`ProtoError`]; they never
//! index past what they were given, so malformed traffic cannot panic the server.

use thiserror::Error;

pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

// Information types in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured replies: chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const CHUNK_HEADER_LEN: usize = 20;

/// The one metadata context served, and its flags in a block status descriptor.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values carried in replies (Linux errno numbering, as the protocol requires).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest payload one request may carry; larger requests are refused rather than
/// buffered, so a client cannot make the server allocate without bound.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload accepted during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
pub const REQUEST_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {found:#x}: an NBD {what} must start with {expected:#x}")]
    BadMagic {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("option payload of {0} bytes exceeds the limit of {MAX_OPTION_LEN}")]
    OptionTooLong(u32),
    #[error("truncated {what}: needs {needed} bytes, got {got}")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("export name is not UTF-8")]
    NameNotUtf8,
}

/// A command in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Other(u16),
}

impl Cmd {
    fn from_u16(v: u16) -> Cmd {
        match v {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Disc,
            3 => Cmd::Flush,
            4 => Cmd::Trim,
            6 => Cmd::WriteZeroes,
            7 => Cmd::BlockStatus,
            o => Cmd::Other(o),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: Cmd,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn truncated(what: &'static str, needed: usize, got: usize) -> ProtoError {
    ProtoError::Truncated { what, needed, got }
}

/// Decodes a 28-byte request header.
pub fn decode_request(b: &[u8]) -> Result<Request, ProtoError> {
    let t = || truncated("request header", REQUEST_LEN, b.len());
    let magic = be_u32(b, 0).ok_or_else(t)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: magic.into(),
            expected: REQUEST_MAGIC.into(),
        });
    }
    Ok(Request {
        flags: be_u16(b, 4).ok_or_else(t)?,
        cmd: Cmd::from_u16(be_u16(b, 6).ok_or_else(t)?),
        cookie: be_u64(b, 8).ok_or_else(t)?,
        offset: be_u64(b, 16).ok_or_else(t)?,
        length: be_u32(b, 24).ok_or_else(t)?,
    })
}

/// Decodes a 16-byte option header into (option, payload length).
pub fn decode_option_header(b: &[u8]) -> Result<(u32, u32), ProtoError> {
    let t = || truncated("option header", OPTION_HEADER_LEN, b.len());
    let magic = be_u64(b, 0).ok_or_else(t)?;
    if magic != OPTS_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
            expected: OPTS_MAGIC,
        });
    }
    let opt = be_u32(b, 8).ok_or_else(t)?;
    let len = be_u32(b, 12).ok_or_else(t)?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((opt, len))
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and requested info types.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, ProtoError> {
    let name_len = be_u32(b, 0).ok_or_else(|| truncated("info request", 4, b.len()))? as usize;
    let name_end = 4usize
        .checked_add(name_len)
        .ok_or_else(|| truncated("info request name", usize::MAX, b.len()))?;
    let name = b
        .get(4..name_end)
        .ok_or_else(|| truncated("info request name", name_end, b.len()))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| ProtoError::NameNotUtf8)?
        .to_owned();
    let count = be_u16(b, name_end)
        .ok_or_else(|| truncated("info request count", name_end + 2, b.len()))?
        as usize;
    let need = name_end + 2 + count * 2;
    if b.len() != need {
        return Err(truncated("info request list", need, b.len()));
    }
    let infos = (0..count)
        .filter_map(|i| be_u16(b, name_end + 2 + i * 2))
        .collect();
    Ok(InfoRequest { name, infos })
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: an export name
/// and the queries (context names, or namespaces such as `base:` when listing).
#[derive(Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// A length-prefixed (32-bit) UTF-8 string at `at`; returns it and where it ends.
fn string_at(b: &[u8], at: usize, what: &'static str) -> Result<(String, usize), ProtoError> {
    let len = be_u32(b, at).ok_or_else(|| truncated(what, at + 4, b.len()))? as usize;
    let end = (at + 4)
        .checked_add(len)
        .ok_or_else(|| truncated(what, usize::MAX, b.len()))?;
    let s = b
        .get(at + 4..end)
        .ok_or_else(|| truncated(what, end, b.len()))?;
    let s = std::str::from_utf8(s).map_err(|_| ProtoError::NameNotUtf8)?;
    Ok((s.to_owned(), end))
}

pub fn decode_meta_context_request(b: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let (name, mut at) = string_at(b, 0, "meta context export name")?;
    let count = be_u32(b, at).ok_or_else(|| truncated("meta context count", at + 4, b.len()))?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Each query takes at least its 4-byte length, so a huge count runs out of
        // payload (an error) long before it could allocate much.
        let (q, end) = string_at(b, at, "meta context query")?;
        queries.push(q);
        at = end;
    }
    if at != b.len() {
        return Err(truncated("meta context request", at, b.len()));
    }
    Ok(MetaContextRequest { name, queries })
}

/// Encodes an option reply header followed by `data`.
pub fn encode_option_reply(out: &mut Vec<u8>, opt: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Option payloads we send are small (names, fixed info records).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

pub fn encode_simple_reply(out: &mut [u8; 16], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Encodes a structured reply chunk header for a payload of `len` bytes.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Encodes a final NBD_REPLY_TYPE_ERROR chunk carrying `error` and a message for people.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    // Messages are ours and short; cut at a character boundary all the same.
    let mut m = message;
    while m.len() > 1024 {
        let mut cut = 1024;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m = &m[..cut];
    }
    let len = 6 + m.len() as u32;
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m.as_bytes());
}

/// Encodes an NBD_REPLY_TYPE_OFFSET_HOLE chunk.
pub fn encode_hole_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Encodes the header of an NBD_REPLY_TYPE_OFFSET_DATA chunk; `len` data bytes follow.
pub fn encode_data_chunk_head(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    encode_chunk_header(
        out,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_bytes(flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn decodes_a_write_request() {
        let r = decode_request(&request_bytes(1, 1, 7, 4096, 512)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                cmd: Cmd::Write,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
    }

    #[test]
    fn rejects_bad_request_magic_and_short_headers() {
        let mut b = request_bytes(0, 0, 0, 0, 0);
        assert!(matches!(
            decode_request(&b[..27]),
            Err(ProtoError::Truncated { .. })
        ));
        b[0] = 0;
        assert!(matches!(
            decode_request(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_round_trip_and_length_mismatch() {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"vol");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = decode_info_request(&b).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        b.push(0);
        assert!(decode_info_request(&b).is_err());
        // A name length beyond the payload is an error, not a panic.
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"xx");
        assert!(decode_info_request(&huge).is_err());
    }

    #[test]
    fn oversized_option_is_refused() {
        let mut b = OPTS_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Err(ProtoError::OptionTooLong(MAX_OPTION_LEN + 1))
        );
    }

    #[test]
    fn meta_context_requests_decode_and_refuse_short_payloads() {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"vol");
        b.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        let r = decode_meta_context_request(&b).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.queries, ["base:allocation", "qemu:dirty-bitmap:x"]);
        assert!(decode_meta_context_request(&b[..b.len() - 1]).is_err());
        b.push(0);
        assert!(decode_meta_context_request(&b).is_err());
        // A count far beyond the payload is an error, not an allocation.
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_context_request(&huge).is_err());
    }

    #[test]
    fn error_chunks_carry_the_errno_and_a_bounded_message() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, EPERM, "not primary");
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[8..16], &9u64.to_be_bytes());
        assert_eq!(&out[16..20], &(6 + 11u32).to_be_bytes());
        assert_eq!(&out[20..24], &EPERM.to_be_bytes());
        assert_eq!(&out[26..], b"not primary");
        out.clear();
        encode_error_chunk(&mut out, 1, EIO, &"é".repeat(2000));
        assert!(out.len() <= CHUNK_HEADER_LEN + 6 + 1024);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_decoders(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_request(&b);
            let _ = decode_option_header(&b);
            let _ = decode_info_request(&b);
            let _ = decode_meta_context_request(&b);
        }

        #[test]
        fn valid_requests_decode_exactly(flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) {
            let r = decode_request(&request_bytes(flags, cmd, cookie, off, len)).unwrap();
            prop_assert_eq!(r.flags, flags);
            prop_assert_eq!(r.cookie, cookie);
            prop_assert_eq!(r.offset, off);
            prop_assert_eq!(r.length, len);
        }
    }
}
