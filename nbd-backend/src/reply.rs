//! The reply side of a connection: frames of [`Part`]s, and the one task that writes them.
//!
//! A reply frame is a list of parts in wire order: bytes (headers, data read into memory),
//! data viewed in a mapping of the LUN ([`Mapped`], see [`csv_core::lun::mapped`]), or data
//! held in a [`Pipe`] as page-cache references (see [`csv_core::lun::pipe`]). The writer
//! takes every frame already queued and writes them in order: runs of byte and mapped parts
//! with one `writev` (small pieces copied into one staging buffer, payloads and views as
//! they are), pipe parts with `splice(2)` into the socket.
//!
//! Splicing needs the socket's descriptor: [`SpliceSocket`] is a duplicate of it, registered
//! for write readiness only. Byte parts still go through the stream's write half; both write
//! to the same socket from this one task, in order. A connection without a descriptor never
//! gets pipe parts (the server checks [`SpliceSocket`] before splicing), and a pipe that
//! reaches a writer without one is copied out and written as bytes.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use bytes::{Buf, Bytes, BytesMut};
use csv_core::lun::mapped::Mapped;
use csv_core::lun::pipe::Pipe;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::sync::mpsc;

/// Replies queued in one message to the writer hold at most about this many bytes.
pub(crate) const BATCH_BYTES: usize = 1 << 20;
/// Pieces the writer hands to one `writev` (well under `IOV_MAX`).
const MAX_IOV: usize = 256;
/// Reply pieces up to this size are copied into the writer's staging buffer rather than
/// given their own iovec.
const COPY_MAX: usize = 512;

/// One piece of a reply.
#[derive(Debug)]
pub(crate) enum Part {
    Bytes(Bytes),
    /// Data viewed in a mapping of the LUN: only `writev` reads it.
    Mapped(Mapped),
    /// Data held in a pipe, spliced into the socket.
    Pipe(Pipe),
}

impl Part {
    pub(crate) fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Mapped(m) => m.len(),
            Part::Pipe(p) => p.len(),
        }
    }
}

impl From<Bytes> for Part {
    fn from(b: Bytes) -> Part {
        Part::Bytes(b)
    }
}

/// One reply (or several), in wire order.
pub(crate) type Frame = Vec<Part>;

/// A duplicate of the connection's socket descriptor, for splicing into it.
#[derive(Debug)]
pub(crate) struct SpliceSocket(AsyncFd<OwnedFd>);

impl SpliceSocket {
    /// Duplicates `sock` (which must already be non-blocking, as tokio's sockets are) and
    /// registers the duplicate for write readiness. Needs a tokio runtime.
    pub(crate) fn new(sock: &impl AsFd) -> io::Result<SpliceSocket> {
        let fd = sock.as_fd().try_clone_to_owned()?;
        // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, and refers to the
        // same file description, until the `AsyncFd` owning it drops it.
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) };
        Ok(SpliceSocket(registered.map_err(|e| e.into_parts().1)?))
    }

    /// Moves everything `pipe` holds into the socket, waiting for room as needed; returns
    /// the bytes moved. `Unsupported` if this socket cannot take a splice (nothing moved).
    async fn splice_all(&self, pipe: &mut Pipe) -> io::Result<usize> {
        let mut moved = 0;
        while !pipe.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| pipe.splice_to(fd.get_ref().as_raw_fd(), usize::MAX)) {
                Ok(Ok(n)) => moved += n,
                Ok(Err(e)) if moved == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(io::ErrorKind::Unsupported.into());
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(moved)
    }
}

/// Serialises reply frames: takes every frame already queued, then writes them (see the
/// module documentation).
pub(crate) async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut sock: Option<SpliceSocket>,
    mut rx: mpsc::Receiver<Frame>,
) -> io::Result<()> {
    let mut out = ReplyQueue::default();
    while let Some(frames) = rx.recv().await {
        out.push(frames);
        while out.bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(frames) => out.push(frames),
                Err(_) => break,
            }
        }
        out.write_to(&mut w, &mut sock).await?;
    }
    w.flush().await?;
    // Best effort: the peer may be gone already.
    let _ = w.shutdown().await;
    Ok(())
}

