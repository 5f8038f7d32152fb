//! Protocol behaviour no packaged client can provoke, checked with a raw wire client built on
//! `nbd_backend::proto`: unknown options/commands/flags, bad magic, write revocation and
//! draining, out-of-order replies, graceful shutdown.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use csv_core::lun::mapped::MappedLun;
use csv_core::lun::{Cached, ZeroCopy};
use nbd_backend::export::{BackingFile, BoxFuture, FileBacking, RawDevice};
use nbd_backend::proto::{
    self, ClientOption, Command, Errno, ExportRequest, MetaContextRequest, Request,
};
use nbd_backend::{
    BlockDevice, ExportError, ExportProvider, NbdServer, OpenPurpose, ReadPath, ServerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

const SIZE: u64 = 1 << 20;

/// A minimal client speaking the wire format directly.
struct Raw {
    s: UnixStream,
}

impl Raw {
    async fn connect(sock: &std::path::Path, client_flags: u32) -> Raw {
        Raw::over(UnixStream::connect(sock).await.unwrap(), client_flags).await
    }

    /// A client on an already-connected stream.
    async fn over(mut s: UnixStream, client_flags: u32) -> Raw {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        let mut g = &greeting[..];
        assert_eq!(g.get_u64(), proto::NBD_MAGIC);
        assert_eq!(g.get_u64(), proto::IHAVEOPT);
        assert_eq!(
            g.get_u16() & proto::FLAG_FIXED_NEWSTYLE,
            proto::FLAG_FIXED_NEWSTYLE
        );
        s.write_u32(client_flags).await.unwrap();
        Raw { s }
    }

    async fn fixed(sock: &std::path::Path) -> Raw {
        Self::connect(sock, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await
    }

    async fn send_raw_option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        bytes::BufMut::put_u64(&mut b, proto::IHAVEOPT);
        bytes::BufMut::put_u32(&mut b, option);
        bytes::BufMut::put_u32(&mut b, data.len() as u32);
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads option replies up to the final one (ACK or an error); returns all of them.
    async fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).await.unwrap();
            let mut b = &h[..];
            assert_eq!(b.get_u64(), proto::OPTION_REPLY_MAGIC);
            assert_eq!(b.get_u32(), option);
            let ty = b.get_u32();
            let mut data = vec![0u8; b.get_u32() as usize];
            self.s.read_exact(&mut data).await.unwrap();
            out.push((ty, data));
            if ty == proto::REP_ACK || ty & 0x8000_0000 != 0 {
                return out;
            }
        }
    }

    async fn option(&mut self, opt: &ClientOption) -> Vec<(u32, Vec<u8>)> {
        let mut b = BytesMut::new();
        proto::encode_option(&mut b, opt);
        self.s.write_all(&b).await.unwrap();
        let code = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        self.replies(code).await
    }

    async fn go(&mut self, name: &str) {
        let r = self
            .option(&ClientOption::Go(ExportRequest {
                name: name.into(),
                info_requests: vec![proto::INFO_BLOCK_SIZE],
            }))
            .await;
        assert_eq!(r.last().unwrap().0, proto::REP_ACK, "{r:?}");
    }

    async fn send(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        payload: &[u8],
        length: u32,
    ) {
        let mut b = BytesMut::new();
        proto::encode_request(
            &mut b,
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            },
        );
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply header: (error, cookie).
    async fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        let mut b = &h[..];
        assert_eq!(b.get_u32(), proto::SIMPLE_REPLY_MAGIC);
        (b.get_u32(), b.get_u64())
    }

    async fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(Command::Write, 0, cookie, offset, data, data.len() as u32)
            .await;
        let (err, c) = self.simple().await;
        assert_eq!(c, cookie);
        err
    }

    async fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(Command::Read, 0, cookie, offset, &[], len).await;
        let (err, c) = self.simple().await;
        assert_eq!(c, cookie);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        Ok(data)
    }

    /// True if the server closed the connection.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A backing whose writes wait for a permit (lets tests hold requests in flight) and which
/// counts the reads it served without a copy (spliced, or viewed in its mapping).
struct GatedBacking {
    inner: FileBacking,
    map: MappedLun,
    gate: Arc<Semaphore>,
    zero_copied: Arc<AtomicUsize>,
}

