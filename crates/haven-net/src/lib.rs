//! Haven's node-to-node and client transport: mutual TLS with a cluster CA, join tokens.
