//! Replicated block volumes served over NBD, with synchronous (protocol C) replication.