impl BackingFile for GatedBacking {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        self.inner.read_at(offset, len)
    }
    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        Box::pin(async move {
            let c = match how {
                ZeroCopy::Splice => self.inner.read_cached(offset, len, how).await,
                // A plain file backing is never mapped; the test maps its fixed-size file
                // as a LUN would be.
                ZeroCopy::Map => self.map.view(offset, len).map(Cached::Mapped),
            };
            if c.is_some() {
                self.zero_copied.fetch_add(1, Ordering::Relaxed);
            }
            c
        })
    }
    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let permit = self.gate.acquire().await.map_err(io::Error::other)?;
            permit.forget();
            self.inner.write_at(offset, data).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        self.inner.flush()
    }
    fn set_size(&self, new_size: u64) -> BoxFuture<'_, io::Result<()>> {
        self.inner.set_size(new_size)
    }
}

/// Serves one export "disk" over a gated backing.
struct GatedProvider {
    device: Arc<dyn BlockDevice>,
}

impl ExportProvider for GatedProvider {
    fn list(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async { vec!["disk".to_owned()] })
    }
    fn open<'a>(
        &'a self,
        name: &'a str,
        _p: OpenPurpose,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, ExportError>> {
        Box::pin(async move {
            if name == "disk" {
                Ok(self.device.clone())
            } else {
                Err(ExportError::NotFound(name.to_owned()))
            }
        })
    }
}

struct Gated {
    _tmp: tempfile::TempDir,
    sock: std::path::PathBuf,
    server: NbdServer,
    gate: Arc<Semaphore>,
    zero_copied: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

/// Short shutdown grace: tests end with clients still connected.
fn quick() -> ServerConfig {
    ServerConfig {
        shutdown_grace: Duration::from_millis(100),
        ..ServerConfig::default()
    }
}

fn gated_server(config: ServerConfig) -> Gated {
    gated_server_sized(config, SIZE)
}

fn gated_server_sized(config: ServerConfig, size: u64) -> Gated {
    let tmp = tempfile::tempdir().unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp.path().join("disk"))
        .unwrap();
    file.set_len(size).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let zero_copied = Arc::new(AtomicUsize::new(0));
    let backing = Arc::new(GatedBacking {
        map: MappedLun::new(Arc::new(file.try_clone().unwrap()), size),
        inner: FileBacking::new(file).unwrap(),
        gate: gate.clone(),
        zero_copied: zero_copied.clone(),
    });
    let device: Arc<dyn BlockDevice> = Arc::new(RawDevice::new(backing, size, false));
    let server = NbdServer::new(Arc::new(GatedProvider { device }), config, None);
    let sock = tmp.path().join("s.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let s = server.clone();
    let accept = tokio::spawn(async move { s.serve_unix(listener).await.unwrap() });
    Gated {
        _tmp: tmp,
        sock,
        server,
        gate,
        zero_copied,
        accept,
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn unknown_and_oversized_options_get_errors_and_the_connection_survives() {
    let g = gated_server(quick());
    let mut c = Raw::fixed(&g.sock).await;
    for opt in [
        proto::OPT_EXTENDED_HEADERS,
        proto::OPT_STARTTLS,
        99,
        0x4000_0000,
    ] {
        c.send_raw_option(opt, b"ignored payload").await;
        let r = c.replies(opt).await;
        assert_eq!(
            r,
            vec![(proto::REP_ERR_UNSUP, b"option not supported".to_vec())]
        );
    }
    // Too large: drained and refused, then the next option works.
    c.send_raw_option(proto::OPT_GO, &vec![0u8; 100_000]).await;
    assert_eq!(c.replies(proto::OPT_GO).await[0].0, proto::REP_ERR_TOO_BIG);
    // Malformed INFO (truncated) is ERR_INVALID.
    c.send_raw_option(proto::OPT_INFO, &[0, 0, 0, 9, b'x'])
        .await;
    assert_eq!(
        c.replies(proto::OPT_INFO).await[0].0,
        proto::REP_ERR_INVALID
    );
    // SET_META_CONTEXT before structured replies is refused.
    let set = ClientOption::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    });
    assert_eq!(c.option(&set).await[0].0, proto::REP_ERR_INVALID);
    assert_eq!(
        c.option(&ClientOption::StructuredReply).await[0].0,
        proto::REP_ACK
    );
    assert_eq!(
        c.option(&ClientOption::StructuredReply).await[0].0,
        proto::REP_ERR_INVALID
    );
    // Exactly one context for base:allocation, unknown queries ignored, `base:` selects nothing.
    let set = ClientOption::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec![
            "qemu:dirty-bitmap:x".into(),
            "base:".into(),
            "base:allocation".into(),
        ],
    });
    let r = c.option(&set).await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].0, proto::REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    // LIST: u32 length + name, then ACK.
    let r = c.option(&ClientOption::List).await;
    assert_eq!(
        r,
        vec![
            (proto::REP_SERVER, b"\0\0\0\x04disk".to_vec()),
            (proto::REP_ACK, vec![])
        ]
    );
    // GO on an unknown export is an error, not a disconnect.
    let go = ClientOption::Go(ExportRequest {
        name: "nope".into(),
        info_requests: vec![],
    });
    assert_eq!(c.option(&go).await[0].0, proto::REP_ERR_UNKNOWN);
    c.go("disk").await;
    // Structured replies are on: a READ answers with one OFFSET_DATA chunk flagged DONE.
    c.send(Command::Read, 0, 1, 0, &[], 512).await;
    let mut h = [0u8; 20 + 8 + 512];
    c.s.read_exact(&mut h).await.unwrap();
    let mut b = &h[..];
    assert_eq!(b.get_u32(), proto::STRUCTURED_REPLY_MAGIC);
    assert_eq!(b.get_u16(), proto::REPLY_FLAG_DONE);
    assert_eq!(b.get_u16(), proto::REPLY_TYPE_OFFSET_DATA);
    assert_eq!((b.get_u64(), b.get_u32(), b.get_u64()), (1, 520, 0));
    g.server.shutdown().await;
    g.accept.await.unwrap();
}

