//! [`NbdLun`]: the LUN as an NBD target (a SAN path), through our own pipelined NBD client.
//!
//! URIs: `nbd://host[:port][/export]` (TCP, port 10809 by default) and
//! `nbd+unix:///export?socket=/path` (Unix socket).
//!
//! Handshake: fixed newstyle (echoing `NO_ZEROES` when offered), then `STRUCTURED_REPLY`, then
//! `GO` requesting `NBD_INFO_BLOCK_SIZE`; when the target answers `GO` with `ERR_UNSUP` (or is
//! not fixed-newstyle at all) it falls back to `EXPORT_NAME`.
//!
//! Transmission: many requests in flight on one connection. Every request gets a unique cookie
//! and an entry in the connection's pending map *before* it is queued to the single writer
//! task; one reader task matches replies (simple, or structured `OFFSET_DATA`, `OFFSET_HOLE`,
//! `NONE`, `ERROR`, `ERROR_OFFSET`) to entries. Reads and writes larger than the target's
//! maximum payload are split. FUA is sent only if the target advertises `SEND_FUA` (else write,
//! then flush); TRIM and WRITE_ZEROES only if advertised (else discard does nothing and zeroing
//! writes zeros); FLUSH only if advertised (a target without it has no volatile cache to flush).
//!
//! # Outcomes
//! *Definitely not executed* (safe to re-issue anywhere):
//! - `OutOfRange`, `Misaligned`, and writes refused because the export is read-only
//!   (checked here, nothing is sent);
//! - `PathUnreachable` whose reason says "not sent" (the connection was already gone, a
//!   reconnect failed, or the connection died before the writer handed the request to the socket);
//! - `Target { errno }`: the target answered with an error (it did not complete the request;
//!   like any block device, a failed write may still have changed part of the range).
//!
//! *Unknown* (the target may still execute it, possibly much later: a ghost write):
//! - `Timeout`: no reply within the per-request timeout. The request **stays tracked**: it counts
//!   in [`NbdLun::pending`] until its reply arrives or the connection dies, and
//!   [`NbdLun::wait_resolved`] waits for it;
//! - `PathUnreachable` whose reason says "outcome unknown": the connection broke after the
//!   request was handed to the socket.
//!
//! A connection death resolves every pending request (as above). Closing the connection is not
//! a fence: the target may still execute what it has received. The next request after a death
//! tries to reconnect once, so a restarted target heals the path.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Lun, LunError, LunFuture, check_aligned, check_range};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (`NBD_FLAG_*`) a target advertises.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const CHUNK_FLAG_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_ERROR_BIT: u16 = 1 << 15;

/// Largest payload we send or accept per request unless the target asks for less.
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Largest TRIM / WRITE_ZEROES length per request (these carry no payload).
const MAX_EFFECT_LEN: u64 = 1 << 30;
/// Largest option reply or non-data reply chunk we accept.
const MAX_CONTROL_LEN: u32 = 64 << 10;
const NBD_EIO: u32 = 5;

/// Settings of an [`NbdLun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// A request without a reply after this long fails with [`LunError::Timeout`] (and stays tracked).
    pub timeout: Duration,
    /// Bound on connecting plus the handshake.
    pub connect_timeout: Duration,
    /// Timeout of [`NbdLun::probe`].
    pub probe_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> NbdOptions {
        NbdOptions {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
        }
    }
}

/// Where an NBD target listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// A parsed `nbd://` or `nbd+unix://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdUri {
    /// Parses `nbd://host[:port][/export]` or `nbd+unix:///export?socket=/path`.
    pub fn parse(uri: &str) -> Result<NbdUri, LunError> {
        let bad = |why: &str| LunError::Io {
            op: "parse NBD URI",
            offset: 0,
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("{uri:?}: {why}")),
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket="))?;
            let export = path_part
                .strip_prefix('/')
                .ok_or_else(|| bad("host part must be empty (nbd+unix:///export)"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing socket= parameter"))?;
            Ok(NbdUri {
                addr: NbdAddr::Unix {
                    path: PathBuf::from(socket),
                },
                export: export.to_string(),
            })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                (h, tail.strip_prefix(':'))
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                }
            };
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
                None => 10809,
            };
            Ok(NbdUri {
                addr: NbdAddr::Tcp {
                    host: host.to_string(),
                    port,
                },
                export: export.to_string(),
            })
        } else {
            Err(bad("scheme must be nbd:// or nbd+unix://"))
        }
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddr::Unix { path } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

/// How the export was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// `NBD_OPT_GO` (fixed newstyle).
    Go,
    /// The legacy `NBD_OPT_EXPORT_NAME`.
    ExportName,
}

/// What the target told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdExportInfo {
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Block size constraints (`NBD_INFO_BLOCK_SIZE`), if advertised: min, preferred, max.
    pub block_size: Option<(u32, u32, u32)>,
    /// Structured replies negotiated.
    pub structured: bool,
    pub negotiation: Negotiation,
}

