//! The tokio NBD server: accept loop, fixed-newstyle handshake, transmission.
//!
//! Per connection in transmission: one reader (this task) parses request headers and WRITE
//! payloads, validates them and polls each request once; a request that completes there has
//! its reply batched (sent to the writer before the reader may wait, and as soon as the batch
//! holds a MiB, after which the reader yields so that the writer sends it at once), the
//! others continue on their own task; one writer task serialises reply frames in completion
//! order (out-of-order replies), several per `writev`. `max_in_flight` slots and a payload
//! byte budget give back-pressure. Invariants:
//! * every request gets exactly one reply frame, except DISC (none); a WRITE's payload is always
//!   consumed (drained on error) before the next header is read;
//! * with simple replies a READ's I/O completes before its header is sent (no header-then-error);
//! * errors become NBD error values only here ([`errno_for`]); host errnos never reach the wire;
//! * the connection ends only after all its request tasks finished and their replies were
//!   queued (DISC, EOF, protocol violation, `disconnect()`, or shutdown after the grace period);
//!   a connection that wrote anything flushes the device before closing.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use csv_core::lun::bufpool::BufPool;
use csv_core::lun::{Cached, ZeroCopy};

use crate::connection::{Admission, ConnectionEvents, ConnectionHandle, ConnectionId};
use crate::export::{
    BlockDevice, DeviceError, ExportError, ExportProvider, Extent, OpenPurpose, ReadChunk, ZeroMode,
};
use crate::proto::{self, ClientOption, Command, Errno, ProtoError, Request};
use crate::reply::{BATCH_BYTES, Frame, Part, SpliceSocket, write_replies};

/// The id of `base:allocation` in SET_META_CONTEXT replies and BLOCK_STATUS chunks.
const BASE_ALLOCATION_ID: u32 = 1;
/// Oversized options up to this length are drained and refused politely; beyond, the
/// connection is dropped after the refusal.
const OPTION_DRAIN_LIMIT: u32 = 1 << 20;
/// Cap on extents in one BLOCK_STATUS chunk (8 KiB of payload).
const MAX_EXTENTS: usize = 1024;
/// Advertised preferred block size.
const PREFERRED_BLOCK: u32 = 4096;

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests processed concurrently per connection.
    pub max_in_flight: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Bytes of READ/WRITE payload buffered per connection at once.
    pub payload_budget: u32,
    /// Largest option data accepted during the handshake.
    pub max_option_len: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// After shutdown starts, how long connections keep answering (with ESHUTDOWN) so that
    /// clients can disconnect cleanly.
    pub shutdown_grace: Duration,
    /// How large READs of data in the LUN's page cache reach the socket (see [`ReadPath`]);
    /// only for connections on kernel sockets (those the server accepts itself), since on any
    /// other stream user space copies the reply's bytes.
    pub reads: ReadPath,
}

/// How a large READ (at least [`ZERO_COPY_MIN`] bytes) of data already in the page cache of
/// a buffered LUN goes out; anything else is read into a buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadPath {
    /// Read into a buffer (`preadv2`) and written (`writev`): two copies on the server.
    Copy,
    /// Handed to `writev` from a read-only mapping of the LUN: one copy, into the same large
    /// socket fragments as a copied reply (`csv_core::lun::mapped`).
    #[default]
    Map,
    /// Spliced (`splice(2)`): no copy on the server, but on loopback the client receives
    /// one fragment per 4 KiB page, which costs it more than the copies save where each
    /// kernel call is dear (AMD with return-stack mitigations: 0.55-0.6x the rate of copied
    /// replies, docs/benchmarks.md).
    Splice,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_payload: 32 << 20,
            payload_budget: 128 << 20,
            max_option_len: 16 << 10,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            reads: ReadPath::default(),
        }
    }
}

/// The server could not keep serving a listener.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("accepting an NBD connection failed")]
    Accept(#[source] io::Error),
}

/// Why one connection ended abnormally (logged; never fatal for the server).
#[derive(Debug, Error)]
enum ConnError {
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("client violated the protocol")]
    Proto(#[from] ProtoError),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client without fixed newstyle sent option {0}")]
    NotFixedNewstyle(u32),
    #[error("client sent option {option} with {len} bytes of data")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("client did not finish the handshake in time")]
    HandshakeTimeout,
    #[error("export {name:?} requested with NBD_OPT_EXPORT_NAME cannot be served")]
    ExportName {
        name: String,
        #[source]
        source: ExportError,
    },
}

/// An NBD server over an [`ExportProvider`]. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

struct Shared {
    provider: Arc<dyn ExportProvider>,
    events: Option<Arc<dyn ConnectionEvents>>,
    config: ServerConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    conns: Mutex<HashMap<ConnectionId, ConnectionHandle>>,
    next_id: AtomicU64,
    /// Large WRITE payload buffers, recycled while still warm in the CPU cache.
    payload_bufs: Arc<BufPool>,
}