#[tokio::test]
async fn unknown_client_flags_drop_the_connection() {
    let g = gated_server(quick());
    let mut c = Raw::connect(&g.sock, proto::FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    assert!(c.closed().await);
    g.server.shutdown().await;
}

#[tokio::test]
async fn bad_commands_get_einval_and_bad_magic_drops_only_that_connection() {
    let g = gated_server(quick());
    let mut c = Raw::fixed(&g.sock).await;
    c.go("disk").await;
    c.send(Command::Unknown(42), 0, 7, 0, &[], 0).await;
    assert_eq!(c.simple().await, (22, 7));
    c.send(Command::Flush, 1 << 9, 8, 0, &[], 0).await;
    assert_eq!(c.simple().await, (22, 8));
    // NO_HOLE is not valid on WRITE: EINVAL, and the payload is drained.
    c.send(
        Command::Write,
        proto::CMD_FLAG_NO_HOLE,
        9,
        0,
        &[1u8; 512],
        512,
    )
    .await;
    assert_eq!(c.simple().await, (22, 9));
    // Out of range write: ENOSPC after draining the payload; offset overflow too.
    c.send(Command::Write, 0, 10, SIZE, &[1u8; 512], 512).await;
    assert_eq!(c.simple().await, (28, 10));
    c.send(Command::Write, 0, 11, u64::MAX - 100, &[1u8; 512], 512)
        .await;
    assert_eq!(c.simple().await, (28, 11));
    // BLOCK_STATUS without a negotiated context is EINVAL.
    c.send(Command::BlockStatus, 0, 12, 0, &[], 512).await;
    assert_eq!(c.simple().await, (22, 12));
    g.gate.add_permits(1);
    assert_eq!(c.write(13, 0, &[5u8; 512]).await, 0);
    let mut bad = BytesMut::new();
    proto::encode_request(
        &mut bad,
        &Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        },
    );
    bad[0] ^= 0xff;
    c.s.write_all(&bad).await.unwrap();
    assert!(c.closed().await);
    // The server still serves the next client.
    let mut c2 = Raw::fixed(&g.sock).await;
    c2.go("disk").await;
    assert_eq!(c2.read(1, 0, 512).await.unwrap(), vec![5u8; 512]);
    g.server.shutdown().await;
}

#[tokio::test]
async fn revoked_connection_errors_new_writes_after_draining_admitted_ones() {
    let g = gated_server(quick());
    let mut c = Raw::fixed(&g.sock).await;
    c.go("disk").await;
    wait_until("connection registered", || {
        g.server.connections().len() == 1
    })
    .await;
    let conn = g.server.connections().remove(0);
    assert_eq!(conn.export(), "disk");
    // A write held in flight by the gate.
    c.send(Command::Write, 0, 1, 0, &[7u8; 4096], 4096).await;
    wait_until("write in flight", || conn.in_flight() == 1).await;
    let drainer = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.revoke_and_drain().await })
    };
    wait_until("revoked", || conn.writes_revoked()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !drainer.is_finished(),
        "drain returned while a write was in flight"
    );
    g.gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), drainer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.simple().await, (0, 1), "the admitted write succeeded");
    // New writes fail with EPERM and never reach the backing; reads still work.
    g.gate.add_permits(100);
    assert_eq!(c.write(2, 0, &[9u8; 4096]).await, 1);
    c.send(Command::WriteZeroes, 0, 3, 0, &[], 4096).await;
    assert_eq!(c.simple().await, (1, 3));
    assert_eq!(c.read(4, 0, 4096).await.unwrap(), vec![7u8; 4096]);
    g.server.shutdown().await;
}