impl NbdExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Request alignment: the advertised minimum block size, at least 512.
    fn alignment(&self) -> u32 {
        self.block_size.map_or(512, |(min, _, _)| min.max(512))
    }

    /// Largest READ/WRITE payload, a multiple of the alignment.
    fn max_payload(&self) -> u32 {
        let max = self.block_size.map_or(DEFAULT_MAX_PAYLOAD, |(_, _, max)| {
            max.min(DEFAULT_MAX_PAYLOAD)
        });
        let a = self.alignment();
        (max / a * a).max(a)
    }
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(16 + data.len());
    buf.put_u64(IHAVEOPT);
    buf.put_u32(opt);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
    s.write_all(&buf).await?;
    s.flush().await
}

/// Reads one option reply for `opt`: (reply type, data).
async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    opt: u32,
) -> io::Result<(u32, Vec<u8>)> {
    if s.read_u64().await? != OPT_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    let got = s.read_u32().await?;
    if got != opt {
        return Err(protocol(format!("reply for option {got}, expected {opt}")));
    }
    let typ = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > MAX_CONTROL_LEN {
        return Err(protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((typ, data))
}

fn parse_info(info: &mut NbdExportInfo, have_export: &mut bool, data: &[u8]) -> io::Result<()> {
    let be16 = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    if data.len() < 2 {
        return Err(protocol("empty NBD_REP_INFO"));
    }
    match be16(0) {
        INFO_EXPORT if data.len() == 12 => {
            let mut size = [0u8; 8];
            size.copy_from_slice(&data[2..10]);
            info.size = u64::from_be_bytes(size);
            info.flags = be16(10);
            *have_export = true;
        }
        INFO_BLOCK_SIZE if data.len() == 14 => {
            let (min, pref, max) = (be32(2), be32(6), be32(10));
            if !min.is_power_of_two() || min > 65536 || max < min {
                return Err(protocol(format!(
                    "invalid block sizes min {min} preferred {pref} max {max}"
                )));
            }
            info.block_size = Some((min, pref, max));
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => return Err(protocol("NBD_REP_INFO of wrong length")),
        _ => {} // name, description, future infos: not needed
    }
    Ok(())
}

/// Runs the client side of the handshake on `s` for `export`.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
) -> io::Result<NbdExportInfo> {
    if s.read_u64().await? != NBDMAGIC {
        return Err(protocol("not an NBD server (bad magic)"));
    }
    match s.read_u64().await? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(protocol("oldstyle NBD servers are not supported")),
        _ => return Err(protocol("bad newstyle magic")),
    }
    let hflags = s.read_u16().await?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    s.write_u32(u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
        .await?;
    let mut info = NbdExportInfo {
        size: 0,
        flags: 0,
        block_size: None,
        structured: false,
        negotiation: Negotiation::Go,
    };
    if fixed {
        send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
        let (typ, _) = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
        info.structured = typ == REP_ACK;
        if typ != REP_ACK && typ & REP_ERR_BIT == 0 {
            return Err(protocol(format!(
                "unexpected reply {typ} to STRUCTURED_REPLY"
            )));
        }

        let mut go = BytesMut::new();
        go.put_u32(export.len() as u32);
        go.put_slice(export.as_bytes());
        go.put_u16(1);
        go.put_u16(INFO_BLOCK_SIZE);
        send_option(s, OPT_GO, &go).await?;
        let mut have_export = false;
        loop {
            let (typ, data) = read_option_reply(s, OPT_GO).await?;
            match typ {
                REP_INFO => parse_info(&mut info, &mut have_export, &data)?,
                REP_ACK if have_export => return Ok(info),
                REP_ACK => return Err(protocol("GO acknowledged without NBD_INFO_EXPORT")),
                REP_ERR_UNSUP => break,
                t if t & REP_ERR_BIT != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "target refused export {export:?} (error {:#x}: {})",
                            t,
                            String::from_utf8_lossy(&data)
                        ),
                    ));
                }
                t => return Err(protocol(format!("unexpected reply {t} to GO"))),
            }
        }
    }
    info.negotiation = Negotiation::ExportName;
    info.block_size = None;
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    info.size = s.read_u64().await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("target closed the connection after EXPORT_NAME {export:?} (unknown export?)"),
        )
    })?;
    info.flags = s.read_u16().await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await?;
    }
    Ok(info)
}

fn op_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "discard",
        CMD_WRITE_ZEROES => "write_zeroes",
        _ => "request",
    }
}

type Reply = Result<Bytes, LunError>;

struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    /// The writer started handing this request to the socket.
    sent: bool,
    reply: Option<oneshot::Sender<Reply>>,
}

#[derive(Default)]
struct ConnState {
    pending: BTreeMap<u64, Pending>,
    dead: Option<String>,
}

