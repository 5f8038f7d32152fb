//! Mutual authentication of two nodes with the cluster secret, and per-frame MACs.
//!
//! Handshake (fixed-size messages, before any frame):
//! 1. client -> server: `MAGIC`, version (u16), client node id (u64), client nonce (32 B);
//! 2. server -> client: `MAGIC`, version, server node id, server nonce, server proof (32 B);
//! 3. client -> server: client proof (32 B);
//! 4. server -> client: one byte `ACCEPTED`.
//!
//! Proofs are BLAKE3 keyed hashes under a key derived from the secret, over a
//! direction label, both nonces and both ids: a proof cannot be replayed on another
//! connection or reflected back as the other side's proof. Neither side sends a byte
//! of application data before the peer proved it knows the secret. After the handshake
//! each direction has its own MAC key; every frame carries a 16-byte MAC over its
//! sequence number and payload, so frames cannot be forged, replayed or reordered.

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::RpcError;

pub const MAGIC: [u8; 8] = *b"CSVRPC\0\x01";
pub const VERSION: u16 = 1;
const ACCEPTED: u8 = 0xA5;
const HELLO_LEN: usize = 8 + 2 + 8 + 32;

/// The cluster secret, reduced to a 32-byte key. Never logged.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Derives the key from the secret file's bytes (surrounding whitespace ignored).
    pub fn from_secret(secret: &[u8]) -> Result<Self, RpcError> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < 16 {
            return Err(RpcError::WeakSecret(trimmed.len()));
        }
        Ok(ClusterKey(blake3::derive_key(
            "csvd cluster secret v1",
            trimmed,
        )))
    }

    fn proof(&self, label: &str, c: &Hello, s: &Hello) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label.as_bytes());
        h.update(&c.nonce);
        h.update(&s.nonce);
        h.update(&c.node.to_le_bytes());
        h.update(&s.node.to_le_bytes());
        *h.finalize().as_bytes()
    }

    fn direction_key(&self, label: &str, c: &Hello, s: &Hello) -> MacKey {
        MacKey(self.proof(label, c, s))
    }
}

/// A per-direction MAC key.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl MacKey {
    pub fn mac(&self, seq: u64, payload: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&seq.to_le_bytes());
        h.update(payload);
        let full = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full.as_bytes()[..16]);
        out
    }
}

struct Hello {
    node: u64,
    nonce: [u8; 32],
}

impl Hello {
    fn fresh(node: u64) -> Self {
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        Hello { node, nonce }
    }

    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_be_bytes());
        b[10..18].copy_from_slice(&self.node.to_be_bytes());
        b[18..].copy_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, RpcError> {
        if b[..8] != MAGIC {
            return Err(RpcError::Handshake(
                "not a csvd RPC peer (bad magic)".into(),
            ));
        }
        let version = u16::from_be_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(RpcError::Handshake(format!(
                "protocol version {version} not supported (this node speaks {VERSION})"
            )));
        }
        let mut node = [0u8; 8];
        node.copy_from_slice(&b[10..18]);
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&b[18..]);
        Ok(Hello {
            node: u64::from_be_bytes(node),
            nonce,
        })
    }
}

/// The outcome of a handshake: who the peer is and the two MAC keys.
pub struct Session {
    pub peer_node: u64,
    pub send_key: MacKey,
    pub recv_key: MacKey,
}

/// Client side of the handshake.
pub async fn client_handshake<S>(io: &mut S, key: &ClusterKey, me: u64) -> Result<Session, RpcError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mine = Hello::fresh(me);
    io.write_all(&mine.encode()).await.map_err(RpcError::Io)?;
    let mut buf = [0u8; HELLO_LEN];
    io.read_exact(&mut buf).await.map_err(RpcError::Io)?;
    let theirs = Hello::decode(&buf)?;
    let mut proof = [0u8; 32];
    io.read_exact(&mut proof).await.map_err(RpcError::Io)?;
    if !constant_eq(&proof, &key.proof("csvd-server-proof", &mine, &theirs)) {
        return Err(RpcError::Unauthenticated(
            "the server does not know the cluster secret".into(),
        ));
    }
    io.write_all(&key.proof("csvd-client-proof", &mine, &theirs))
        .await
        .map_err(RpcError::Io)?;
    let mut ok = [0u8; 1];
    io.read_exact(&mut ok).await.map_err(|_| {
        RpcError::Unauthenticated("the server refused our proof of the cluster secret".into())
    })?;
    if ok[0] != ACCEPTED {
        return Err(RpcError::Handshake("unexpected handshake answer".into()));
    }
    Ok(Session {
        peer_node: theirs.node,
        send_key: key.direction_key("csvd-c2s", &mine, &theirs),
        recv_key: key.direction_key("csvd-s2c", &mine, &theirs),
    })
}

/// Server side of the handshake.
pub async fn server_handshake<S>(io: &mut S, key: &ClusterKey, me: u64) -> Result<Session, RpcError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = [0u8; HELLO_LEN];
    io.read_exact(&mut buf).await.map_err(RpcError::Io)?;
    let theirs = Hello::decode(&buf)?;
    let mine = Hello::fresh(me);
    io.write_all(&mine.encode()).await.map_err(RpcError::Io)?;
    io.write_all(&key.proof("csvd-server-proof", &theirs, &mine))
        .await
        .map_err(RpcError::Io)?;
    let mut proof = [0u8; 32];
    io.read_exact(&mut proof).await.map_err(RpcError::Io)?;
    if !constant_eq(&proof, &key.proof("csvd-client-proof", &theirs, &mine)) {
        return Err(RpcError::Unauthenticated(format!(
            "peer claiming node {} does not know the cluster secret",
            theirs.node
        )));
    }
    io.write_all(&[ACCEPTED]).await.map_err(RpcError::Io)?;
    Ok(Session {
        peer_node: theirs.node,
        send_key: key.direction_key("csvd-s2c", &theirs, &mine),
        recv_key: key.direction_key("csvd-c2s", &theirs, &mine),
    })
}

/// Compares two MACs without an early exit.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