#[tokio::test]
async fn replies_come_back_out_of_order() {
    let g = gated_server(quick());
    let mut c = Raw::fixed(&g.sock).await;
    c.go("disk").await;
    c.send(Command::Write, 0, 100, 0, &[1u8; 512], 512).await; // blocked on the gate
    c.send(Command::Read, 0, 200, 4096, &[], 512).await;
    assert_eq!(
        c.simple().await,
        (0, 200),
        "the read overtakes the blocked write"
    );
    let mut data = [0u8; 512];
    c.s.read_exact(&mut data).await.unwrap();
    g.gate.add_permits(1);
    assert_eq!(c.simple().await, (0, 100));
    g.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_answers_eshutdown_then_closes_after_disc() {
    let g = gated_server(ServerConfig {
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    });
    let mut c = Raw::fixed(&g.sock).await;
    c.go("disk").await;
    let server = g.server.clone();
    let stopping = tokio::spawn(async move { server.shutdown().await });
    wait_until("shutdown started", || {
        g.server.shutdown_token().is_cancelled()
    })
    .await;
    assert_eq!(c.read(1, 0, 512).await, Err(108));
    assert!(!stopping.is_finished());
    c.send(Command::Disc, 0, 2, 0, &[], 0).await;
    assert!(c.closed().await);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    g.accept.await.unwrap();
}

#[tokio::test]
async fn non_fixed_client_with_export_name_gets_padded_reply() {
    let g = gated_server(quick());
    let mut c = Raw::connect(&g.sock, 0).await;
    let mut b = BytesMut::new();
    proto::encode_option(&mut b, &ClientOption::ExportName("disk".into()));
    c.s.write_all(&b).await.unwrap();
    let mut reply = [0u8; 8 + 2 + 124];
    c.s.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    assert!(reply[10..].iter().all(|b| *b == 0));
    assert!(c.read(1, 0, 512).await.is_ok());
    g.server.shutdown().await;
}

/// With `reads: Splice`, large reads of cached data go out as spliced pipes; the client sees
/// the same bytes, in reply order, as for copied reads (small, unaligned past a pipe's
/// pages, or past a write).
#[tokio::test]
async fn large_cached_reads_are_spliced_when_asked_and_read_back_intact_between_copied_replies() {
    let config = ServerConfig {
        reads: ReadPath::Splice,
        ..quick()
    };
    cached_reads_come_back_intact(config, 2, false).await;
}

/// By default large reads of cached data are sent from a mapping of the LUN (one that is not
/// page aligned too), between copied small ones, and come back intact in reply order.
#[tokio::test]
async fn large_cached_reads_are_sent_from_the_mapping_by_default_and_read_back_intact() {
    assert_eq!(quick().reads, ReadPath::Map);
    cached_reads_come_back_intact(quick(), 3, false).await;
}

/// A stream handed to the server (`spawn_connection`) may be one whose bytes user space
/// copies, so nothing is sent from the mapping on it: the same reads all go out copied.
#[tokio::test]
async fn reads_on_a_handed_over_stream_are_never_sent_from_the_mapping() {
    cached_reads_come_back_intact(quick(), 0, true).await;
}

/// With `reads: Copy` nothing is taken from the page cache: the same reads all go out copied.
#[tokio::test]
async fn large_cached_reads_are_copied_when_asked() {
    let config = ServerConfig {
        reads: ReadPath::Copy,
        ..quick()
    };
    cached_reads_come_back_intact(config, 0, false).await;
}

/// Writes a 4 MiB pattern, reads it back pipelined, and checks how many reads were taken
/// without a copy. `handed`: the client's stream is handed to `spawn_connection` rather
/// than accepted by the server.
async fn cached_reads_come_back_intact(
    config: ServerConfig,
    want_zero_copied: usize,
    handed: bool,
) {
    const DISK: u64 = 4 << 20;
    let g = gated_server_sized(config, DISK);
    g.gate.add_permits(1 << 20);
    let (sock, zero_copied) = (g.sock.clone(), g.zero_copied.clone());

    let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    let mut c = if handed {
        let (client, server) = UnixStream::pair().unwrap();
        g.server.spawn_connection(server, "pair".into());
        Raw::over(client, flags).await
    } else {
        Raw::fixed(&sock).await
    };
    c.go("disk").await;
    let data: Vec<u8> = (0..DISK as usize).map(|i| (i * 7 % 251) as u8).collect();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        assert_eq!(c.write(i as u64, (i << 20) as u64, chunk).await, 0);
    }
    // Pipelined: large (zero-copy), small (copied), large unaligned (one page too many for a
    // pipe: copied when splicing, mapped when mapping), large.
    let reads: [(u64, u64, u32); 4] = [
        (10, 0, 1 << 20),
        (11, 5, 4096),
        (12, 100, 1 << 20),
        (13, 3 << 20, 1 << 20),
    ];
    for (cookie, off, len) in reads {
        c.send(Command::Read, 0, cookie, off, &[], len).await;
    }
    let mut seen = Vec::new();
    for _ in reads {
        let (err, cookie) = c.simple().await;
        assert_eq!(err, 0);
        let (_, off, len) = reads.iter().find(|r| r.0 == cookie).copied().unwrap();
        let mut got = vec![0u8; len as usize];
        c.s.read_exact(&mut got).await.unwrap();
        assert!(
            got == data[off as usize..(off + len as u64) as usize],
            "read {cookie} came back changed"
        );
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, [10, 11, 12, 13]);
    assert_eq!(
        zero_copied.load(Ordering::Relaxed),
        want_zero_copied,
        "reads taken from the page cache without a copy"
    );
    g.server.shutdown().await;
    g.accept.abort();
}