struct Outgoing {
    cookie: u64,
    header: [u8; 28],
    payload: Bytes,
}

/// One connection to the target, with its writer and reader tasks.
struct Conn {
    id: u64,
    info: NbdExportInfo,
    state: Mutex<ConnState>,
    out: mpsc::UnboundedSender<Outgoing>,
    /// Becomes true when the connection dies.
    dead: watch::Sender<bool>,
    /// Bumped whenever a request is resolved (or the connection dies).
    resolved: watch::Sender<u64>,
    next_cookie: AtomicU64,
}

/// A submitted request: await it with [`Ticket::wait`].
struct Ticket {
    rx: oneshot::Receiver<Reply>,
    op: &'static str,
    deadline: Instant,
    timeout: Duration,
}

impl Ticket {
    async fn wait(self) -> Reply {
        match tokio::time::timeout_at(self.deadline, self.rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(LunError::PathUnreachable {
                reason: format!("{} abandoned by the NBD client: outcome unknown", self.op),
            }),
            Err(_) => Err(LunError::Timeout {
                op: self.op,
                ms: self.timeout.as_millis() as u64,
            }),
        }
    }
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Every critical section leaves the map consistent; a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Registers a request and queues it to the writer; never awaits (cancel-safe).
    fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Ticket, LunError> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(reason) = &st.dead {
            return Err(LunError::PathUnreachable {
                reason: format!("{reason}; {} not sent", op_name(cmd)),
            });
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut header = [0u8; 28];
        let mut h = &mut header[..];
        h.put_u32(REQUEST_MAGIC);
        h.put_u16(flags);
        h.put_u16(cmd);
        h.put_u64(cookie);
        h.put_u64(offset);
        h.put_u32(len);
        st.pending.insert(
            cookie,
            Pending {
                cmd,
                offset,
                len,
                sent: false,
                reply: Some(tx),
            },
        );
        if self
            .out
            .send(Outgoing {
                cookie,
                header,
                payload,
            })
            .is_err()
        {
            st.pending.remove(&cookie);
            return Err(LunError::PathUnreachable {
                reason: format!("NBD writer stopped; {} not sent", op_name(cmd)),
            });
        }
        Ok(Ticket {
            rx,
            op: op_name(cmd),
            deadline: Instant::now() + timeout,
            timeout,
        })
    }

    fn mark_sent(&self, cookie: u64) {
        if let Some(p) = self.lock().pending.get_mut(&cookie) {
            p.sent = true;
        }
    }

    /// (command, offset, length) of a pending request.
    fn lookup(&self, cookie: u64) -> Option<(u16, u64, u32)> {
        self.lock()
            .pending
            .get(&cookie)
            .map(|p| (p.cmd, p.offset, p.len))
    }

    fn resolve(&self, cookie: u64, reply: Reply) {
        let entry = self.lock().pending.remove(&cookie);
        if let Some(tx) = entry.and_then(|mut p| p.reply.take()) {
            // The caller may have timed out and gone; the reply is then only bookkeeping.
            let _ = tx.send(reply);
        }
        self.resolved.send_modify(|n| *n += 1);
    }