/// Idle WRITE payload buffers the server keeps.
const PAYLOAD_BUFS_KEPT: usize = 16;

impl NbdServer {
    pub fn new(
        provider: Arc<dyn ExportProvider>,
        config: ServerConfig,
        events: Option<Arc<dyn ConnectionEvents>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                provider,
                events,
                config,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                payload_bufs: BufPool::new(PAYLOAD_BUFS_KEPT),
            }),
        }
    }

    /// Accepts TCP clients until shutdown.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), ServerError> {
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, addr)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    self.spawn_socket(stream, addr.to_string());
                }
                Err(e) => accept_failed(e).await?,
            }
        }
    }

    /// Accepts unix-socket clients until shutdown.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<(), ServerError> {
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let peer = addr
                        .as_pathname()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "unix".to_owned());
                    self.spawn_socket(stream, peer);
                }
                Err(e) => accept_failed(e).await?,
            }
        }
    }

    /// Serves one already-connected stream on a tracked task.
    pub fn spawn_connection<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Not a kernel socket: user space may copy reply bytes (an in-memory stream, TLS), so
        // nothing is sent from the LUN's mapping (`csv_core::lun::mapped`) or spliced.
        self.spawn_serving(stream, peer, ReplyPath::Copy);
    }

    /// Serves an accepted socket; large cached READ replies may be sent from the LUN's mapping
    /// or spliced into it (`[nbd] reads`). Called on the server's runtime (registering the
    /// descriptor needs it).
    fn spawn_socket<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    {
        let path = match self.shared.config.reads {
            ReadPath::Copy => ReplyPath::Copy,
            ReadPath::Map => ReplyPath::Map,
            ReadPath::Splice => match SpliceSocket::new(&stream) {
                Ok(s) => ReplyPath::Splice(s),
                Err(e) => {
                    debug!(error = %e, "replies will not be spliced");
                    ReplyPath::Copy
                }
            },
        };
        self.spawn_serving(stream, peer, path);
    }

    fn spawn_serving<S>(&self, stream: S, peer: String, path: ReplyPath)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.shared.clone();
        let span = info_span!("nbd_conn", peer = %peer);
        self.shared.tasks.spawn(
            async move {
                if let Err(e) = serve_connection(shared, stream, path, peer).await {
                    warn!(error = %chain(&e), "NBD connection closed");
                }
            }
            .instrument(span),
        );
    }

    /// Connections currently in transmission phase.
    pub fn connections(&self) -> Vec<ConnectionHandle> {
        lock(&self.shared.conns).values().cloned().collect()
    }

    /// The token that starts shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Stops accepting, answers new requests with ESHUTDOWN, and waits until every
    /// connection has finished (clients disconnect, or the grace period ends).
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

