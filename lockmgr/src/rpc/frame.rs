//! Length-delimited, MAC-protected frames.
//!
//! Wire format of one frame: `u32` big-endian length `L` of what follows, then
//! `L - 16` payload bytes, then a 16-byte MAC over (sequence number, payload).
//! Each direction counts its own sequence numbers from 0. A frame longer than
//! [`MAX_FRAME`], shorter than a MAC, or with a wrong MAC ends the connection: the
//! peer is either broken or not who it claimed to be.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::RpcError;
use super::auth::{MacKey, constant_eq};

/// Largest frame accepted (a snapshot chunk is at most a few MiB).
pub const MAX_FRAME: usize = 64 << 20;
const MAC_LEN: usize = 16;

pub struct FrameReader<R> {
    io: R,
    key: MacKey,
    seq: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, key: MacKey) -> Self {
        FrameReader { io, key, seq: 0 }
    }

    /// The next payload, or `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, RpcError> {
        let mut len = [0u8; 4];
        match self.io.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(RpcError::Io(e)),
        }
        let len = u32::from_be_bytes(len) as usize;
        if !(MAC_LEN..=MAX_FRAME).contains(&len) {
            return Err(RpcError::Malformed(format!(
                "frame length {len} outside {MAC_LEN}..={MAX_FRAME}"
            )));
        }
        let mut buf = vec![0u8; len];
        self.io.read_exact(&mut buf).await.map_err(RpcError::Io)?;
        let (payload, mac) = buf.split_at(len - MAC_LEN);
        if !constant_eq(mac, &self.key.mac(self.seq, payload)) {
            return Err(RpcError::Unauthenticated(format!(
                "frame {} failed its MAC check",
                self.seq
            )));
        }
        self.seq += 1;
        buf.truncate(len - MAC_LEN);
        Ok(Some(buf))
    }
}

pub struct FrameWriter<W> {
    io: W,
    key: MacKey,
    seq: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W, key: MacKey) -> Self {
        FrameWriter { io, key, seq: 0 }
    }

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), RpcError> {
        let len = payload.len() + MAC_LEN;
        if len > MAX_FRAME {
            return Err(RpcError::Malformed(format!(
                "refusing to send a {len}-byte frame (max {MAX_FRAME})"
            )));
        }
        let mac = self.key.mac(self.seq, payload);
        self.seq += 1;
        // One buffer, one write: no small packets with TCP_NODELAY.
        let mut frame = Vec::with_capacity(4 + len);
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&mac);
        self.io.write_all(&frame).await.map_err(RpcError::Io)?;
        self.io.flush().await.map_err(RpcError::Io)
    }
}
