//! csv-core: the bottom of csvd. Types, the [`lun::Lun`] trait and its backends,
//! the on-LUN superblock, and the metadata model shared by the metadata service
//! and the protocol frontends. It knows nothing of Raft, FUSE or NBD.

pub mod lun;
pub mod meta;
pub mod superblock;
