//! The LAN side of the redirector: how a redirected request reaches a peer, and what the peer
//! needs to check it.
//!
//! - [`PeerTransport`]: sends one encoded request to a peer and returns its encoded answer
//!   (implemented by the daemon over the cluster's authenticated RPC, and in-process in tests).
//!   Its errors say whether the request may have reached the peer ([`TransportError::Lost`]) or
//!   certainly did not ([`TransportError::NotSent`]); the requester treats a lost write as a
//!   ghost on that peer.
//! - [`FenceCheck`]: the peer's view of the lock table, to refuse writes whose fencing token is
//!   stale.
//! - The envelope: a [`crate::frame`] request travels with the lock key its fencing token belongs
//!   to (the frame itself carries only the token):
//!
//! ```text
//!   0  u16 key length (big-endian, at most MAX_KEY_LEN; 0 = unfenced)
//!   2  key bytes (UTF-8)
//!   .. the request frame (crate::frame::Request)
//! ```
//!
//! Invariant: [`decode_envelope`] never panics, never allocates more than its input, and accepts
//! exactly what [`encode_envelope`] produces.

use std::future::Future;
use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};
use csv_core::meta::{FencingToken, NodeId, SessionId};

use crate::frame::{FrameError, Request};

/// A boxed future for the object-safe traits of this module.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Longest lock key an envelope carries.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a request could not be carried to a peer or answered by it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The request certainly did not reach the peer (no connection, not a member, refused).
    #[error("request not sent to peer {peer}: {reason}")]
    NotSent { peer: NodeId, reason: String },
    /// The connection failed after the request may have been delivered: its outcome is unknown.
    #[error("request to peer {peer} lost: {reason}")]
    Lost { peer: NodeId, reason: String },
}

/// Carries encoded requests to peers. A call must not give up on its own before the peer answers
/// or the connection fails: the redirector applies its own timeout and keeps waiting on a timed
/// out call to learn when the request has resolved.
pub trait PeerTransport: Send + Sync + 'static {
    fn call(&self, peer: NodeId, request: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>>;

    /// The session `node` holds as this node knows it (its own, or its replica's view of a
    /// peer's), `None` when it holds none. A session belongs to one process of that node, so a
    /// peer that answers a settle naming the session it held when a request was sent is the
    /// process that received it.
    fn incarnation(&self, node: NodeId) -> Option<SessionId>;
}

/// The peer's verdict on a write's fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceVerdict {
    /// The token is the current grant of the key (or newer than anything this replica knows).
    Valid,
    /// The key is held under another, newer token, or no longer held under this one.
    Stale { current: FencingToken },
}

/// The lock table as a peer sees it.
pub trait FenceCheck: Send + Sync + 'static {
    fn check(&self, key: &str, token: FencingToken) -> BoxFuture<'_, FenceVerdict>;

    /// Whether this node may issue LUN writes now (its lease is valid). A peer issues a
    /// redirected write only then, so a peer cut off from the cluster stops writing for others
    /// when it stops writing for itself, before its session can expire anywhere.
    fn may_write(&self) -> bool;
}

/// A [`FenceCheck`] that accepts every token (for nodes without a lock service: tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFence;

impl FenceCheck for NoFence {
    fn check(&self, _key: &str, _token: FencingToken) -> BoxFuture<'_, FenceVerdict> {
        Box::pin(async { FenceVerdict::Valid })
    }

    fn may_write(&self) -> bool {
        true
    }
}

/// What is wrong with an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope too short ({len} bytes)")]
    Short { len: usize },
    #[error("envelope key of {len} bytes exceeds {MAX_KEY_LEN}")]
    KeyTooLong { len: usize },
    #[error("envelope key is not UTF-8")]
    KeyNotUtf8,
    #[error("envelope request frame is incomplete")]
    Incomplete,
    #[error("envelope carries trailing bytes after its request frame")]
    Trailing,
    #[error("envelope request frame is invalid")]
    Frame(#[source] FrameError),
}

