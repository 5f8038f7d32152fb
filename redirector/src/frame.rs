//! Wire frames of the LAN redirect protocol (node -> peer block I/O), pure encode/decode.
//!
//! A redirected request carries everything the peer needs to check it before touching the LUN:
//! the writer's fencing token and node id, the byte range, and a crc32c of the write payload.
//! The peer answers with the request id, a [`Status`], and for reads the data and its crc32c.
//! One op is not I/O: `Settle` asks the peer to finish and fence off the sender's earlier requests
//! (see [`RequestBody::Settle`] and `docs/fencing.md`).
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! request header, REQUEST_HEADER_LEN = 56 bytes
//!   0  u32 magic "CSVR"      4  u8 version (1)   5  u8 op (1 read, 2 write, 3 flush,
//!                                                    4 write zeroes, 5 discard, 6 settle)
//!                                                  6  u16 flags (bit 0 = FUA)
//!   8  u64 request id       16  u64 offset      24  u64 length
//!  32  u64 fencing token    40  u64 node id
//!  48  u32 crc32c of the payload (writes; 0 otherwise)
//!  52  u32 crc32c of header bytes 0..52
//! followed by `length` payload bytes for a write, nothing otherwise
//!
//! response header, RESPONSE_HEADER_LEN = 28 bytes
//!   0  u32 magic "CSVS"      4  u8 version (1)   5  u8 status   6  u16 reserved (0)
//!   8  u64 request id       16  u32 payload length
//!  20  u32 crc32c of the payload (0 when empty)
//!  24  u32 crc32c of header bytes 0..24
//! followed by the payload (only with status Ok: read data, or a settle's sessions as
//! big-endian u64s)
//! ```
//!
//! Invariants:
//! - a decoded frame is fully validated: known op/status, flags valid for the op, lengths within
//!   [`MAX_PAYLOAD`] where data travels, `offset + length` does not overflow, reserved fields zero,
//!   header and payload checksums verified;
//! - decoding never panics and never allocates more than the frame announces (which is capped);
//! - `decode` leaves the buffer untouched when the frame is incomplete (`Ok(None)`) or its header is
//!   bad (the stream is then out of sync: close the connection). A payload crc mismatch consumes the
//!   frame and returns [`FrameError::PayloadCrc`] carrying the request id, so the receiver can answer
//!   [`Status::CrcMismatch`] and keep the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use csv_core::meta::{FencingToken, NodeId};

/// Magic number opening every request ("CSVR").
pub const REQUEST_MAGIC: u32 = 0x4353_5652;
/// Magic number opening every response ("CSVS").
pub const RESPONSE_MAGIC: u32 = 0x4353_5653;
/// The only protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes in a request header.
pub const REQUEST_HEADER_LEN: usize = 56;
/// Bytes in a response header.
pub const RESPONSE_HEADER_LEN: usize = 28;
/// Largest read or write payload in one frame (32 MiB).
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Request flag: the write must be durable before the reply (forced unit access).
pub const FLAG_FUA: u16 = 1;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion { found: u8 },
    #[error(
        "frame header checksum mismatch: header says {expected:#010x}, computed {actual:#010x}"
    )]
    HeaderCrc { expected: u32, actual: u32 },
    #[error("unknown op code {0}")]
    UnknownOp(u8),
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
    #[error("flags {flags:#06x} are not valid for {op:?}")]
    BadFlags { op: OpCode, flags: u16 },
    #[error("length {len} is not valid for {op:?} (data ops carry 1..={MAX_PAYLOAD} bytes)")]
    BadLength { op: OpCode, len: u64 },
    #[error("range offset {offset} + length {len} overflows")]
    RangeOverflow { offset: u64, len: u64 },
    #[error("a reserved or unused header field is not zero")]
    NonZeroField,
    #[error("response payload of {len} bytes is not allowed with status {status:?}")]
    UnexpectedPayload { status: Status, len: usize },
    #[error(
        "payload checksum mismatch in request {request_id}: header says {expected:#010x}, computed {actual:#010x}"
    )]
    PayloadCrc {
        request_id: u64,
        expected: u32,
        actual: u32,
    },
}

