//! A deliberately simple NBD client for the nbd workload: one TCP connection, one request
//! in flight, simple replies only (the `NBD_OPT_EXPORT_NAME` handshake negotiates
//! nothing else), no reconnect.
//!
//! The project's pipelined client (`csv_core::lun::NbdLun`) reconnects on its own, which
//! is right for a SAN path but hides from a history which connection a write and a
//! later flush went through. Here a connection never outlives its first error, so "a flush
//! covers the writes completed before it on this connection" is exact.
//!
//! Outcomes ([`ClientError`]): `NotSent` (the connection was already dead: certainly not
//! executed), `Refused { errno }` (the server answered with an error), `Unknown` (the
//! request was sent, or may have been, and no valid answer arrived: it may execute at any
//! time). After `Unknown` the connection is dead.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_EPERM`: what a connection whose writes were revoked answers.
pub const EPERM: u32 = 1;

/// What one request failed to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to NBD export {export:?} at {addr}: {why}")]
    Connect {
        addr: String,
        export: String,
        why: String,
    },
    #[error("NBD connection already closed ({0}); request not sent")]
    NotSent(String),
    #[error("NBD server refused the request: error {errno}")]
    Refused { errno: u32 },
    #[error("NBD request outcome unknown: {0}")]
    Unknown(String),
}

/// A malformed handshake or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("server is not fixed-newstyle (flags {0:#x})")]
    NotFixed(u16),
    #[error("reply for cookie {got}, expected {want}")]
    Cookie { got: u64, want: u64 },
}

/// The server greeting: `NBDMAGIC IHAVEOPT flags`; returns the handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ParseError> {
    let magic = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
    if magic != NBD_MAGIC {
        return Err(ParseError::Magic(magic));
    }
    if opt != IHAVEOPT {
        return Err(ParseError::Magic(opt));
    }
    let flags = u16::from_be_bytes([b[16], b[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ParseError::NotFixed(flags));
    }
    Ok(flags)
}

/// A simple reply header: `magic error cookie`; returns the error.
pub fn parse_reply(b: &[u8; 16], want: u64) -> Result<u32, ParseError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ParseError::Magic(magic.into()));
    }
    let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
    if cookie != want {
        return Err(ParseError::Cookie { got: cookie, want });
    }
    Ok(u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
}

fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&cmd.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// One NBD connection to one export.
pub struct NbdClient {
    stream: Option<TcpStream>,
    dead: String,
    size: u64,
    tflags: u16,
    cookie: u64,
    timeout: Duration,
}