/// Encodes `key` (empty when the request is unfenced) and `req`.
pub fn encode_envelope(key: &str, req: &Request) -> Result<Bytes, EnvelopeError> {
    if key.len() > MAX_KEY_LEN {
        return Err(EnvelopeError::KeyTooLong { len: key.len() });
    }
    let mut b = BytesMut::with_capacity(2 + key.len() + req.encoded_len());
    b.put_u16(key.len() as u16);
    b.put_slice(key.as_bytes());
    req.encode(&mut b).map_err(EnvelopeError::Frame)?;
    Ok(b.freeze())
}

/// Decodes an envelope. A payload checksum mismatch is returned as
/// `EnvelopeError::Frame(FrameError::PayloadCrc { request_id, .. })` so the peer can answer it.
pub fn decode_envelope(buf: &[u8]) -> Result<(String, Request), EnvelopeError> {
    if buf.len() < 2 {
        return Err(EnvelopeError::Short { len: buf.len() });
    }
    let klen = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if klen > MAX_KEY_LEN {
        return Err(EnvelopeError::KeyTooLong { len: klen });
    }
    let rest = &buf[2..];
    if rest.len() < klen {
        return Err(EnvelopeError::Short { len: buf.len() });
    }
    let key = std::str::from_utf8(&rest[..klen])
        .map_err(|_| EnvelopeError::KeyNotUtf8)?
        .to_string();
    let mut frame = BytesMut::from(&rest[klen..]);
    let req = Request::decode(&mut frame)
        .map_err(EnvelopeError::Frame)?
        .ok_or(EnvelopeError::Incomplete)?;
    if !frame.is_empty() {
        return Err(EnvelopeError::Trailing);
    }
    Ok((key, req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RequestBody;
    use proptest::prelude::*;

    fn req(data: &[u8]) -> Request {
        Request {
            id: 9,
            offset: 4096,
            token: 17,
            node: 2,
            body: RequestBody::Write {
                data: Bytes::copy_from_slice(data),
                fua: false,
            },
        }
    }

    #[test]
    fn envelopes_round_trip_and_reject_damage() {
        let e = encode_envelope("data:42", &req(b"abc")).unwrap();
        assert_eq!(
            decode_envelope(&e).unwrap(),
            ("data:42".into(), req(b"abc"))
        );
        let e0 = encode_envelope("", &req(b"x")).unwrap();
        assert_eq!(decode_envelope(&e0).unwrap().0, "");
        assert!(matches!(
            decode_envelope(&e[..e.len() - 1]),
            Err(EnvelopeError::Incomplete)
        ));
        let mut long = e.to_vec();
        long.push(0);
        assert_eq!(decode_envelope(&long), Err(EnvelopeError::Trailing));
        let mut bad = e.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            decode_envelope(&bad),
            Err(EnvelopeError::Frame(FrameError::PayloadCrc {
                request_id: 9,
                ..
            }))
        ));
        assert!(encode_envelope(&"k".repeat(MAX_KEY_LEN + 1), &req(b"x")).is_err());
        assert_eq!(
            decode_envelope(&[0xff, 0xff]),
            Err(EnvelopeError::KeyTooLong { len: 0xffff })
        );
        assert_eq!(
            decode_envelope(&[0, 2, 0xc3, 0x28]),
            Err(EnvelopeError::KeyNotUtf8)
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_envelope_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_envelope(&bytes);
        }

        #[test]
        fn envelopes_round_trip(key in "[a-z:0-9]{0,40}", data in proptest::collection::vec(any::<u8>(), 1..300), token: u64) {
            let mut r = req(&data);
            r.token = token;
            let e = encode_envelope(&key, &r).unwrap();
            prop_assert_eq!(decode_envelope(&e).unwrap(), (key, r));
        }

        #[test]
        fn damaged_envelopes_never_panic(key in "[a-z]{0,8}", data in proptest::collection::vec(any::<u8>(), 1..64), at: usize, bit in 0u8..8) {
            let mut e = encode_envelope(&key, &req(&data)).unwrap().to_vec();
            let i = at % e.len();
            e[i] ^= 1 << bit;
            let _ = decode_envelope(&e);
        }
    }
}