    /// Marks the connection dead and fails every pending request.
    fn kill(&self, reason: String) {
        let drained = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            st.dead = Some(reason.clone());
            std::mem::take(&mut st.pending)
        };
        tracing::warn!(conn = self.id, pending = drained.len(), %reason, "NBD connection lost");
        for (_, mut p) in drained {
            let outcome = if p.sent {
                "outcome unknown"
            } else {
                "not sent"
            };
            if let Some(tx) = p.reply.take() {
                let _ = tx.send(Err(LunError::PathUnreachable {
                    reason: format!("{reason}; {} {outcome}", op_name(p.cmd)),
                }));
            }
        }
        self.dead.send_replace(true);
        self.resolved.send_modify(|n| *n += 1);
    }

    fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Waits until every request with a cookie `<= upto` is resolved or the connection is dead.
    async fn wait_resolved(&self, upto: u64) {
        let mut rx = self.resolved.subscribe();
        loop {
            {
                let st = self.lock();
                let first = st.pending.keys().next().copied();
                if st.dead.is_some() || first.is_none_or(|c| c > upto) {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn dead_signal(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await;
}

async fn write_batch<W: AsyncWrite + Unpin>(
    conn: &Conn,
    wr: &mut W,
    first: Outgoing,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut next = Some(first);
    while let Some(req) = next {
        conn.mark_sent(req.cookie);
        wr.write_all(&req.header).await?;
        wr.write_all(&req.payload).await?;
        next = rx.try_recv().ok();
    }
    wr.flush().await
}

/// The single writer: sends queued requests in order until the connection dies.
async fn writer_loop(
    conn: Arc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    wr: Box<dyn AsyncWrite + Send + Unpin>,
) {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let mut dead = conn.dead.subscribe();
    loop {
        let first = tokio::select! {
            biased;
            _ = dead_signal(&mut dead) => return,
            req = rx.recv() => match req {
                Some(r) => r,
                None => return,
            },
        };
        let res = tokio::select! {
            _ = dead_signal(&mut dead) => return,
            r = write_batch(&conn, &mut wr, first, &mut rx) => r,
        };
        if let Err(e) = res {
            conn.kill(format!("sending to the NBD target failed: {e}"));
            return;
        }
    }
}

/// Reply accumulation of one structured request.
#[derive(Default)]
struct Partial {
    buf: Option<Vec<u8>>,
    covered: u64,
    error: Option<u32>,
}

/// The single reader: dispatches replies until the stream fails or the connection dies.
async fn reader_loop(conn: Arc<Conn>, rd: Box<dyn AsyncRead + Send + Unpin>) {
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut partials: HashMap<u64, Partial> = HashMap::new();
    let mut dead = conn.dead.subscribe();
    loop {
        let res = tokio::select! {
            _ = dead_signal(&mut dead) => return,
            r = read_reply(&conn, &mut rd, &mut partials) => r,
        };
        if let Err(e) = res {
            let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                "NBD target closed the connection".to_string()
            } else {
                format!("reading from the NBD target failed: {e}")
            };
            conn.kill(reason);
            return;
        }
    }
}

async fn read_reply<R: AsyncRead + Unpin>(
    conn: &Conn,
    rd: &mut R,
    partials: &mut HashMap<u64, Partial>,
) -> io::Result<()> {
    match rd.read_u32().await? {
        SIMPLE_REPLY_MAGIC => {
            let errno = rd.read_u32().await?;
            let cookie = rd.read_u64().await?;
            let (cmd, _, len) = conn
                .lookup(cookie)
                .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))?;
            partials.remove(&cookie);
            let reply = if errno != 0 {
                Err(LunError::Target {
                    op: op_name(cmd),
                    errno,
                })
            } else if cmd == CMD_READ {
                let mut buf = vec![0u8; len as usize];
                rd.read_exact(&mut buf).await?;
                Ok(Bytes::from(buf))
            } else {
                Ok(Bytes::new())
            };
            conn.resolve(cookie, reply);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => read_chunk(conn, rd, partials).await,
        magic => Err(protocol(format!("bad reply magic {magic:#x}"))),
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(
    conn: &Conn,
    rd: &mut R,
    partials: &mut HashMap<u64, Partial>,
) -> io::Result<()> {
    let flags = rd.read_u16().await?;
    let typ = rd.read_u16().await?;
    let cookie = rd.read_u64().await?;
    let length = rd.read_u32().await?;
    let (cmd, offset, len) = conn
        .lookup(cookie)
        .ok_or_else(|| protocol(format!("chunk for unknown cookie {cookie}")))?;
    let part = partials.entry(cookie).or_default();
    if cmd == CMD_READ && part.buf.is_none() {
        part.buf = Some(vec![0u8; len as usize]);
    }
    // Where a data/hole chunk lands inside the request, validated against its range.
    let place = |at: u64, n: u64| -> io::Result<usize> {
        let end = offset + u64::from(len);
        if cmd != CMD_READ || at < offset || at.checked_add(n).is_none_or(|e| e > end) {
            return Err(protocol(format!(
                "chunk {at}+{n} outside request {offset}+{len}"
            )));
        }
        Ok((at - offset) as usize)
    };
    match typ {
        CHUNK_OFFSET_DATA => {
            if length < 8 {
                return Err(protocol("short OFFSET_DATA chunk"));
            }
            let at = rd.read_u64().await?;
            let n = u64::from(length - 8);
            let start = place(at, n)?;
            if let Some(buf) = part.buf.as_mut() {
                rd.read_exact(&mut buf[start..start + n as usize]).await?;
            }
            part.covered += n;
        }
        CHUNK_OFFSET_HOLE => {
            if length != 12 {
                return Err(protocol("OFFSET_HOLE chunk of wrong length"));
            }
            let at = rd.read_u64().await?;
            let n = u64::from(rd.read_u32().await?);
            let start = place(at, n)?;
            if let Some(buf) = part.buf.as_mut() {
                buf[start..start + n as usize].fill(0);
            }
            part.covered += n;
        }
        CHUNK_NONE => {
            if length != 0 {
                return Err(protocol("NONE chunk with payload"));
            }
        }
        t if t & CHUNK_ERROR_BIT != 0 => {
            if !(4..=MAX_CONTROL_LEN).contains(&length) {
                return Err(protocol(format!("error chunk of {length} bytes")));
            }
            let errno = rd.read_u32().await?;
            let mut rest = vec![0u8; length as usize - 4];
            rd.read_exact(&mut rest).await?;
            let msg = rest
                .get(2..)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            tracing::debug!(cookie, errno, chunk = t, %msg, "NBD error chunk");
            part.error
                .get_or_insert(if errno == 0 { NBD_EIO } else { errno });
        }
        t => return Err(protocol(format!("unknown structured chunk type {t}"))),
    }
    if flags & CHUNK_FLAG_DONE != 0 {
        let part = partials.remove(&cookie).unwrap_or_default();
        let reply = if let Some(errno) = part.error {
            Err(LunError::Target {
                op: op_name(cmd),
                errno,
            })
        } else if cmd == CMD_READ && part.covered != u64::from(len) {
            Err(LunError::Io {
                op: "read",
                offset,
                source: protocol(format!("target replied {} of {len} bytes", part.covered)),
            })
        } else {
            Ok(part.buf.map(Bytes::from).unwrap_or_default())
        };
        conn.resolve(cookie, reply);
    }
    Ok(())
}

/// Connects to `uri`, runs the handshake and starts the connection's tasks.
async fn open_conn(uri: &NbdUri, id: u64) -> io::Result<Arc<Conn>> {
    type Halves = (
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
        NbdExportInfo,
    );
    let (rd, wr, info): Halves = match &uri.addr {
        NbdAddr::Tcp { host, port } => {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            let info = handshake(&mut s, &uri.export).await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), info)
        }
        NbdAddr::Unix { path } => {
            let mut s = tokio::net::UnixStream::connect(path).await?;
            let info = handshake(&mut s, &uri.export).await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), info)
        }
    };
    let (out, out_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        id,
        info,
        state: Mutex::new(ConnState::default()),
        out,
        dead: watch::channel(false).0,
        resolved: watch::channel(0).0,
        next_cookie: AtomicU64::new(1),
    });
    tokio::spawn(writer_loop(conn.clone(), out_rx, wr));
    tokio::spawn(reader_loop(conn.clone(), rd));
    tracing::debug!(conn = id, %uri, ?info, "NBD connection established");
    Ok(conn)
}