impl NbdClient {
    /// Connects to `export` at `addr` (host:port) within `timeout`; requests time out after
    /// `op_timeout`.
    pub async fn connect(
        addr: &str,
        export: &str,
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<NbdClient, ClientError> {
        let err = |why: String| ClientError::Connect {
            addr: addr.into(),
            export: export.into(),
            why,
        };
        let hs = async {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            let mut g = [0u8; 18];
            s.read_exact(&mut g).await.map_err(|e| e.to_string())?;
            let flags = parse_greeting(&g).map_err(|e| e.to_string())?;
            let no_zeroes = flags & FLAG_NO_ZEROES != 0;
            let client_flags: u32 = if no_zeroes { 3 } else { 1 };
            let mut out = Vec::with_capacity(20 + export.len());
            out.extend_from_slice(&client_flags.to_be_bytes());
            out.extend_from_slice(&IHAVEOPT.to_be_bytes());
            out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
            out.extend_from_slice(&(export.len() as u32).to_be_bytes());
            out.extend_from_slice(export.as_bytes());
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut info = [0u8; 10];
            s.read_exact(&mut info)
                .await
                .map_err(|e| format!("export refused or closed: {e}"))?;
            if !no_zeroes {
                let mut z = [0u8; 124];
                s.read_exact(&mut z).await.map_err(|e| e.to_string())?;
            }
            let size = u64::from_be_bytes(info[..8].try_into().unwrap_or_default());
            let tflags = u16::from_be_bytes([info[8], info[9]]);
            Ok::<_, String>((s, size, tflags))
        };
        let (stream, size, tflags) = tokio::time::timeout(timeout, hs)
            .await
            .map_err(|_| err(format!("no handshake within {timeout:?}")))?
            .map_err(err)?;
        Ok(NbdClient {
            stream: Some(stream),
            dead: String::new(),
            size,
            tflags,
            cookie: 0,
            timeout: op_timeout,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_dead(&self) -> bool {
        self.stream.is_none()
    }

    /// Sends one request and reads its reply (with `read_len` bytes of data if it
    /// succeeded); any transport failure kills the connection.
    async fn exchange(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        read_len: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let Some(mut s) = self.stream.take() else {
            return Err(ClientError::NotSent(self.dead.clone()));
        };
        self.cookie += 1;
        let cookie = self.cookie;
        let io = async {
            let mut out = request(cmd, flags, cookie, offset, len).to_vec();
            out.extend_from_slice(data);
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut h = [0u8; 16];
            s.read_exact(&mut h).await.map_err(|e| e.to_string())?;
            let errno = parse_reply(&h, cookie).map_err(|e| e.to_string())?;
            if errno != 0 {
                return Ok(Err(errno));
            }
            let mut buf = vec![0u8; read_len];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Ok(buf))
        };
        match tokio::time::timeout(self.timeout, io).await {
            Ok(Ok(Ok(buf))) => {
                self.stream = Some(s);
                Ok(buf)
            }
            Ok(Ok(Err(errno))) => {
                self.stream = Some(s);
                Err(ClientError::Refused { errno })
            }
            Ok(Err(why)) => {
                self.dead = why.clone();
                Err(ClientError::Unknown(why))
            }
            Err(_) => {
                self.dead = format!("no reply within {:?}", self.timeout);
                Err(ClientError::Unknown(self.dead.clone()))
            }
        }
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.exchange(CMD_READ, 0, offset, len, &[], len as usize)
            .await
    }

    /// Writes `data` at `offset`; with `fua` (if the export supports it) durable on success.
    /// Returns whether FUA was actually requested.
    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<bool, ClientError> {
        let fua = fua && self.tflags & TFLAG_SEND_FUA != 0;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.exchange(CMD_WRITE, flags, offset, data.len() as u32, data, 0)
            .await
            .map(|_| fua)
    }

    /// A flush; an export without a volatile cache (no `SEND_FLUSH`) has nothing to flush.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if self.tflags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.exchange(CMD_FLUSH, 0, 0, 0, &[], 0).await.map(|_| ())
    }

    /// Says goodbye (best effort) and closes.
    pub async fn close(mut self) {
        if let Some(mut s) = self.stream.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                s.write_all(&request(CMD_DISC, 0, 0, 0, 0)),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greetings_and_replies_parse_and_bad_ones_are_refused() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[17] = 3;
        assert_eq!(parse_greeting(&g), Ok(3));
        g[17] = 2;
        assert_eq!(parse_greeting(&g), Err(ParseError::NotFixed(2)));
        g[0] = 0;
        assert!(matches!(parse_greeting(&g), Err(ParseError::Magic(_))));

        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&EPERM.to_be_bytes());
        r[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_reply(&r, 7), Ok(EPERM));
        assert_eq!(
            parse_reply(&r, 8),
            Err(ParseError::Cookie { got: 7, want: 8 })
        );
    }

    proptest! {
        #[test]
        fn random_greetings_and_replies_never_panic(g in any::<[u8; 18]>(), r in any::<[u8; 16]>(), c in any::<u64>()) {
            let _ = parse_greeting(&g);
            if let Ok(e) = parse_reply(&r, c) {
                prop_assert_eq!(e, u32::from_be_bytes([r[4], r[5], r[6], r[7]]));
                prop_assert_eq!(&r[8..16], &c.to_be_bytes());
            }
        }

        #[test]
        fn requests_carry_their_fields(cmd in any::<u16>(), flags in any::<u16>(), cookie in any::<u64>(), off in any::<u64>(), len in any::<u32>()) {
            let r = request(cmd, flags, cookie, off, len);
            prop_assert_eq!(&r[..4], &REQUEST_MAGIC.to_be_bytes());
            prop_assert_eq!(&r[4..6], &flags.to_be_bytes());
            prop_assert_eq!(&r[6..8], &cmd.to_be_bytes());
            prop_assert_eq!(&r[8..16], &cookie.to_be_bytes());
            prop_assert_eq!(&r[16..24], &off.to_be_bytes());
            prop_assert_eq!(&r[24..28], &len.to_be_bytes());
        }
    }
}
