//! The replication protocol between replicas: frames of `[kind: u8][len: u32 BE][payload]`.
//! The data path (writes, acks, flushes, resync blocks) is binary; rare control messages
//! carry JSON. Decoding checks every length, so a bad peer cannot panic a replica.

use crate::decide::SideView;
use crate::meta::{DiskState, Role};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const FRAME_HEADER: usize = 5;
/// Frames larger than this are refused (writes are at most one NBD payload).
pub const MAX_FRAME: u32 = crate::proto::MAX_PAYLOAD + 64;

pub const K_HELLO: u8 = 1;
pub const K_WRITE: u8 = 2;
pub const K_FLUSH: u8 = 3;
pub const K_ACK: u8 = 4;
pub const K_RESYNC: u8 = 5;
pub const K_RESYNC_DONE: u8 = 6;
pub const K_RESYNC_DONE_ACK: u8 = 7;
pub const K_GEN: u8 = 8;
pub const K_STATE: u8 = 9;
pub const K_REJECT: u8 = 10;
/// Sent on an idle connection so the other side can tell a silent peer from a dead one.
pub const K_PING: u8 = 11;

pub const WF_FUA: u8 = 1;
pub const WF_ZEROES: u8 = 2;
const WRITE_FIXED: usize = 21;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message kind {kind} needs {needed} bytes, got {got}")]
    Short { kind: u8, needed: usize, got: usize },
    #[error("zero-fill message carries {0} data bytes; it must carry none")]
    ZeroesWithData(usize),
    #[error("message kind {kind}: bad JSON: {source}")]
    Json { kind: u8, source: serde_json::Error },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub volume: String,
    pub size: u64,
    pub region_size: u64,
    pub view: SideView,
    /// The regions the sender wrote while the receiver was away, as `[start, end)`.
    pub dirty_for_peer: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenUpdate {
    pub current_gen: u64,
    pub history: Vec<u64>,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateUpdate {
    pub role: Role,
    pub disk: DiskState,
    pub epoch: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello(Box<Hello>),
    Write {
        seq: u64,
        offset: u64,
        len: u32,
        flags: u8,
        data: &'a [u8],
    },
    Flush {
        seq: u64,
    },
    Ack {
        seq: u64,
    },
    Resync {
        offset: u64,
        data: &'a [u8],
    },
    ResyncDone(GenUpdate),
    ResyncDoneAck,
    Gen(GenUpdate),
    State(StateUpdate),
    Reject(String),
    Ping,
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses a frame header into (kind, payload length).
pub fn decode_header(h: &[u8; FRAME_HEADER]) -> Result<(u8, u32), WireError> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok((h[0], len))
}

pub fn decode(kind: u8, p: &[u8]) -> Result<Msg<'_>, WireError> {
    let short = |needed| WireError::Short {
        kind,
        needed,
        got: p.len(),
    };
    let json = |source| WireError::Json { kind, source };
    Ok(match kind {
        K_HELLO => Msg::Hello(Box::new(serde_json::from_slice(p).map_err(json)?)),
        K_WRITE => {
            let seq = u64_at(p, 0).ok_or_else(|| short(WRITE_FIXED))?;
            let offset = u64_at(p, 8).ok_or_else(|| short(WRITE_FIXED))?;
            let len_bytes = p.get(16..20).ok_or_else(|| short(WRITE_FIXED))?;
            let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
            let flags = *p.get(20).ok_or_else(|| short(WRITE_FIXED))?;
            let data = &p[WRITE_FIXED..];
            if flags & WF_ZEROES != 0 {
                if !data.is_empty() {
                    return Err(WireError::ZeroesWithData(data.len()));
                }
            } else if data.len() != len as usize {
                return Err(short(WRITE_FIXED + len as usize));
            }
            Msg::Write {
                seq,
                offset,
                len,
                flags,
                data,
            }
        }
        K_FLUSH => Msg::Flush {
            seq: u64_at(p, 0).ok_or_else(|| short(8))?,
        },
        K_ACK => Msg::Ack {
            seq: u64_at(p, 0).ok_or_else(|| short(8))?,
        },
        K_RESYNC => Msg::Resync {
            offset: u64_at(p, 0).ok_or_else(|| short(8))?,
            data: &p[8..],
        },
        K_RESYNC_DONE => Msg::ResyncDone(serde_json::from_slice(p).map_err(json)?),
        K_RESYNC_DONE_ACK => Msg::ResyncDoneAck,
        K_GEN => Msg::Gen(serde_json::from_slice(p).map_err(json)?),
        K_STATE => Msg::State(serde_json::from_slice(p).map_err(json)?),
        K_REJECT => Msg::Reject(serde_json::from_slice(p).map_err(json)?),
        K_PING => Msg::Ping,
        k => return Err(WireError::UnknownKind(k)),
    })
}

fn header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

/// Encodes the fixed part of a write frame; the caller sends `data` right after it so
/// the payload is never copied into the frame buffer.
pub fn encode_write_head(
    out: &mut Vec<u8>,
    seq: u64,
    offset: u64,
    len: u32,
    flags: u8,
    data_len: usize,
) {
    header(out, K_WRITE, WRITE_FIXED + data_len);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(flags);
}

pub fn encode_resync_head(out: &mut Vec<u8>, offset: u64, data_len: usize) {
    header(out, K_RESYNC, 8 + data_len);
    out.extend_from_slice(&offset.to_be_bytes());
}

pub fn encode_seq(out: &mut Vec<u8>, kind: u8, seq: u64) {
    header(out, kind, 8);
    out.extend_from_slice(&seq.to_be_bytes());
}

pub fn encode_empty(out: &mut Vec<u8>, kind: u8) {
    header(out, kind, 0);
}

pub fn encode_json<T: Serialize>(out: &mut Vec<u8>, kind: u8, v: &T) {
    // Serialising our own plain structs cannot fail; an empty body would be refused by
    // the peer's decoder rather than misread.
    let body = serde_json::to_vec(v).unwrap_or_default();
    header(out, kind, body.len());
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let h: [u8; FRAME_HEADER] = frame[..FRAME_HEADER].try_into().unwrap();
        let (k, len) = decode_header(&h).unwrap();
        assert_eq!(len as usize, frame.len() - FRAME_HEADER);
        (k, &frame[FRAME_HEADER..])
    }

    #[test]
    fn write_round_trip() {
        let mut f = Vec::new();
        encode_write_head(&mut f, 9, 4096, 3, WF_FUA, 3);
        f.extend_from_slice(b"abc");
        let (k, p) = split(&f);
        assert_eq!(
            decode(k, p).unwrap(),
            Msg::Write {
                seq: 9,
                offset: 4096,
                len: 3,
                flags: WF_FUA,
                data: b"abc"
            }
        );
        // A truncated payload is an error, not a panic or a short write.
        assert!(decode(k, &p[..p.len() - 1]).is_err());
    }

    #[test]
    fn control_round_trip() {
        let mut f = Vec::new();
        let g = GenUpdate {
            current_gen: 5,
            history: vec![3, 1],
            epoch: 2,
        };
        encode_json(&mut f, K_GEN, &g);
        let (k, p) = split(&f);
        assert_eq!(decode(k, p).unwrap(), Msg::Gen(g));
        assert!(matches!(decode(200, &[]), Err(WireError::UnknownKind(200))));
        let h = [K_WRITE, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode_header(&h), Err(WireError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn random_frames_never_panic(kind in 0u8..12, p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(kind, &p);
        }
    }
}
