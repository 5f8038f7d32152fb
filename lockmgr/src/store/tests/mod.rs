//! Tests of the Raft store: openraft's conformance suite, restart and crash recovery, a
//! 3-node cluster on an in-process network, codec round-trips and fuzzing, and an append
//! benchmark (ignored by default).

mod bench;
mod cluster;
mod codec;
mod recovery;
mod suite;
mod support;