/// Large and small WRITEs pipelined in one burst: large payloads are received past the
/// connection's read buffer, small ones through it, and a refused large one is drained. The
/// headers and payloads straddle every boundary; every byte lands where it was sent.
#[tokio::test]
async fn pipelined_large_and_small_writes_land_intact() {
    const DISK: u64 = 4 << 20;
    let g = gated_server_sized(quick(), DISK);
    g.gate.add_permits(1 << 20);
    let mut c = Raw::fixed(&g.sock).await;
    c.go("disk").await;
    // (cookie, offset, length): 1 MiB, 4 KiB, 64 KiB (the large threshold), 64 KiB - 1, a
    // 256 KiB write past the end (refused, drained), 1 MiB unaligned, 512 bytes.
    let writes: [(u64, u64, u32); 7] = [
        (1, 0, 1 << 20),
        (2, (1 << 20) + 4096, 4096),
        (3, 2 << 20, 64 << 10),
        (4, (2 << 20) + (64 << 10), (64 << 10) - 1),
        (5, DISK - 4096, 256 << 10),
        (6, (3 << 20) - 777, 1 << 20),
        (7, 100, 512),
    ];
    let mut want = vec![0u8; DISK as usize];
    let mut burst = BytesMut::new();
    for (cookie, off, len) in writes {
        let data: Vec<u8> = (0..len as usize)
            .map(|i| ((i as u64 * 13 + cookie * 29) % 251) as u8)
            .collect();
        if off + len as u64 <= DISK {
            want[off as usize..off as usize + len as usize].copy_from_slice(&data);
        }
        proto::encode_request(
            &mut burst,
            &Request {
                flags: 0,
                command: Command::Write,
                cookie,
                offset: off,
                length: len,
            },
        );
        burst.extend_from_slice(&data);
    }
    c.s.write_all(&burst).await.unwrap();
    let mut answers = Vec::new();
    for _ in writes {
        answers.push(c.simple().await);
    }
    answers.sort_unstable_by_key(|&(_, cookie)| cookie);
    let errs: Vec<u32> = answers.iter().map(|&(e, _)| e).collect();
    assert_eq!(errs, [0, 0, 0, 0, Errno::NoSpc as u32, 0, 0], "{answers:?}");
    for (i, chunk) in want.chunks(1 << 20).enumerate() {
        let got = c
            .read(100 + i as u64, (i << 20) as u64, 1 << 20)
            .await
            .unwrap();
        assert!(got == chunk, "MiB {i} differs from what was written");
    }
    g.server.shutdown().await;
    g.accept.abort();
}
