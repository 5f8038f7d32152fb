//! lockmgr: the Raft-backed metadata and lock service of csvd.
//!
//! - `types`: the openraft type configuration and the state machine's commands;
//! - `state`: the metadata state machine (namespace, extents, allocation, sessions,
//!   locks, nodes) as plain deterministic logic;
//! - `store`: the Raft log and state machine storage on redb;
//! - `rpc`: framed, versioned, authenticated node-to-node messages over TCP;
//! - `network`: openraft's network on top of `rpc`;
//! - `node`: one metadata node (Raft, RPC server, membership, sessions, client API);
//! - `client`: the volume layer's `MetaClient` over a node, or over an in-memory state.

pub mod client;
pub mod network;
pub mod node;
pub mod rpc;
pub mod state;
pub mod store;
pub mod types;