async fn accept_failed(e: io::Error) -> Result<(), ServerError> {
    // Resource exhaustion and aborted handshakes are transient: back off briefly and go on.
    let transient = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    );
    if transient {
        warn!(error = %e, "accept failed; retrying");
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    } else {
        Err(ServerError::Accept(e))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Display` of an error and all its sources, joined by ": ".
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// How a connection's large cached READ replies leave (decided when it is accepted).
enum ReplyPath {
    /// Read into a buffer.
    Copy,
    /// Sent from the LUN's mapping.
    Map,
    /// Spliced into the socket through this duplicate of its descriptor.
    Splice(SpliceSocket),
}

/// What the handshake settled on.
struct Session {
    name: String,
    device: Arc<dyn BlockDevice>,
    structured: bool,
    meta_context: Option<u32>,
}

async fn serve_connection<S>(
    shared: Arc<Shared>,
    mut stream: S,
    path: ReplyPath,
    peer: String,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated = tokio::select! {
        _ = shared.shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(shared.config.handshake_timeout, handshake(&shared, &mut stream)) => r,
    };
    let Some(session) = negotiated.map_err(|_| ConnError::HandshakeTimeout)?? else {
        return Ok(());
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = ConnectionHandle::new(id, session.name.clone(), peer, session.device.read_only());
    lock(&shared.conns).insert(id, conn.clone());
    if let Some(ev) = &shared.events {
        ev.opened(&conn);
    }
    debug!(export = %session.name, id, "transmission started");
    let result = transmission(&shared, stream, path, session, &conn).await;
    lock(&shared.conns).remove(&id);
    if let Some(ev) = &shared.events {
        ev.closed(&conn);
    }
    result
}

fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_CACHE;
    if dev.read_only() {
        f |= proto::TFLAG_READ_ONLY;
    } else {
        f |= proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= proto::TFLAG_SEND_DF;
    }
    if dev.can_multi_conn() {
        f |= proto::TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// Minimum block size: 512 unless the size is not a multiple of it (qemu refuses a writable
/// export whose size is not a multiple of the advertised minimum).
fn min_block(size: u64) -> u32 {
    if size.is_multiple_of(512) { 512 } else { 1 }
}

fn export_error_reply(e: &ExportError) -> u32 {
    match e {
        ExportError::Denied(_) => proto::REP_ERR_POLICY,
        ExportError::NotFound(_) | ExportError::Open { .. } | ExportError::Vhd { .. } => {
            proto::REP_ERR_UNKNOWN
        }
    }
}

/// Runs option haggling. `Ok(None)`: the client aborted.
async fn handshake<S>(shared: &Shared, s: &mut S) -> Result<Option<Session>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    proto::encode_greeting(&mut out, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&out).await?;
    let cflags = s.read_u32().await?;
    if cflags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnError::ClientFlags(cflags));
    }
    let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // Export for which base:allocation is selected.
    let mut meta_export: Option<String> = None;
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut hdr).await?;
        let h = proto::parse_option_header(&hdr)?;
        if !fixed && h.option != proto::OPT_EXPORT_NAME {
            return Err(ConnError::NotFixedNewstyle(h.option));
        }
        out.clear();
        if h.length > shared.config.max_option_len {
            let too_big = ConnError::OptionTooLarge {
                option: h.option,
                len: h.length,
            };
            if h.option == proto::OPT_EXPORT_NAME {
                return Err(too_big);
            }
            let keep = h.length <= OPTION_DRAIN_LIMIT;
            if keep {
                tokio::io::copy(&mut (&mut *s).take(h.length as u64), &mut tokio::io::sink())
                    .await?;
            }
            proto::encode_option_reply(
                &mut out,
                h.option,
                proto::REP_ERR_TOO_BIG,
                b"option data too large",
            );
            s.write_all(&out).await?;
            if keep {
                continue;
            }
            return Err(too_big);
        }
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data).await?;
        let opt = match proto::parse_option(h.option, &data) {
            Ok(o) => o,
            Err(e) if h.option == proto::OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                let msg = e.to_string();
                proto::encode_option_reply(
                    &mut out,
                    h.option,
                    proto::REP_ERR_INVALID,
                    msg.as_bytes(),
                );
                s.write_all(&out).await?;
                continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => {
                let device = shared
                    .provider
                    .open(&name, OpenPurpose::Serve)
                    .await
                    .map_err(|source| ConnError::ExportName {
                        name: name.clone(),
                        source,
                    })?;
                let flags = transmission_flags(device.as_ref(), structured);
                proto::encode_export_name_reply(&mut out, device.size(), flags, no_zeroes);
                s.write_all(&out).await?;
                let meta_context =
                    (meta_export.as_deref() == Some(name.as_str())).then_some(BASE_ALLOCATION_ID);
                return Ok(Some(Session {
                    name,
                    device,
                    structured,
                    meta_context,
                }));
            }
            ClientOption::Abort => {
                proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                // The client may already have closed its end.
                let _ = s.write_all(&out).await;
                return Ok(None);
            }
            ClientOption::List => {
                for name in shared.provider.list().await {
                    if name.len() <= proto::MAX_STRING_LEN {
                        let d = proto::server_reply_data(&name);
                        proto::encode_option_reply(&mut out, h.option, proto::REP_SERVER, &d);
                    }
                }
                proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.option == proto::OPT_GO;
                if shared.shutdown.is_cancelled() {
                    proto::encode_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_ERR_SHUTDOWN,
                        b"server is shutting down",
                    );
                } else {
                    let purpose = if go {
                        OpenPurpose::Serve
                    } else {
                        OpenPurpose::Info
                    };
                    match shared.provider.open(&req.name, purpose).await {
                        Err(e) => {
                            let msg = chain(&e);
                            proto::encode_option_reply(
                                &mut out,
                                h.option,
                                export_error_reply(&e),
                                msg.as_bytes(),
                            );
                        }
                        Ok(device) => {
                            let size = device.size();
                            let flags = transmission_flags(device.as_ref(), structured);
                            let infos = [
                                proto::info_export_data(size, flags),
                                proto::info_block_size_data(
                                    min_block(size),
                                    PREFERRED_BLOCK,
                                    shared.config.max_payload,
                                ),
                            ];
                            for d in &infos {
                                proto::encode_option_reply(&mut out, h.option, proto::REP_INFO, d);
                            }
                            if req.info_requests.contains(&proto::INFO_NAME) {
                                let d = proto::info_string_data(proto::INFO_NAME, &req.name);
                                proto::encode_option_reply(&mut out, h.option, proto::REP_INFO, &d);
                            }
                            proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                            if go {
                                s.write_all(&out).await?;
                                let meta_context = (meta_export.as_deref()
                                    == Some(req.name.as_str()))
                                .then_some(BASE_ALLOCATION_ID);
                                return Ok(Some(Session {
                                    name: req.name,
                                    device,
                                    structured,
                                    meta_context,
                                }));
                            }
                        }
                    }
                }
            }
            ClientOption::StructuredReply => {
                if structured {
                    proto::encode_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(req) => {
                let listed = req.queries.is_empty()
                    || req
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == proto::BASE_ALLOCATION);
                if listed {
                    let d = proto::meta_context_data(0, proto::BASE_ALLOCATION);
                    proto::encode_option_reply(&mut out, h.option, proto::REP_META_CONTEXT, &d);
                }
                proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
            }
            ClientOption::SetMetaContext(req) => {
                // Replaces earlier selections, even when it fails.
                meta_export = None;
                if !structured {
                    proto::encode_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_ERR_INVALID,
                        b"structured replies must be negotiated first",
                    );
                } else {
                    if req.queries.iter().any(|q| q == proto::BASE_ALLOCATION) {
                        let d =
                            proto::meta_context_data(BASE_ALLOCATION_ID, proto::BASE_ALLOCATION);
                        proto::encode_option_reply(&mut out, h.option, proto::REP_META_CONTEXT, &d);
                        meta_export = Some(req.export);
                    }
                    proto::encode_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                }
            }
            ClientOption::Unsupported(code) => {
                proto::encode_option_reply(
                    &mut out,
                    code,
                    proto::REP_ERR_UNSUP,
                    b"option not supported",
                );
            }
        }
        s.write_all(&out).await?;
    }
}

/// State shared by the reader and the request tasks of one connection.
struct RequestCtx {
    device: Arc<dyn BlockDevice>,
    structured: bool,
    meta_context: Option<u32>,
    /// How large cached READs are taken without a copy, if at all (spliced pipes only when
    /// the writer has the socket's descriptor).
    zero_copy: Option<ZeroCopy>,
    replies: mpsc::Sender<Frame>,
    wrote: AtomicBool,
}

async fn transmission<S>(
    shared: &Shared,
    stream: S,
    path: ReplyPath,
    session: Session,
    conn: &ConnectionHandle,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let (tx, rx) = mpsc::channel(cfg.max_in_flight + 1);
    let (zero_copy, splice) = match path {
        ReplyPath::Copy => (None, None),
        ReplyPath::Map => (Some(ZeroCopy::Map), None),
        ReplyPath::Splice(s) => (Some(ZeroCopy::Splice), Some(s)),
    };
    let ctx = Arc::new(RequestCtx {
        zero_copy,
        device: session.device.clone(),
        structured: session.structured,
        meta_context: session.meta_context,
        replies: tx,
        wrote: AtomicBool::new(false),
    });
    let writer = tokio::spawn(write_replies(wr, splice, rx).instrument(tracing::Span::current()));
    let requests = TaskTracker::new();
    let mut batch = Batch::default();
    let outcome = read_requests(shared, &mut rd, &ctx, conn, &requests, &mut batch).await;
    // Replies completed on this task are queued before anything else happens.
    batch.send(&ctx).await;
    // Drain: every admitted request finishes and queues its reply before we close.
    requests.close();
    requests.wait().await;
    if ctx.wrote.load(Ordering::Acquire)
        && let Err(e) = session.device.flush().await
    {
        warn!(error = %chain(&e), "flush at disconnect failed");
    }
    drop(ctx);
    match writer.await {
        Ok(Err(e)) => debug!(error = %e, "reply writer stopped"),
        Err(e) => warn!(error = %e, "reply writer task failed"),
        Ok(Ok(())) => {}
    }
    outcome
}

/// What an admitted request holds until its reply is queued.
struct Pass {
    _admission: Admission,
    _budget: Option<OwnedSemaphorePermit>,
    _slot: OwnedSemaphorePermit,
}

/// Replies of requests that completed on the reader task, queued to the writer together
/// (one channel message and one writer wake-up for many replies). Their passes are released
/// only after the replies were queued, as for requests run on their own task.
#[derive(Default)]
struct Batch {
    frames: Frame,
    bytes: usize,
    passes: Vec<Pass>,
}

impl Batch {
    fn push(&mut self, frame: Frame, pass: Option<Pass>) {
        self.bytes += frame.iter().map(Part::len).sum::<usize>();
        self.frames.extend(frame);
        self.passes.extend(pass);
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Queues the replies, then releases the passes. `false`: the writer is gone.
    async fn send(&mut self, ctx: &RequestCtx) -> bool {
        if self.is_empty() {
            return true;
        }
        let frames = std::mem::take(&mut self.frames);
        self.bytes = 0;
        let sent = ctx.replies.send(frames).await.is_ok();
        self.passes.clear();
        sent
    }
}

/// Completes when shutdown started and the grace period elapsed.
async fn shutdown_grace(token: CancellationToken, grace: Duration) {
    token.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// A request's execution, boxed so that a future first polled on the reader task can move to
/// its own task.
type Execution = Pin<Box<dyn Future<Output = Frame> + Send>>;

/// Reads and dispatches requests. Each admitted request is polled once right here: one that
/// completes without waiting (page-cache I/O) has its reply added to `batch`, which goes to
/// the writer before this task could wait for anything (socket, slots, byte budget); one
/// that must wait continues on its own task and queues its reply itself.
async fn read_requests<R>(
    shared: &Shared,
    rd: &mut BufReader<R>,
    ctx: &Arc<RequestCtx>,
    conn: &ConnectionHandle,
    requests: &TaskTracker,
    batch: &mut Batch,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
{
    let cfg = &shared.config;
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight));
    let budget = Arc::new(Semaphore::new(cfg.payload_budget as usize));
    let kill = conn.kill_token().clone();
    let grace = shutdown_grace(shared.shutdown.clone(), cfg.shutdown_grace);
    tokio::pin!(grace);
    // After a large payload, the next header is read on its own (see `read_header`).
    let mut after_large = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if !batch.send(ctx).await {
                    return Ok(());
                }
                tokio::select! {
                    biased;
                    _ = kill.cancelled() => return Ok(()),
                    _ = &mut grace => return Ok(()),
                    s = slots.clone().acquire_owned() => match s {
                        Ok(s) => s,
                        Err(_) => return Ok(()),
                    },
                }
            }
        };
        if rd.buffer().len() < proto::REQUEST_LEN && !batch.send(ctx).await {
            return Ok(());
        }
        let mut hdr = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = kill.cancelled() => return Ok(()),
            _ = &mut grace => return Ok(()),
            r = read_header(rd, &mut hdr, after_large) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = proto::parse_request(&hdr)?;
        after_large = large_payload(&req);
        if req.command == Command::Disc {
            return Ok(());
        }
        let check = validate(ctx, &req, cfg.max_payload, shared.shutdown.is_cancelled());
        if req.command.has_payload()
            && (rd.buffer().len() < req.length as usize
                || budget.available_permits() < budget_permits(&req, cfg.payload_budget))
            && !batch.send(ctx).await
        {
            return Ok(());
        }
        // A client stalling mid-payload must not delay disconnect() or shutdown.
        let (payload, mut budget_permit) = tokio::select! {
            biased;
            _ = kill.cancelled() => return Ok(()),
            _ = &mut grace => return Ok(()),
            p = read_payload(rd, &req, check.is_ok(), &budget, cfg.payload_budget, &shared.payload_bufs) => p?,
        };
        let writes = matches!(
            req.command,
            Command::Write | Command::WriteZeroes | Command::Trim
        );
        let admission = match check {
            Err(errno) => Err(errno),
            Ok(()) => conn.admit(writes).map_err(|_| Errno::Perm),
        };
        let admission = match admission {
            Ok(a) => a,
            Err(errno) => {
                let frame = error_frame(ctx.structured, &req, errno, refusal_message(errno));
                batch.push(frame, None);
                drop(slot);
                continue;
            }
        };
        if req.command == Command::Read {
            let permits = budget_permits(&req, cfg.payload_budget);
            if budget.available_permits() < permits && !batch.send(ctx).await {
                return Ok(());
            }
            budget_permit = budget.clone().acquire_many_owned(permits as u32).await.ok();
        }
        let pass = Pass {
            _admission: admission,
            _budget: budget_permit,
            _slot: slot,
        };
        let span = tracing::debug_span!("nbd_req", cookie = req.cookie, cmd = ?req.command);
        let mut run: Execution = {
            let ctx = ctx.clone();
            Box::pin(async move { execute(&ctx, &req, payload).await })
        };
        let first =
            std::future::poll_fn(|cx| Poll::Ready(span.in_scope(|| run.as_mut().poll(cx)))).await;
        match first {
            Poll::Ready(frame) => {
                batch.push(frame, Some(pass));
                if batch.bytes >= BATCH_BYTES {
                    if !batch.send(ctx).await {
                        return Ok(());
                    }
                    // Let the reply writer (in this worker's LIFO slot) put the batch on
                    // the wire now: the client copies it while this task reads the next
                    // request's data, rather than after every buffered request was read.
                    // Sequential 1 MiB reads: 1.045x nbdkit against 0.951x without
                    // (paired, 10 rounds; docs/benchmarks.md).
                    tokio::task::yield_now().await;
                }
            }
            Poll::Pending => {
                let ctx = ctx.clone();
                requests.spawn(
                    async move {
                        let frame = run.await;
                        // Send before releasing the pass: drained writes have queued replies.
                        let _ = ctx.replies.send(frame).await;
                        drop(pass);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Byte-budget permits a READ or WRITE payload holds.
fn budget_permits(req: &Request, budget_total: u32) -> usize {
    req.length.clamp(1, budget_total) as usize
}

/// Short text for an error chunk of a request refused before it reached the device.
fn refusal_message(errno: Errno) -> &'static str {
    match errno {
        Errno::Inval => "invalid request: command, flags or range",
        Errno::NoSpc => "write beyond the end of the export",
        Errno::Perm => "export is read-only or writes were revoked",
        Errno::Overflow => "request larger than the maximum payload",
        Errno::Shutdown => "server is shutting down",
        Errno::Io | Errno::NoMem | Errno::NotSup => "request refused",
    }
}

/// Payloads this large are received straight into their own buffer, never through the
/// connection's read buffer.
const LARGE_PAYLOAD: u32 = 64 << 10;

fn large_payload(req: &Request) -> bool {
    req.command.has_payload() && req.length >= LARGE_PAYLOAD
}

/// Reads a request header. Right after a large payload (`after_large`) with nothing
/// buffered, it reads exactly the header: a buffered read would pull up to the buffer's
/// size of the next payload along with it, and every one of those bytes would then be
/// copied once more, from the read buffer into the payload's buffer. Small requests keep
/// the buffered read, which takes many of them in one system call.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    hdr: &mut [u8; proto::REQUEST_LEN],
    after_large: bool,
) -> io::Result<()> {
    if after_large && rd.buffer().is_empty() {
        rd.get_mut().read_exact(hdr).await?;
    } else {
        rd.read_exact(hdr).await?;
    }
    Ok(())
}

/// Reads a WRITE payload (within the byte budget), or drains it when the request is refused.
/// A large payload takes what the read buffer holds, then reads the rest from the socket
/// straight into its own buffer, exactly to its end (see [`read_header`]).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    req: &Request,
    accepted: bool,
    budget: &Arc<Semaphore>,
    budget_total: u32,
    bufs: &Arc<BufPool>,
) -> io::Result<(Bytes, Option<OwnedSemaphorePermit>)> {
    if !req.command.has_payload() {
        return Ok((Bytes::new(), None));
    }
    if !accepted {
        tokio::io::copy(
            &mut (&mut *rd).take(req.length as u64),
            &mut tokio::io::sink(),
        )
        .await?;
        return Ok((Bytes::new(), None));
    }
    let permits = budget_permits(req, budget_total) as u32;
    let permit = budget.clone().acquire_many_owned(permits).await.ok();
    // Read straight into uninitialised capacity (no zero-fill): `read_buf` only exposes
    // bytes the reader has written, and `limit` stops it at the payload's end.
    let len = req.length as usize;
    let mut buf = bufs.take(len);
    let large = large_payload(req);
    if large {
        let have = rd.buffer().len().min(len);
        buf.extend_from_slice(&rd.buffer()[..have]);
        rd.consume(have);
    }
    while buf.len() < len {
        let left = len - buf.len();
        let limited = &mut (&mut buf).limit(left);
        let n = if large {
            rd.get_mut().read_buf(limited).await?
        } else {
            rd.read_buf(limited).await?
        };
        if n == 0 {
            bufs.give_back(buf);
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok((bufs.freeze(buf), permit))
}

/// Checks a request against the negotiated state and the device, in the order the spec's
/// error values suggest.
fn validate(
    ctx: &RequestCtx,
    req: &Request,
    max_payload: u32,
    shutting_down: bool,
) -> Result<(), Errno> {
    let cmd = req.command;
    if matches!(cmd, Command::Unknown(_)) || req.flags & !cmd.allowed_flags() != 0 {
        return Err(Errno::Inval);
    }
    if shutting_down {
        return Err(Errno::Shutdown);
    }
    if req.flags & proto::CMD_FLAG_DF != 0 && !ctx.structured {
        return Err(Errno::Inval);
    }
    let writes = matches!(cmd, Command::Write | Command::WriteZeroes | Command::Trim);
    if writes && ctx.device.read_only() {
        return Err(Errno::Perm);
    }
    if req.length > max_payload {
        match cmd {
            Command::Read if ctx.structured => return Err(Errno::Overflow),
            Command::Read | Command::Write => return Err(Errno::Inval),
            _ => {}
        }
    }
    if cmd == Command::BlockStatus && (ctx.meta_context.is_none() || req.length == 0) {
        return Err(Errno::Inval);
    }
    if cmd != Command::Flush {
        let in_range = req
            .offset
            .checked_add(req.length as u64)
            .is_some_and(|end| end <= ctx.device.size());
        if !in_range {
            return Err(match cmd {
                Command::Write | Command::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            });
        }
    }
    Ok(())
}

/// Maps a device error to the NBD error value for `cmd` (the single errno edge).
pub fn errno_for(cmd: Command, e: &DeviceError) -> Errno {
    match e {
        DeviceError::OutOfRange { .. } => match cmd {
            Command::Write | Command::WriteZeroes => Errno::NoSpc,
            _ => Errno::Inval,
        },
        DeviceError::ReadOnly | DeviceError::Revoked => Errno::Perm,
        DeviceError::FastZeroUnsupported => Errno::NotSup,
        DeviceError::Allocate(io) | DeviceError::Io(io) => match io.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Errno::NoSpc,
            Some(libc::EROFS | libc::EPERM | libc::EACCES) => Errno::Perm,
            _ => Errno::Io,
        },
    }
}

fn simple(errno: u32, cookie: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    proto::encode_simple_reply(&mut b, errno, cookie);
    b.freeze()
}

/// The reply to a failed request: a structured error chunk where structured replies are
/// mandatory (READ and BLOCK_STATUS after SR), a simple reply otherwise.
fn error_frame(structured: bool, req: &Request, errno: Errno, msg: &str) -> Frame {
    if structured && matches!(req.command, Command::Read | Command::BlockStatus) {
        let mut b = BytesMut::new();
        proto::encode_error_chunk(&mut b, req.cookie, errno, msg);
        vec![b.freeze().into()]
    } else {
        vec![simple(errno as u32, req.cookie).into()]
    }
}

fn done_frame(req: &Request, r: Result<(), DeviceError>) -> Frame {
    match r {
        Ok(()) => vec![simple(0, req.cookie).into()],
        Err(e) => device_error_frame(false, req, &e),
    }
}

fn device_error_frame(structured: bool, req: &Request, e: &DeviceError) -> Frame {
    debug!(error = %chain(e), cookie = req.cookie, "request failed");
    error_frame(structured, req, errno_for(req.command, e), &e.to_string())
}

async fn execute(ctx: &RequestCtx, req: &Request, payload: Bytes) -> Frame {
    let dev = ctx.device.as_ref();
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, req.length);
    let frame = match req.command {
        Command::Read => return read_reply(ctx, req).await,
        Command::BlockStatus => return block_status_reply(ctx, req).await,
        Command::Write if len == 0 => Ok(()),
        Command::Write => dev.write(off, payload, fua).await,
        Command::Flush => dev.flush().await,
        Command::Trim if len == 0 => Ok(()),
        Command::Trim => dev.trim(off, len as u64, fua).await,
        Command::WriteZeroes if len == 0 => Ok(()),
        Command::WriteZeroes => {
            let mode = ZeroMode {
                may_trim: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            dev.write_zeroes(off, len as u64, mode).await
        }
        Command::Cache => dev.cache(off, len).await,
        // Filtered out by the reader and `validate`.
        Command::Disc | Command::Unknown(_) => {
            return error_frame(ctx.structured, req, Errno::Inval, "unexpected command");
        }
    };
    if frame.is_ok()
        && matches!(
            req.command,
            Command::Write | Command::WriteZeroes | Command::Trim
        )
    {
        ctx.wrote.store(true, Ordering::Release);
    }
    done_frame(req, frame)
}

/// Zero bytes as static slices (no allocation).
fn zeros(mut len: usize, out: &mut Frame) {
    static Z: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = len.min(Z.len());
        out.push(Bytes::from_static(&Z[..n]).into());
        len -= n;
    }
}

/// Checks that a device's chunks cover exactly `[offset, offset+len)` in order.
fn covers(chunks: &[ReadChunk], offset: u64, len: u32) -> bool {
    let mut pos = offset;
    for c in chunks {
        let (o, l) = match c {
            ReadChunk::Data { offset, data } => (*offset, data.len() as u64),
            ReadChunk::Hole { offset, len } => (*offset, *len as u64),
        };
        if o != pos || l == 0 {
            return false;
        }
        pos += l;
    }
    pos == offset + len as u64
}

async fn read_reply(ctx: &RequestCtx, req: &Request) -> Frame {
    let cookie = req.cookie;
    if req.length == 0 {
        if ctx.structured {
            let mut b = BytesMut::new();
            proto::encode_none_chunk(&mut b, cookie);
            return vec![b.freeze().into()];
        }
        return vec![simple(0, cookie).into()];
    }
    if let Some(how) = ctx.zero_copy
        && req.length >= ZERO_COPY_MIN
        && let Some(cached) = ctx.device.read_cached(req.offset, req.length, how).await
    {
        if cached.len() == req.length as usize {
            return cached_reply(ctx.structured, req, cached);
        }
        warn!(
            cookie,
            "device took a read from the page cache that does not cover the request"
        );
        return error_frame(ctx.structured, req, Errno::Io, "short read");
    }
    let chunks = match ctx.device.read(req.offset, req.length).await {
        Ok(c) => c,
        Err(e) => return device_error_frame(ctx.structured, req, &e),
    };
    if !covers(&chunks, req.offset, req.length) {
        warn!(
            cookie,
            "device returned a read that does not cover the request"
        );
        return error_frame(ctx.structured, req, Errno::Io, "short read");
    }
    let mut frame = Vec::with_capacity(chunks.len() * 2 + 1);
    if !ctx.structured {
        frame.push(simple(0, cookie).into());
        for c in chunks {
            match c {
                ReadChunk::Data { data, .. } => frame.push(data.into()),
                ReadChunk::Hole { len, .. } => zeros(len as usize, &mut frame),
            }
        }
        return frame;
    }
    let df = req.flags & proto::CMD_FLAG_DF != 0;
    if df && chunks.len() > 1 {
        // One content chunk: holes become zeros.
        let mut hdr = BytesMut::new();
        proto::encode_offset_data_header(
            &mut hdr,
            proto::REPLY_FLAG_DONE,
            cookie,
            req.offset,
            req.length,
        );
        frame.push(hdr.freeze().into());
        for c in chunks {
            match c {
                ReadChunk::Data { data, .. } => frame.push(data.into()),
                ReadChunk::Hole { len, .. } => zeros(len as usize, &mut frame),
            }
        }
        return frame;
    }
    let last = chunks.len() - 1;
    for (i, c) in chunks.into_iter().enumerate() {
        let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
        let mut hdr = BytesMut::new();
        match c {
            ReadChunk::Data { offset, data } => {
                proto::encode_offset_data_header(
                    &mut hdr,
                    flags,
                    cookie,
                    offset,
                    data.len() as u32,
                );
                frame.push(hdr.freeze().into());
                frame.push(data.into());
            }
            ReadChunk::Hole { offset, len } => {
                proto::encode_offset_hole(&mut hdr, flags, cookie, offset, len);
                frame.push(hdr.freeze().into());
            }
        }
    }
    frame
}

/// READs at least this long are taken without a copy when the device can (below, a copy
/// costs less than the page-cache check and, for a pipe, its two extra system calls).
pub const ZERO_COPY_MIN: u32 = 64 << 10;

/// A successful READ reply whose data is `cached` (one data chunk when structured).
fn cached_reply(structured: bool, req: &Request, cached: Cached) -> Frame {
    let mut hdr = BytesMut::new();
    if structured {
        proto::encode_offset_data_header(
            &mut hdr,
            proto::REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            req.length,
        );
    } else {
        proto::encode_simple_reply(&mut hdr, 0, req.cookie);
    }
    let data = match cached {
        Cached::Pipe(p) => Part::Pipe(p),
        Cached::Mapped(m) => Part::Mapped(m),
    };
    vec![hdr.freeze().into(), data]
}

/// Normalises device extents: drops empty ones, merges equal neighbours, clips to the
/// request, caps the count, and keeps only the first with REQ_ONE.
fn normalise_extents(raw: Vec<Extent>, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for e in raw {
        if left == 0 {
            break;
        }
        let l = e.len.min(left);
        if l == 0 {
            continue;
        }
        left -= l;
        match out.last_mut() {
            Some(prev) if prev.1 == e.flags => prev.0 += l,
            _ => {
                if out.len() == MAX_EXTENTS {
                    break;
                }
                out.push((l, e.flags));
            }
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

async fn block_status_reply(ctx: &RequestCtx, req: &Request) -> Frame {
    let Some(context_id) = ctx.meta_context else {
        return error_frame(
            ctx.structured,
            req,
            Errno::Inval,
            "no metadata context selected",
        );
    };
    let raw = match ctx.device.block_status(req.offset, req.length).await {
        Ok(r) => r,
        Err(e) => return device_error_frame(true, req, &e),
    };
    let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let extents = normalise_extents(raw, req.length, req_one);
    if extents.is_empty() {
        return error_frame(true, req, Errno::Io, "no allocation information");
    }
    let mut b = BytesMut::new();
    proto::encode_block_status(
        &mut b,
        proto::REPLY_FLAG_DONE,
        req.cookie,
        context_id,
        &extents,
    );
    vec![b.freeze().into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u32, flags: u32) -> Extent {
        Extent { len, flags }
    }

    #[test]
    fn extents_are_merged_clipped_and_req_one_honoured() {
        let raw = vec![ext(10, 0), ext(0, 3), ext(10, 0), ext(100, 3)];
        assert_eq!(
            normalise_extents(raw.clone(), 50, false),
            vec![(20, 0), (30, 3)]
        );
        assert_eq!(normalise_extents(raw, 50, true), vec![(20, 0)]);
    }

    #[test]
    fn extent_count_is_capped() {
        let raw = (0..5000).map(|i| ext(1, i % 2)).collect();
        assert_eq!(normalise_extents(raw, 5000, false).len(), MAX_EXTENTS);
    }

    #[test]
    fn host_errnos_never_reach_the_wire() {
        let io = |n| DeviceError::Io(io::Error::from_raw_os_error(n));
        assert_eq!(errno_for(Command::Write, &io(libc::EDQUOT)), Errno::NoSpc);
        assert_eq!(errno_for(Command::Write, &io(libc::EFBIG)), Errno::NoSpc);
        assert_eq!(errno_for(Command::Read, &io(libc::ENOSYS)), Errno::Io);
        assert_eq!(errno_for(Command::Write, &io(libc::EROFS)), Errno::Perm);
        assert_eq!(
            errno_for(Command::Write, &DeviceError::Revoked),
            Errno::Perm
        );
        let oor = DeviceError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_for(Command::WriteZeroes, &oor), Errno::NoSpc);
        assert_eq!(errno_for(Command::Trim, &oor), Errno::Inval);
    }

    #[test]
    fn min_block_follows_size_alignment() {
        assert_eq!(min_block(104_865_792), 512);
        assert_eq!(min_block(1000), 1);
    }
}
