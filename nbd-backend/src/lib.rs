//! nbd-backend: csvd's NBD server and VHD decoding.
//!
//! It knows nothing of Raft or the network between nodes: it serves exports through the traits in
//! [`export`] ([`ExportProvider`] resolves names, [`BlockDevice`] serves one export,
//! [`BackingFile`] is the file underneath), which the node daemon implements over the shared
//! volume. Code map:
//! * [`proto`]: the wire format, pure parsing/encoding;
//! * [`server`]: the tokio server (handshake, pipelined transmission, shutdown);
//! * [`connection`]: per-connection handles for the daemon (write revocation, draining);
//! * [`vhd`]: fixed and dynamic VHD decoding;
//! * [`dir`]: an [`ExportProvider`] over a local directory (tests and the example server);
//! * [`volume`]: the exports over the cluster volume (csv-core), with write ownership and the
//!   live-migration handoff between nodes.

pub mod connection;
pub mod dir;
pub mod export;
pub mod proto;
mod reply;
pub mod server;
pub mod vhd;
pub mod volume;

pub use connection::{ConnectionEvents, ConnectionHandle, ConnectionId};
pub use export::{
    BackingFile, BlockDevice, BoxFuture, DeviceError, ExportError, ExportProvider, Extent,
    FileBacking, OpenPurpose, RawDevice, ReadChunk, ZeroMode, device_for_file,
};
pub use server::{NbdServer, ReadPath, ServerConfig, ServerError};