/// The operation of a request, as coded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Read = 1,
    Write = 2,
    Flush = 3,
    WriteZeroes = 4,
    Discard = 5,
    Settle = 6,
}

impl OpCode {
    fn from_wire(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            1 => OpCode::Read,
            2 => OpCode::Write,
            3 => OpCode::Flush,
            4 => OpCode::WriteZeroes,
            5 => OpCode::Discard,
            6 => OpCode::Settle,
            other => return Err(FrameError::UnknownOp(other)),
        })
    }
}

/// What a request asks the peer to do, with the op-specific fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// Read `len` bytes (1..=[`MAX_PAYLOAD`]).
    Read { len: u32 },
    /// Write `data` (1..=[`MAX_PAYLOAD`] bytes); with `fua` it is durable before the reply.
    Write { data: Bytes, fua: bool },
    /// Make every write acknowledged so far durable. Offset must be 0.
    Flush,
    /// Make `len` (>= 1) bytes read back as zeros.
    WriteZeroes { len: u64, fua: bool },
    /// Advisory: `len` (>= 1) bytes may be dropped.
    Discard { len: u64 },
    /// Answer once every earlier request of this sender (ids of the same epoch below this one's)
    /// has resolved on the peer's path, and refuse any of them that arrives later. Offset and
    /// length are 0. The answer's payload lists the peer's sessions (big-endian u64 each).
    Settle,
}

impl RequestBody {
    pub fn op(&self) -> OpCode {
        match self {
            RequestBody::Read { .. } => OpCode::Read,
            RequestBody::Write { .. } => OpCode::Write,
            RequestBody::Flush => OpCode::Flush,
            RequestBody::WriteZeroes { .. } => OpCode::WriteZeroes,
            RequestBody::Discard { .. } => OpCode::Discard,
            RequestBody::Settle => OpCode::Settle,
        }
    }

    /// The length field as it goes on the wire.
    fn wire_len(&self) -> u64 {
        match self {
            RequestBody::Read { len } => u64::from(*len),
            RequestBody::Write { data, .. } => data.len() as u64,
            RequestBody::Flush | RequestBody::Settle => 0,
            RequestBody::WriteZeroes { len, .. } | RequestBody::Discard { len } => *len,
        }
    }

    fn flags(&self) -> u16 {
        match self {
            RequestBody::Write { fua: true, .. } | RequestBody::WriteZeroes { fua: true, .. } => {
                FLAG_FUA
            }
            _ => 0,
        }
    }
}

/// One redirected I/O request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the sender, unique among its requests in flight on the connection.
    pub id: u64,
    /// Byte offset on the LUN.
    pub offset: u64,
    /// The writer's fencing token; the peer refuses a stale one ([`Status::StaleToken`]).
    pub token: FencingToken,
    /// The node that issued the I/O.
    pub node: NodeId,
    pub body: RequestBody,
}

/// Checks the (op, flags, offset, length) combination; shared by encode and decode.
fn validate_request(op: OpCode, flags: u16, offset: u64, len: u64) -> Result<(), FrameError> {
    let fua_ok = matches!(op, OpCode::Write | OpCode::WriteZeroes);
    if flags & !FLAG_FUA != 0 || (flags & FLAG_FUA != 0 && !fua_ok) {
        return Err(FrameError::BadFlags { op, flags });
    }
    let len_ok = match op {
        OpCode::Read | OpCode::Write => (1..=MAX_PAYLOAD as u64).contains(&len),
        OpCode::Flush | OpCode::Settle => len == 0,
        OpCode::WriteZeroes | OpCode::Discard => len >= 1,
    };
    if !len_ok {
        return Err(FrameError::BadLength { op, len });
    }
    if matches!(op, OpCode::Flush | OpCode::Settle) && offset != 0 {
        return Err(FrameError::NonZeroField);
    }
    if offset.checked_add(len).is_none() {
        return Err(FrameError::RangeOverflow { offset, len });
    }
    Ok(())
}

