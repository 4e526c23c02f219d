//! Replicated block volumes served over NBD, with synchronous (protocol C) replication.
//!
//! - [`proto`]: the NBD wire format; [`nbd`]: the server.
//! - [`meta`]: a replica's persistent metadata (generations, epoch, dirty bitmaps).
//! - [`decide`]: pure decisions (sync direction, split brain, promotion).
//! - [`wire`]: the replication protocol; [`volume`]: a running replica.
//! - [`control`]: the JSON-lines control socket used by the CLI.
//! - [`tls`]: mutual TLS for the replication channel.
//! - [`bench`]: Haven volumes beside `qemu-nbd` (`haven bench volume`).

pub mod bench;
pub mod control;
pub mod decide;
pub mod meta;
pub mod nbd;
pub mod proto;
pub mod tls;
pub mod volume;
pub mod wire;
