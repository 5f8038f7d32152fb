//! The I/O redirector: when a node loses its SAN path, its block I/O goes over the LAN to a peer
//! whose path works, without ghost writes ever leaving older data visible.
//!
//! - [`policy`]: the sans-IO path state machine (Direct / Redirected / Paused, failback with
//!   hysteresis and flap damping, the pause bound);
//! - [`ghost`]: the sans-IO ghost-write ledger (newest data over writes with unknown outcome,
//!   rewrites when they resolve);
//! - [`frame`]: the LAN request/response frames (fencing token, crc32c);
//! - [`peer`]: the transport and fence-check seams, and the envelope carrying a frame's lock key;
//! - [`path`]: the node's own SAN path (probe, settle);
//! - [`io`]: [`io::RedirectingLun`], the I/O loop driving policy and ledger behind the `Lun`
//!   trait, and [`io::PeerService`], which serves peers' redirected requests.
pub mod frame;
pub mod ghost;
pub mod io;
pub mod path;
pub mod peer;
pub mod policy;

pub use io::{PeerService, RedirectStats, RedirectingLun, RedirectorConfig};
pub use path::{PlainPath, SanPath, open_san_path};
pub use peer::{FenceCheck, FenceVerdict, NoFence, PeerTransport, TransportError};