fn check_header_crc(header: &[u8]) -> Result<(), FrameError> {
    let n = header.len() - 4;
    let expected = u32::from_be_bytes([header[n], header[n + 1], header[n + 2], header[n + 3]]);
    let actual = crc32c::crc32c(&header[..n]);
    if expected != actual {
        return Err(FrameError::HeaderCrc { expected, actual });
    }
    Ok(())
}

/// Reads magic and version from the start of a header; both are checked before the header crc so
/// that a peer speaking another protocol gets the clearer error.
fn check_magic_version(header: &[u8], magic: u32) -> Result<(), FrameError> {
    let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if found != magic {
        return Err(FrameError::BadMagic { found });
    }
    if header[4] != VERSION {
        return Err(FrameError::UnsupportedVersion { found: header[4] });
    }
    Ok(())
}

impl Request {
    /// Bytes this request takes on the wire.
    pub fn encoded_len(&self) -> usize {
        REQUEST_HEADER_LEN
            + match &self.body {
                RequestBody::Write { data, .. } => data.len(),
                _ => 0,
            }
    }

    /// Appends the frame to `dst`. Fails (writing nothing) if the request is not valid on the wire.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let op = self.body.op();
        let len = self.body.wire_len();
        let flags = self.body.flags();
        validate_request(op, flags, self.offset, len)?;
        let payload_crc = match &self.body {
            RequestBody::Write { data, .. } => crc32c::crc32c(data),
            _ => 0,
        };
        dst.reserve(self.encoded_len());
        let start = dst.len();
        dst.put_u32(REQUEST_MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(op as u8);
        dst.put_u16(flags);
        dst.put_u64(self.id);
        dst.put_u64(self.offset);
        dst.put_u64(len);
        dst.put_u64(self.token);
        dst.put_u64(self.node);
        dst.put_u32(payload_crc);
        let header_crc = crc32c::crc32c(&dst[start..]);
        dst.put_u32(header_crc);
        if let RequestBody::Write { data, .. } = &self.body {
            dst.put_slice(data);
        }
        Ok(())
    }

    /// Decodes one request from the front of `src` (see the module docs for what is consumed).
    pub fn decode(src: &mut BytesMut) -> Result<Option<Request>, FrameError> {
        if src.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let header = &src[..REQUEST_HEADER_LEN];
        check_magic_version(header, REQUEST_MAGIC)?;
        check_header_crc(header)?;
        let mut h = &header[5..];
        let op = OpCode::from_wire(h.get_u8())?;
        let flags = h.get_u16();
        let id = h.get_u64();
        let offset = h.get_u64();
        let len = h.get_u64();
        let token = h.get_u64();
        let node = h.get_u64();
        let payload_crc = h.get_u32();
        validate_request(op, flags, offset, len)?;
        if op != OpCode::Write && payload_crc != 0 {
            return Err(FrameError::NonZeroField);
        }
        let fua = flags & FLAG_FUA != 0;
        let body = match op {
            // `validate_request` capped data lengths at MAX_PAYLOAD, so these casts are exact.
            OpCode::Read => RequestBody::Read { len: len as u32 },
            OpCode::Write => {
                let total = REQUEST_HEADER_LEN + len as usize;
                if src.len() < total {
                    src.reserve(total - src.len());
                    return Ok(None);
                }
                let mut frame = src.split_to(total);
                let data = frame.split_off(REQUEST_HEADER_LEN).freeze();
                let actual = crc32c::crc32c(&data);
                if actual != payload_crc {
                    return Err(FrameError::PayloadCrc {
                        request_id: id,
                        expected: payload_crc,
                        actual,
                    });
                }
                return Ok(Some(Request {
                    id,
                    offset,
                    token,
                    node,
                    body: RequestBody::Write { data, fua },
                }));
            }
            OpCode::Flush => RequestBody::Flush,
            OpCode::WriteZeroes => RequestBody::WriteZeroes { len, fua },
            OpCode::Discard => RequestBody::Discard { len },
            OpCode::Settle => RequestBody::Settle,
        };
        src.advance(REQUEST_HEADER_LEN);
        Ok(Some(Request {
            id,
            offset,
            token,
            node,
            body,
        }))
    }
}