/// A LUN reached through an NBD target (see the module docs for outcome semantics).
pub struct NbdLun {
    uri: NbdUri,
    opts: NbdOptions,
    size: u64,
    alignment: u32,
    conn: Mutex<Arc<Conn>>,
    /// Serializes reconnect attempts; counts them.
    reconnect: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
    conn_ids: AtomicU64,
}

impl NbdLun {
    /// Connects to the target named by `uri` (`nbd://...` or `nbd+unix://...`).
    pub async fn connect(uri: &str, opts: NbdOptions) -> Result<NbdLun, LunError> {
        let uri = NbdUri::parse(uri)?;
        let conn = Self::dial(&uri, &opts, 1).await?;
        let info = conn.info;
        Ok(NbdLun {
            uri,
            opts,
            size: info.size,
            alignment: info.alignment(),
            conn: Mutex::new(conn),
            reconnect: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            conn_ids: AtomicU64::new(1),
        })
    }

    async fn dial(uri: &NbdUri, opts: &NbdOptions, id: u64) -> Result<Arc<Conn>, LunError> {
        match tokio::time::timeout(opts.connect_timeout, open_conn(uri, id)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(LunError::PathUnreachable {
                reason: format!("cannot connect to {uri}: {e}"),
            }),
            Err(_) => Err(LunError::PathUnreachable {
                reason: format!(
                    "cannot connect to {uri}: no handshake within {} ms",
                    opts.connect_timeout.as_millis()
                ),
            }),
        }
    }

    /// The export as the current connection negotiated it.
    pub fn export_info(&self) -> NbdExportInfo {
        self.current().info
    }

    /// Requests not yet resolved on the current connection, including timed-out ones.
    pub fn pending(&self) -> usize {
        self.current().pending()
    }

    /// Completes when every request sent so far has been answered or its connection is gone.
    pub async fn wait_resolved(&self) {
        let conn = self.current();
        let upto = conn.next_cookie.load(Ordering::Relaxed).saturating_sub(1);
        conn.wait_resolved(upto).await;
    }

    /// Path health check: a 512-byte read at offset 0 with the short probe timeout.
    pub async fn probe(&self) -> Result<(), LunError> {
        let conn = self.conn().await?;
        let len = u64::from(self.alignment).min(self.size) as u32;
        if len == 0 {
            return Ok(());
        }
        conn.submit(CMD_READ, 0, 0, len, Bytes::new(), self.opts.probe_timeout)?
            .wait()
            .await
            .map(|_| ())
    }