/// Reply bytes waiting to be written, in wire order.
#[derive(Default)]
struct ReplyQueue {
    parts: VecDeque<Part>,
    /// Trailing small pieces, copied together (becomes one part when the next large piece
    /// arrives or the queue is written).
    small: BytesMut,
    bytes: usize,
}

impl ReplyQueue {
    fn push(&mut self, frames: Frame) {
        for part in frames {
            if part.len() == 0 {
                continue;
            }
            self.bytes += part.len();
            match part {
                Part::Bytes(b) if b.len() <= COPY_MAX => self.small.extend_from_slice(&b),
                part => {
                    self.seal();
                    self.parts.push_back(part);
                }
            }
        }
    }

    /// Moves the staged small pieces into `parts`.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.parts
                .push_back(Part::Bytes(self.small.split().freeze()));
        }
    }

    async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        sock: &mut Option<SpliceSocket>,
    ) -> io::Result<()> {
        self.seal();
        while let Some(front) = self.parts.front_mut() {
            if let Part::Pipe(pipe) = front {
                if let Some(s) = sock {
                    match s.splice_all(pipe).await {
                        Ok(n) => self.bytes = self.bytes.saturating_sub(n),
                        Err(e) if e.kind() == io::ErrorKind::Unsupported => *sock = None,
                        Err(e) => return Err(e),
                    }
                }
                if pipe.is_empty() {
                    if let Some(Part::Pipe(p)) = self.parts.pop_front() {
                        p.give_back();
                    }
                } else {
                    // No way to splice: copy the bytes out and write them like any others.
                    let data = pipe.drain()?;
                    *front = Part::Bytes(data);
                }
                continue;
            }
            self.writev(w).await?;
        }
        self.bytes = 0;
        w.flush().await
    }

    /// One `writev` of the byte and mapped parts at the front (up to the first pipe).
    async fn writev<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        let iov: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .take(MAX_IOV)
            .map_while(|p| match p {
                Part::Bytes(b) => Some(IoSlice::new(b)),
                Part::Mapped(m) => Some(m.io_slice()),
                Part::Pipe(_) => None,
            })
            .collect();
        let mut n = w.write_vectored(&iov).await?;
        drop(iov);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.bytes = self.bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            let len = front.len();
            if n < len {
                match front {
                    Part::Bytes(b) => b.advance(n),
                    Part::Mapped(m) => m.advance(n),
                    Part::Pipe(_) => unreachable!("writev wrote no pipe part"),
                }
                n = 0;
            } else {
                n -= len;
                self.parts.pop_front();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use tokio::io::AsyncReadExt;

    /// A pipe holding `data` (spliced from a cached temporary file).
    fn pipe_of(data: &[u8]) -> Pipe {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        csv_core::lun::pipe::splice_cached(&f, 0, data.len()).expect("cached range splices")
    }

    async fn round_trip(splice: bool) {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let sock = splice.then(|| SpliceSocket::new(&a).unwrap());
        let (_, w) = tokio::io::split(a);
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_replies(w, sock, rx));
        let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 241) as u8).collect();
        let mut want = Vec::new();
        for i in 0..3u8 {
            let hdr = Bytes::from(vec![i; 16]);
            let tail = Bytes::from(vec![0xEE; 700]);
            want.extend_from_slice(&hdr);
            want.extend_from_slice(&big);
            want.extend_from_slice(&tail);
            tx.send(vec![hdr.into(), Part::Pipe(pipe_of(&big)), tail.into()])
                .await
                .unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "reply bytes out of order or changed");
    }

    #[tokio::test]
    async fn pipes_are_spliced_between_byte_parts_in_order() {
        round_trip(true).await;
    }

    #[tokio::test]
    async fn without_a_descriptor_pipes_are_copied_out_in_order() {
        round_trip(false).await;
    }
}