/// The peer's verdict on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done; a read's data follows.
    Ok = 0,
    /// The fencing token is older than the current grant: the sender is fenced.
    StaleToken = 1,
    /// The range lies outside the LUN.
    OutOfRange = 2,
    /// The peer's own path to the LUN failed; try another peer.
    PathError = 3,
    /// The request payload did not match its crc32c; resend.
    CrcMismatch = 4,
    /// The peer refuses more redirected I/O right now; retry later or elsewhere.
    Busy = 5,
}

impl Status {
    fn from_wire(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::StaleToken,
            2 => Status::OutOfRange,
            3 => Status::PathError,
            4 => Status::CrcMismatch,
            5 => Status::Busy,
            other => return Err(FrameError::UnknownStatus(other)),
        })
    }
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The id of the request answered.
    pub id: u64,
    pub status: Status,
    /// Read data (only with [`Status::Ok`]; empty otherwise, at most [`MAX_PAYLOAD`]).
    pub payload: Bytes,
}

impl Response {
    /// Bytes this response takes on the wire.
    pub fn encoded_len(&self) -> usize {
        RESPONSE_HEADER_LEN + self.payload.len()
    }

    /// Appends the frame to `dst`. Fails (writing nothing) if the payload is too large or not
    /// allowed with the status.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = self.payload.len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::BadLength {
                op: OpCode::Read,
                len: len as u64,
            });
        }
        if len > 0 && self.status != Status::Ok {
            return Err(FrameError::UnexpectedPayload {
                status: self.status,
                len,
            });
        }
        let payload_crc = if len == 0 {
            0
        } else {
            crc32c::crc32c(&self.payload)
        };
        dst.reserve(self.encoded_len());
        let start = dst.len();
        dst.put_u32(RESPONSE_MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.status as u8);
        dst.put_u16(0);
        dst.put_u64(self.id);
        dst.put_u32(len as u32);
        dst.put_u32(payload_crc);
        let header_crc = crc32c::crc32c(&dst[start..]);
        dst.put_u32(header_crc);
        dst.put_slice(&self.payload);
        Ok(())
    }

    /// Decodes one response from the front of `src` (see the module docs for what is consumed).
    pub fn decode(src: &mut BytesMut) -> Result<Option<Response>, FrameError> {
        if src.len() < RESPONSE_HEADER_LEN {
            return Ok(None);
        }
        let header = &src[..RESPONSE_HEADER_LEN];
        check_magic_version(header, RESPONSE_MAGIC)?;
        check_header_crc(header)?;
        let mut h = &header[5..];
        let status = Status::from_wire(h.get_u8())?;
        let reserved = h.get_u16();
        let id = h.get_u64();
        let len = h.get_u32() as usize;
        let payload_crc = h.get_u32();
        if reserved != 0 || (len == 0 && payload_crc != 0) {
            return Err(FrameError::NonZeroField);
        }
        if len > MAX_PAYLOAD {
            return Err(FrameError::BadLength {
                op: OpCode::Read,
                len: len as u64,
            });
        }
        if len > 0 && status != Status::Ok {
            return Err(FrameError::UnexpectedPayload { status, len });
        }
        let total = RESPONSE_HEADER_LEN + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        let payload = frame.split_off(RESPONSE_HEADER_LEN).freeze();
        if len > 0 {
            let actual = crc32c::crc32c(&payload);
            if actual != payload_crc {
                return Err(FrameError::PayloadCrc {
                    request_id: id,
                    expected: payload_crc,
                    actual,
                });
            }
        }
        Ok(Some(Response {
            id,
            status,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_req(data: &[u8]) -> Request {
        Request {
            id: 7,
            offset: 4096,
            token: 42,
            node: 3,
            body: RequestBody::Write {
                data: Bytes::copy_from_slice(data),
                fua: true,
            },
        }
    }

    fn encode_req(r: &Request) -> BytesMut {
        let mut b = BytesMut::new();
        r.encode(&mut b).unwrap();
        b
    }

    /// Rewrites the header crc after a test edited header bytes, so field checks are reached.
    fn reseal(buf: &mut BytesMut, header_len: usize) {
        let crc = crc32c::crc32c(&buf[..header_len - 4]);
        buf[header_len - 4..header_len].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn write_request_layout_matches_the_documented_offsets() {
        let b = encode_req(&write_req(b"hello"));
        assert_eq!(b.len(), REQUEST_HEADER_LEN + 5);
        assert_eq!(&b[0..4], b"CSVR");
        assert_eq!(b[4], VERSION);
        assert_eq!(b[5], OpCode::Write as u8);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), FLAG_FUA);
        assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), 7);
        assert_eq!(u64::from_be_bytes(b[16..24].try_into().unwrap()), 4096);
        assert_eq!(u64::from_be_bytes(b[24..32].try_into().unwrap()), 5);
        assert_eq!(u64::from_be_bytes(b[32..40].try_into().unwrap()), 42);
        assert_eq!(u64::from_be_bytes(b[40..48].try_into().unwrap()), 3);
        assert_eq!(
            u32::from_be_bytes(b[48..52].try_into().unwrap()),
            crc32c::crc32c(b"hello")
        );
        assert_eq!(&b[56..], b"hello");
    }

    #[test]
    fn incomplete_frames_return_none_and_consume_nothing() {
        let full = encode_req(&write_req(b"0123456789"));
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(Request::decode(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
        let mut whole = full.clone();
        assert_eq!(
            Request::decode(&mut whole).unwrap(),
            Some(write_req(b"0123456789"))
        );
        assert!(whole.is_empty());
    }

    #[test]
    fn bad_magic_and_version_are_rejected() {
        let mut b = encode_req(&write_req(b"x"));
        b[0] = b'X';
        assert!(matches!(
            Request::decode(&mut b),
            Err(FrameError::BadMagic { .. })
        ));
        let mut b = encode_req(&write_req(b"x"));
        b[4] = 2;
        assert_eq!(
            Request::decode(&mut b),
            Err(FrameError::UnsupportedVersion { found: 2 })
        );
        // A request is not a response and vice versa.
        let mut b = encode_req(&write_req(b"x"));
        assert!(matches!(
            Response::decode(&mut b),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn oversized_and_zero_lengths_are_rejected_on_decode_and_encode() {
        let mut r = Request {
            id: 1,
            offset: 0,
            token: 1,
            node: 1,
            body: RequestBody::Read { len: 0 },
        };
        assert!(matches!(
            r.encode(&mut BytesMut::new()),
            Err(FrameError::BadLength { .. })
        ));
        r.body = RequestBody::Read {
            len: MAX_PAYLOAD as u32 + 1,
        };
        assert!(matches!(
            r.encode(&mut BytesMut::new()),
            Err(FrameError::BadLength { .. })
        ));
        r.body = RequestBody::Read {
            len: MAX_PAYLOAD as u32,
        };
        let mut b = encode_req(&r);
        // Announce a 64 MiB write: rejected from the header alone, nothing buffered or consumed.
        b[5] = OpCode::Write as u8;
        b[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        reseal(&mut b, REQUEST_HEADER_LEN);
        assert!(matches!(
            Request::decode(&mut b),
            Err(FrameError::BadLength { len, .. }) if len == 64 << 20
        ));
        assert_eq!(b.len(), REQUEST_HEADER_LEN);
    }

    #[test]
    fn field_checks_reject_bad_flags_ranges_and_reserved_fields() {
        let base = Request {
            id: 1,
            offset: 0,
            token: 1,
            node: 1,
            body: RequestBody::Flush,
        };
        let b = encode_req(&base);
        let edit = |at: usize, bytes: &[u8]| {
            let mut c = b.clone();
            c[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut c, REQUEST_HEADER_LEN);
            Request::decode(&mut c)
        };
        assert!(matches!(
            edit(6, &FLAG_FUA.to_be_bytes()),
            Err(FrameError::BadFlags { .. })
        ));
        assert!(matches!(
            edit(6, &2u16.to_be_bytes()),
            Err(FrameError::BadFlags { .. })
        ));
        assert_eq!(edit(16, &1u64.to_be_bytes()), Err(FrameError::NonZeroField));
        assert_eq!(edit(48, &1u32.to_be_bytes()), Err(FrameError::NonZeroField));
        assert_eq!(edit(5, &[9]), Err(FrameError::UnknownOp(9)));
        let discard = Request {
            body: RequestBody::Discard { len: 2 },
            offset: u64::MAX - 1,
            ..base.clone()
        };
        assert!(matches!(
            discard.encode(&mut BytesMut::new()),
            Err(FrameError::RangeOverflow { .. })
        ));
    }

    #[test]
    fn header_corruption_is_a_header_crc_error() {
        let b = encode_req(&write_req(b"abc"));
        for i in 5..REQUEST_HEADER_LEN {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(
                matches!(Request::decode(&mut c), Err(FrameError::HeaderCrc { .. })),
                "byte {i}"
            );
        }
    }

    #[test]
    fn responses_round_trip_and_reject_payload_on_errors() {
        let ok = Response {
            id: 9,
            status: Status::Ok,
            payload: Bytes::from_static(b"data"),
        };
        let mut b = BytesMut::new();
        ok.encode(&mut b).unwrap();
        assert_eq!(b.len(), RESPONSE_HEADER_LEN + 4);
        assert_eq!(Response::decode(&mut b).unwrap(), Some(ok));
        let bad = Response {
            id: 9,
            status: Status::Busy,
            payload: Bytes::from_static(b"data"),
        };
        assert!(matches!(
            bad.encode(&mut BytesMut::new()),
            Err(FrameError::UnexpectedPayload { .. })
        ));
        let mut b = BytesMut::new();
        Response {
            id: 9,
            status: Status::StaleToken,
            payload: Bytes::new(),
        }
        .encode(&mut b)
        .unwrap();
        b[5] = 77;
        reseal(&mut b, RESPONSE_HEADER_LEN);
        assert_eq!(Response::decode(&mut b), Err(FrameError::UnknownStatus(77)));
    }

    #[test]
    fn payload_crc_error_consumes_the_frame_and_the_next_frame_decodes() {
        let mut b = encode_req(&write_req(b"payload"));
        let last = b.len() - 1;
        b[last] ^= 1;
        let next = Request {
            id: 8,
            offset: 0,
            token: 42,
            node: 3,
            body: RequestBody::Flush,
        };
        next.encode(&mut b).unwrap();
        assert!(matches!(
            Request::decode(&mut b),
            Err(FrameError::PayloadCrc { request_id: 7, .. })
        ));
        assert_eq!(Request::decode(&mut b).unwrap(), Some(next));
        assert!(b.is_empty());
    }

    fn arb_body() -> impl Strategy<Value = RequestBody> {
        prop_oneof![
            (1u32..=MAX_PAYLOAD as u32).prop_map(|len| RequestBody::Read { len }),
            (
                proptest::collection::vec(any::<u8>(), 1..300),
                any::<bool>()
            )
                .prop_map(|(d, fua)| RequestBody::Write {
                    data: Bytes::from(d),
                    fua
                }),
            Just(RequestBody::Flush),
            Just(RequestBody::Settle),
            (1u64..1 << 40, any::<bool>())
                .prop_map(|(len, fua)| RequestBody::WriteZeroes { len, fua }),
            (1u64..1 << 40).prop_map(|len| RequestBody::Discard { len }),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            any::<u64>(),
            0u64..1 << 50,
            any::<u64>(),
            any::<u64>(),
            arb_body(),
        )
            .prop_map(|(id, offset, token, node, body)| Request {
                id,
                offset: if matches!(body, RequestBody::Flush | RequestBody::Settle) {
                    0
                } else {
                    offset
                },
                token,
                node,
                body,
            })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        (
            any::<u64>(),
            0u8..6,
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(id, s, p)| {
                let status = Status::from_wire(s).unwrap();
                let payload = if status == Status::Ok {
                    Bytes::from(p)
                } else {
                    Bytes::new()
                };
                Response {
                    id,
                    status,
                    payload,
                }
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&data[..]);
            let _ = Request::decode(&mut b);
            let mut b = BytesMut::from(&data[..]);
            let _ = Response::decode(&mut b);
        }

        #[test]
        fn random_bytes_behind_a_valid_magic_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            reseal_header in any::<bool>(),
        ) {
            // Deeper coverage: valid magic+version and (optionally) a valid header crc, so the
            // field validation runs on random field values.
            for (magic, hl) in [(REQUEST_MAGIC, REQUEST_HEADER_LEN), (RESPONSE_MAGIC, RESPONSE_HEADER_LEN)] {
                let mut b = BytesMut::new();
                b.put_u32(magic);
                b.put_u8(VERSION);
                b.put_slice(&data);
                if reseal_header && b.len() >= hl {
                    reseal(&mut b, hl);
                }
                let mut r = b.clone();
                let _ = Request::decode(&mut r);
                let mut r = b;
                let _ = Response::decode(&mut r);
            }
        }

        #[test]
        fn requests_round_trip_even_when_fed_in_chunks(
            reqs in proptest::collection::vec(arb_request(), 1..5),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for r in &reqs {
                r.encode(&mut wire).unwrap();
            }
            let total: usize = reqs.iter().map(Request::encoded_len).sum();
            prop_assert_eq!(wire.len(), total);
            let mut inbuf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                inbuf.extend_from_slice(piece);
                while let Some(r) = Request::decode(&mut inbuf).unwrap() {
                    out.push(r);
                }
            }
            prop_assert!(inbuf.is_empty());
            prop_assert_eq!(out, reqs);
        }

        #[test]
        fn responses_round_trip(resp in arb_response()) {
            let mut wire = BytesMut::new();
            resp.encode(&mut wire).unwrap();
            prop_assert_eq!(wire.len(), resp.encoded_len());
            prop_assert_eq!(Response::decode(&mut wire).unwrap(), Some(resp));
            prop_assert!(wire.is_empty());
        }

        #[test]
        fn any_flipped_write_payload_byte_is_a_payload_crc_error(
            data in proptest::collection::vec(any::<u8>(), 1..300),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut b = encode_req(&write_req(&data));
            let i = REQUEST_HEADER_LEN + pos.index(data.len());
            b[i] ^= 1 << bit;
            prop_assert!(
                matches!(Request::decode(&mut b), Err(FrameError::PayloadCrc { request_id: 7, .. })),
                "flipped payload byte must be a payload crc error"
            );
            prop_assert!(b.is_empty());
        }

        #[test]
        fn any_flipped_read_payload_byte_is_a_payload_crc_error(
            data in proptest::collection::vec(any::<u8>(), 1..300),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut b = BytesMut::new();
            Response { id: 5, status: Status::Ok, payload: Bytes::from(data.clone()) }
                .encode(&mut b)
                .unwrap();
            let i = RESPONSE_HEADER_LEN + pos.index(data.len());
            b[i] ^= 1 << bit;
            prop_assert!(matches!(
                Response::decode(&mut b),
                Err(FrameError::PayloadCrc { request_id: 5, .. })
            ), "flipped read byte must be a payload crc error");
        }

        #[test]
        fn any_flipped_header_bit_is_rejected(
            req in arb_request(),
            pos in 0usize..REQUEST_HEADER_LEN,
            bit in 0u8..8,
        ) {
            let mut b = encode_req(&req);
            b[pos] ^= 1 << bit;
            prop_assert!(Request::decode(&mut b).is_err());
        }
    }
}