    fn current(&self) -> Arc<Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live connection, reconnecting once if the current one is dead.
    async fn conn(&self) -> Result<Arc<Conn>, LunError> {
        let cur = self.current();
        if !cur.is_dead() {
            return Ok(cur);
        }
        let attempts_before = self.attempts.load(Ordering::Acquire);
        let _guard = self.reconnect.lock().await;
        let cur = self.current();
        if !cur.is_dead() {
            return Ok(cur);
        }
        if self.attempts.load(Ordering::Acquire) != attempts_before {
            // Someone tried while we waited and failed: do not stack connect timeouts.
            return Err(LunError::PathUnreachable {
                reason: format!("reconnect to {} failed; request not sent", self.uri),
            });
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let id = self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Self::dial(&self.uri, &self.opts, id).await.map_err(|e| {
            let why = match e {
                LunError::PathUnreachable { reason } => reason,
                other => other.to_string(),
            };
            LunError::PathUnreachable {
                reason: format!("reconnect failed: {why}; request not sent"),
            }
        })?;
        if conn.info.size != self.size {
            let reason = format!(
                "{} now reports size {} (was {}); request not sent",
                self.uri, conn.info.size, self.size
            );
            conn.kill(reason.clone());
            return Err(LunError::PathUnreachable { reason });
        }
        tracing::info!(uri = %self.uri, conn = id, "NBD path reconnected");
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn.clone();
        Ok(conn)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LunError> {
        check_range(offset, len, self.size)?;
        check_aligned(offset, len, self.alignment)
    }

    fn check_writable(&self, conn: &Conn, op: &'static str, offset: u64) -> Result<(), LunError> {
        if conn.info.has(TFLAG_READ_ONLY) {
            return Err(LunError::Io {
                op,
                offset,
                source: io::Error::new(io::ErrorKind::PermissionDenied, "NBD export is read-only"),
            });
        }
        Ok(())
    }

    /// Submits `[offset, offset+len)` in pieces the target accepts (its maximum payload for
    /// READ/WRITE, [`MAX_EFFECT_LEN`] for TRIM/WRITE_ZEROES), then awaits them all.
    async fn submit_split(
        &self,
        conn: &Conn,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        data: Option<&Bytes>,
    ) -> Result<Vec<Bytes>, LunError> {
        let step = match cmd {
            CMD_READ | CMD_WRITE => u64::from(conn.info.max_payload()),
            _ => self.effect_step(),
        };
        let mut tickets = Vec::with_capacity(len.div_ceil(step) as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(step);
            let payload =
                data.map_or_else(Bytes::new, |d| d.slice(done as usize..(done + n) as usize));
            tickets.push(conn.submit(
                cmd,
                flags,
                offset + done,
                n as u32,
                payload,
                self.opts.timeout,
            )?);
            done += n;
        }
        let mut out = Vec::with_capacity(tickets.len());
        let mut first_err = None;
        for t in tickets {
            match t.wait().await {
                Ok(b) => out.push(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn flush_conn(&self, conn: &Conn) -> Result<(), LunError> {
        if !conn.info.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        conn.submit(CMD_FLUSH, 0, 0, 0, Bytes::new(), self.opts.timeout)?
            .wait()
            .await
            .map(|_| ())
    }

    /// Largest TRIM/WRITE_ZEROES length, a multiple of the alignment.
    fn effect_step(&self) -> u64 {
        let a = u64::from(self.alignment);
        MAX_EFFECT_LEN / a * a
    }
}

impl Drop for NbdLun {
    fn drop(&mut self) {
        self.current()
            .kill(format!("NBD client for {} closed", self.uri));
    }
}

impl Lun for NbdLun {
    fn size(&self) -> u64 {
        self.size
    }

    fn alignment(&self) -> u32 {
        self.alignment
    }

    fn describe(&self) -> String {
        self.uri.to_string()
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        Box::pin(async move {
            self.check(offset, len as u64)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            let conn = self.conn().await?;
            let mut parts = self
                .submit_split(&conn, CMD_READ, 0, offset, len as u64, None)
                .await?;
            if parts.len() == 1 {
                return Ok(parts.remove(0));
            }
            let mut out = BytesMut::with_capacity(len);
            for p in parts {
                out.extend_from_slice(&p);
            }
            Ok(out.freeze())
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, data.len() as u64)?;
            let conn = self.conn().await?;
            self.check_writable(&conn, "write", offset)?;
            if !data.is_empty() {
                let native_fua = fua && conn.info.has(TFLAG_SEND_FUA);
                let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
                self.submit_split(
                    &conn,
                    CMD_WRITE,
                    flags,
                    offset,
                    data.len() as u64,
                    Some(&data),
                )
                .await?;
                if native_fua {
                    return Ok(());
                }
            }
            if fua {
                self.flush_conn(&conn).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            let conn = self.conn().await?;
            self.flush_conn(&conn).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            let conn = self.conn().await?;
            self.check_writable(&conn, "discard", offset)?;
            if len == 0 || !conn.info.has(TFLAG_SEND_TRIM) {
                return Ok(()); // advisory
            }
            self.submit_split(&conn, CMD_TRIM, 0, offset, len, None)
                .await
                .map(|_| ())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            let conn = self.conn().await?;
            self.check_writable(&conn, "write_zeroes", offset)?;
            if len == 0 {
                return Ok(());
            }
            if conn.info.has(TFLAG_SEND_WRITE_ZEROES) {
                return self
                    .submit_split(&conn, CMD_WRITE_ZEROES, 0, offset, len, None)
                    .await
                    .map(|_| ());
            }
            let step = u64::from(conn.info.max_payload()).min(1 << 20);
            let zeros = Bytes::from(vec![0u8; step as usize]);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(step);
                self.submit_split(
                    &conn,
                    CMD_WRITE,
                    0,
                    offset + done,
                    n,
                    Some(&zeros.slice(..n as usize)),
                )
                .await?;
                done += n;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uris_parse_to_address_and_export() {
        let u = NbdUri::parse("nbd://127.0.0.1:10900/lun0").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "lun0");
        let u = NbdUri::parse("nbd://san.example").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "san.example".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:99/x").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        let u = NbdUri::parse("nbd+unix:///exp?socket=/run/s.sock").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Unix {
                path: "/run/s.sock".into()
            }
        );
        assert_eq!(u.export, "exp");
        assert_eq!(u.to_string(), "nbd+unix:///exp?socket=/run/s.sock");
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://:5/x",
            "nbd://h:port/x",
            "/dev/sda",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad} accepted");
        }
    }

    proptest! {
        #[test]
        fn uri_parser_never_panics(s in "\\PC{0,64}") {
            let _ = NbdUri::parse(&s);
            let _ = NbdUri::parse(&format!("nbd://{s}"));
            let _ = NbdUri::parse(&format!("nbd+unix://{s}"));
        }

        /// Random bytes from a hostile "server" never panic the handshake parser.
        #[test]
        fn handshake_never_panics_on_random_server_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            prefix in 0usize..3,
        ) {
            let mut stream = Vec::new();
            if prefix >= 1 { stream.extend_from_slice(&NBDMAGIC.to_be_bytes()); }
            if prefix >= 2 { stream.extend_from_slice(&IHAVEOPT.to_be_bytes()); }
            stream.extend_from_slice(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (mut client, mut server) = tokio::io::duplex(1 << 16);
                server.write_all(&stream).await.unwrap();
                drop(server);
                let _ = handshake(&mut client, "x").await;
            });
        }
    }

    /// A connection without a socket, with requests 1..=4 pending (three reads, one write).
    fn socketless_conn() -> (Conn, mpsc::UnboundedReceiver<Outgoing>) {
        let (out, rx) = mpsc::unbounded_channel();
        let conn = Conn {
            id: 0,
            info: NbdExportInfo {
                size: 1 << 20,
                flags: 1,
                block_size: None,
                structured: true,
                negotiation: Negotiation::Go,
            },
            state: Mutex::new(ConnState::default()),
            out,
            dead: watch::channel(false).0,
            resolved: watch::channel(0).0,
            next_cookie: AtomicU64::new(1),
        };
        let t = Duration::from_secs(1);
        for (cmd, off, len) in [
            (CMD_READ, 0, 512),
            (CMD_READ, 4096, 64),
            (CMD_WRITE, 0, 512),
            (CMD_READ, 512, 1024),
        ] {
            // The tickets are dropped: replies are then only bookkeeping, as after a timeout.
            let _ = conn.submit(cmd, 0, off, len, Bytes::new(), t).unwrap();
        }
        (conn, rx)
    }

    fn arb_reply() -> impl Strategy<Value = Vec<u8>> {
        let chunk_type = prop_oneof![
            Just(CHUNK_NONE),
            Just(CHUNK_OFFSET_DATA),
            Just(CHUNK_OFFSET_HOLE),
            Just(0x8001u16),
            Just(0x8002u16),
            any::<u16>()
        ];
        let structured = (
            any::<u16>(),
            chunk_type,
            0u64..6,
            0u32..80,
            proptest::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(|(flags, typ, cookie, len, body)| {
                let mut b = Vec::new();
                b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&typ.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&body);
                b
            });
        let simple = (
            any::<u32>(),
            0u64..6,
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(err, cookie, body)| {
                let mut b = Vec::new();
                b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&err.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&body);
                b
            });
        let item = prop_oneof![4 => structured, 2 => simple, 1 => proptest::collection::vec(any::<u8>(), 0..32)];
        proptest::collection::vec(item, 1..8).prop_map(|items| items.concat())
    }

    proptest! {
        /// Random and semi-valid reply streams never panic the reply parser, and every
        /// request it resolves leaves the pending map.
        #[test]
        fn reply_parser_never_panics(stream in arb_reply()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (conn, _rx) = socketless_conn();
                let mut partials = HashMap::new();
                let mut rd = &stream[..];
                while read_reply(&conn, &mut rd, &mut partials).await.is_ok() {}
                assert!(conn.pending() <= 4);
            });
        }
    }

    #[tokio::test]
    async fn structured_read_is_assembled_from_data_and_hole_chunks() {
        let (conn, _rx) = socketless_conn();
        let mut stream = Vec::new();
        let chunk = |flags: u16, typ: u16, cookie: u64, body: &[u8]| {
            let mut b = Vec::new();
            b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&(body.len() as u32).to_be_bytes());
            b.extend_from_slice(body);
            b
        };
        // Request 4 reads 1024 bytes at 512: data at 1024..1536, hole at 512..1024, out of order.
        let mut data = 1024u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 512]);
        let mut hole = 512u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        stream.extend(chunk(0, CHUNK_OFFSET_DATA, 4, &data));
        stream.extend(chunk(CHUNK_FLAG_DONE, CHUNK_OFFSET_HOLE, 4, &hole));
        // Request 1 gets an error chunk and is done.
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&2u16.to_be_bytes());
        err.extend_from_slice(b"no");
        stream.extend(chunk(CHUNK_FLAG_DONE, 0x8001, 1, &err));
        // Request 2 claims DONE with only half its bytes: an error, not short data.
        let mut short = 4096u64.to_be_bytes().to_vec();
        short.extend_from_slice(&[1u8; 32]);
        stream.extend(chunk(CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA, 2, &short));

        let (tx, rx) = oneshot::channel();
        conn.lock().pending.get_mut(&4).unwrap().reply = Some(tx);
        let (tx1, rx1) = oneshot::channel();
        conn.lock().pending.get_mut(&1).unwrap().reply = Some(tx1);
        let (tx2, rx2) = oneshot::channel();
        conn.lock().pending.get_mut(&2).unwrap().reply = Some(tx2);
        let mut partials = HashMap::new();
        let mut rd = &stream[..];
        for _ in 0..4 {
            read_reply(&conn, &mut rd, &mut partials).await.unwrap();
        }
        let got = rx.await.unwrap().unwrap();
        assert_eq!(&got[..512], &[0u8; 512]);
        assert_eq!(&got[512..], &[7u8; 512]);
        assert!(matches!(
            rx1.await.unwrap(),
            Err(LunError::Target {
                op: "read",
                errno: 5
            })
        ));
        assert!(matches!(
            rx2.await.unwrap(),
            Err(LunError::Io { op: "read", .. })
        ));
        assert_eq!(conn.pending(), 1, "only the write is left");
        // A chunk for an unknown cookie is a protocol error (the connection would be killed).
        let bad = chunk(CHUNK_FLAG_DONE, CHUNK_NONE, 99, &[]);
        assert!(
            read_reply(&conn, &mut &bad[..], &mut partials)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn handshake_falls_back_to_export_name_when_go_is_unsupported() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            server.write_u64(NBDMAGIC).await.unwrap();
            server.write_u64(IHAVEOPT).await.unwrap();
            server
                .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                .await
                .unwrap();
            assert_eq!(server.read_u32().await.unwrap(), 3);
            let mut seen = Vec::new();
            loop {
                assert_eq!(server.read_u64().await.unwrap(), IHAVEOPT);
                let opt = server.read_u32().await.unwrap();
                let len = server.read_u32().await.unwrap();
                let mut data = vec![0; len as usize];
                server.read_exact(&mut data).await.unwrap();
                seen.push(opt);
                if opt == OPT_EXPORT_NAME {
                    assert_eq!(data, b"vol");
                    server.write_u64(1 << 20).await.unwrap();
                    server.write_u16(1 | TFLAG_SEND_FLUSH).await.unwrap();
                    return seen;
                }
                server.write_u64(OPT_REPLY_MAGIC).await.unwrap();
                server.write_u32(opt).await.unwrap();
                server.write_u32(REP_ERR_UNSUP).await.unwrap();
                server.write_u32(0).await.unwrap();
            }
        });
        let info = handshake(&mut client, "vol").await.unwrap();
        assert_eq!(info.size, 1 << 20);
        assert_eq!(info.negotiation, Negotiation::ExportName);
        assert!(!info.structured);
        assert!(info.has(TFLAG_SEND_FLUSH));
        assert_eq!(
            fake.await.unwrap(),
            vec![OPT_STRUCTURED_REPLY, OPT_GO, OPT_EXPORT_NAME]
        );
    }

    #[test]
    fn max_payload_respects_target_block_sizes() {
        let mut info = NbdExportInfo {
            size: 1 << 30,
            flags: 1,
            block_size: None,
            structured: true,
            negotiation: Negotiation::Go,
        };
        assert_eq!((info.alignment(), info.max_payload()), (512, 32 << 20));
        info.block_size = Some((4096, 4096, 65536 + 100));
        assert_eq!((info.alignment(), info.max_payload()), (4096, 65536));
        info.block_size = Some((1, 4096, u32::MAX));
        assert_eq!((info.alignment(), info.max_payload()), (512, 32 << 20));
    }
}
