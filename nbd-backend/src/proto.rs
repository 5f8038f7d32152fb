//! NBD wire format: constants, parsing and encoding, with no I/O.
//!
//! Everything here works on byte slices and `BytesMut` so it can be tested (and fuzzed) without
//! sockets. Parsers never panic on any input and never allocate more than the input's length;
//! encoders are the exact inverse of the parsers (round-trip tested). Only fixed newstyle with
//! compact (non-extended) headers is modelled: extended headers are refused during negotiation.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

/// `NBDMAGIC`, first 8 bytes of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second greeting word and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag bit this server understands; anything else means "drop the connection".
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Option numbers.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Info types (in `NBD_OPT_INFO`/`GO` requests and `NBD_REP_INFO` replies).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` state bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Strings (export names, queries) longer than this are refused, per the spec's MUST.
pub const MAX_STRING_LEN: usize = 4096;
/// Size of a compact request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// NBD error values: the only numbers that may go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// Bytes that are not a valid NBD message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message is truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("option data has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("option {option} must not carry data")]
    UnexpectedData { option: u32 },
}

fn need(buf: &[u8], n: usize) -> Result<(), ProtoError> {
    if buf.len() < n {
        return Err(ProtoError::Truncated {
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

fn take_u16(buf: &mut &[u8]) -> Result<u16, ProtoError> {
    need(buf, 2)?;
    Ok(buf.get_u16())
}

fn take_u32(buf: &mut &[u8]) -> Result<u32, ProtoError> {
    need(buf, 4)?;
    Ok(buf.get_u32())
}

/// A string of `len` bytes; checked for the spec's length limit, UTF-8 and no NUL.
fn take_string(buf: &mut &[u8], len: usize) -> Result<String, ProtoError> {
    if len > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong(len));
    }
    need(buf, len)?;
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    let s = std::str::from_utf8(s).map_err(|_| ProtoError::BadString)?;
    if s.contains('\0') {
        return Err(ProtoError::BadString);
    }
    Ok(s.to_owned())
}

fn take_string32(buf: &mut &[u8]) -> Result<String, ProtoError> {
    let len = take_u32(buf)? as usize;
    take_string(buf, len)
}

fn finish(buf: &[u8]) -> Result<(), ProtoError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(ProtoError::TrailingBytes(buf.len()))
    }
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut BytesMut, flags: u16) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(flags);
}

/// An option header: which option and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Parses the 16-byte option header.
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
    need(buf, OPTION_HEADER_LEN)?;
    let mut b = buf;
    let magic = b.get_u64();
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: b.get_u32(),
        length: b.get_u32(),
    })
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(ExportRequest),
    Go(ExportRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any option this server does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Decodes an option's data. `ABORT` ignores its data (spec: SHOULD ignore); `LIST` and
/// `STRUCTURED_REPLY` must have none.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    let mut b = data;
    let parsed = match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(take_string(&mut b, data.len())?),
        OPT_ABORT => return Ok(ClientOption::Abort),
        OPT_LIST | OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return Err(ProtoError::UnexpectedData { option });
            }
            if option == OPT_LIST {
                ClientOption::List
            } else {
                ClientOption::StructuredReply
            }
        }
        OPT_INFO | OPT_GO => {
            let name = take_string32(&mut b)?;
            let n = take_u16(&mut b)? as usize;
            need(b, n * 2)?;
            let info_requests = (0..n).map(|_| b.get_u16()).collect();
            let req = ExportRequest {
                name,
                info_requests,
            };
            if option == OPT_INFO {
                ClientOption::Info(req)
            } else {
                ClientOption::Go(req)
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let export = take_string32(&mut b)?;
            let n = take_u32(&mut b)? as usize;
            // Each query needs at least its 4-byte length: bound the allocation by the input.
            need(b, n.saturating_mul(4))?;
            let mut queries = Vec::with_capacity(n);
            for _ in 0..n {
                queries.push(take_string32(&mut b)?);
            }
            let req = MetaContextRequest { export, queries };
            if option == OPT_LIST_META_CONTEXT {
                ClientOption::ListMetaContext(req)
            } else {
                ClientOption::SetMetaContext(req)
            }
        }
        other => return Ok(ClientOption::Unsupported(other)),
    };
    finish(b)?;
    Ok(parsed)
}

/// Encodes a client option with its header (the inverse of `parse_option_header` +
/// `parse_option`); used by tests and by client code.
pub fn encode_option(out: &mut BytesMut, opt: &ClientOption) {
    let mut data = BytesMut::new();
    let code = match opt {
        ClientOption::ExportName(name) => {
            data.put_slice(name.as_bytes());
            OPT_EXPORT_NAME
        }
        ClientOption::Abort => OPT_ABORT,
        ClientOption::List => OPT_LIST,
        ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
        ClientOption::Info(r) | ClientOption::Go(r) => {
            data.put_u32(r.name.len() as u32);
            data.put_slice(r.name.as_bytes());
            data.put_u16(r.info_requests.len() as u16);
            for i in &r.info_requests {
                data.put_u16(*i);
            }
            if matches!(opt, ClientOption::Info(_)) {
                OPT_INFO
            } else {
                OPT_GO
            }
        }
        ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
            data.put_u32(r.export.len() as u32);
            data.put_slice(r.export.as_bytes());
            data.put_u32(r.queries.len() as u32);
            for q in &r.queries {
                data.put_u32(q.len() as u32);
                data.put_slice(q.as_bytes());
            }
            if matches!(opt, ClientOption::ListMetaContext(_)) {
                OPT_LIST_META_CONTEXT
            } else {
                OPT_SET_META_CONTEXT
            }
        }
        ClientOption::Unsupported(code) => *code,
    };
    out.put_u64(IHAVEOPT);
    out.put_u32(code);
    out.put_u32(data.len() as u32);
    out.put_slice(&data);
}

/// One option reply: header plus data.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// `NBD_REP_SERVER` payload: u32 name length + name.
pub fn server_reply_data(name: &str) -> BytesMut {
    let mut d = BytesMut::with_capacity(4 + name.len());
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export_data(size: u64, flags: u16) -> BytesMut {
    let mut d = BytesMut::with_capacity(12);
    d.put_u16(INFO_EXPORT);
    d.put_u64(size);
    d.put_u16(flags);
    d
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size_data(min: u32, preferred: u32, max: u32) -> BytesMut {
    let mut d = BytesMut::with_capacity(14);
    d.put_u16(INFO_BLOCK_SIZE);
    d.put_u32(min);
    d.put_u32(preferred);
    d.put_u32(max);
    d
}

/// `NBD_REP_INFO` payload for `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION`.
pub fn info_string_data(info: u16, s: &str) -> BytesMut {
    let mut d = BytesMut::with_capacity(2 + s.len());
    d.put_u16(info);
    d.put_slice(s.as_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn meta_context_data(id: u32, name: &str) -> BytesMut {
    let mut d = BytesMut::with_capacity(4 + name.len());
    d.put_u32(id);
    d.put_slice(name.as_bytes());
    d
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless `no_zeroes`.
pub fn encode_export_name_reply(out: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
}

/// Transmission command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(t: u16) -> Self {
        match t {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(t) => t,
        }
    }

    /// Command flags that are meaningful for this command. FUA is accepted everywhere because
    /// clients are known to set it on FLUSH and others (spec note).
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }

    /// Whether the request carries `length` bytes of payload after its header.
    pub fn has_payload(self) -> bool {
        self == Command::Write
    }
}

/// A transmission request header (the payload of a WRITE follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a 28-byte compact request header. A bad magic is a protocol violation: the caller
/// must drop the connection, because the stream can no longer be framed.
pub fn parse_request(buf: &[u8]) -> Result<Request, ProtoError> {
    need(buf, REQUEST_LEN)?;
    let mut b = buf;
    let magic = b.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: REQUEST_MAGIC as u64,
            found: magic as u64,
        });
    }
    Ok(Request {
        flags: b.get_u16(),
        command: Command::from_wire(b.get_u16()),
        cookie: b.get_u64(),
        offset: b.get_u64(),
        length: b.get_u32(),
    })
}

/// Encodes a request header (the inverse of [`parse_request`]).
pub fn encode_request(out: &mut BytesMut, r: &Request) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(r.flags);
    out.put_u16(r.command.to_wire());
    out.put_u64(r.cookie);
    out.put_u64(r.offset);
    out.put_u32(r.length);
}

/// A simple reply header (READ data, if any, follows it).
pub fn encode_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk header; `length` is the chunk payload length.
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, ty: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(ty);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Header of an `OFFSET_DATA` chunk carrying `data_len` bytes (which the caller sends next).
pub fn encode_offset_data_header(
    out: &mut BytesMut,
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    encode_chunk_header(
        out,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    out.put_u64(offset);
}

/// A complete `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(out: &mut BytesMut, flags: u16, cookie: u64, offset: u64, len: u32) {
    encode_chunk_header(out, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// A complete `BLOCK_STATUS` chunk for one context.
pub fn encode_block_status(
    out: &mut BytesMut,
    flags: u16,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len() as u32;
    encode_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put_u32(context_id);
    for (l, f) in extents {
        out.put_u32(*l);
        out.put_u32(*f);
    }
}

/// A complete `ERROR` chunk (always the final chunk here). The message is cut to keep the chunk
/// far below qemu's 1000-byte limit for non-data chunks.
pub fn encode_error_chunk(out: &mut BytesMut, cookie: u64, error: Errno, msg: &str) {
    let mut end = msg.len().min(200);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg[..end];
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.put_u32(error as u32);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// A `NONE` chunk that ends a structured reply without content.
pub fn encode_none_chunk(out: &mut BytesMut, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_string() -> impl Strategy<Value = String> + Clone {
        "[a-zA-Z0-9:/._ -]{0,40}"
    }

    fn arb_option() -> impl Strategy<Value = ClientOption> {
        let req = (arb_string(), proptest::collection::vec(any::<u16>(), 0..6)).prop_map(
            |(name, info_requests)| ExportRequest {
                name,
                info_requests,
            },
        );
        let meta = (arb_string(), proptest::collection::vec(arb_string(), 0..4))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries });
        prop_oneof![
            arb_string().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StructuredReply),
            req.clone().prop_map(ClientOption::Info),
            req.prop_map(ClientOption::Go),
            meta.clone().prop_map(ClientOption::ListMetaContext),
            meta.prop_map(ClientOption::SetMetaContext),
            (12u32..5000).prop_map(ClientOption::Unsupported),
        ]
    }

    proptest! {
        #[test]
        fn request_parser_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn option_parsers_never_panic_on_random_bytes(option in 0u32..16, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_option_header(&bytes);
            let _ = parse_option(option, &bytes);
        }

        #[test]
        fn request_round_trips(flags in any::<u16>(), ty in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u32>()) {
            let r = Request { flags, command: Command::from_wire(ty), cookie, offset, length };
            let mut buf = BytesMut::new();
            encode_request(&mut buf, &r);
            prop_assert_eq!(buf.len(), REQUEST_LEN);
            prop_assert_eq!(parse_request(&buf), Ok(r));
        }

        #[test]
        fn option_round_trips(opt in arb_option()) {
            let mut buf = BytesMut::new();
            encode_option(&mut buf, &opt);
            let hdr = parse_option_header(&buf).unwrap();
            prop_assert_eq!(hdr.length as usize, buf.len() - OPTION_HEADER_LEN);
            let parsed = parse_option(hdr.option, &buf[OPTION_HEADER_LEN..]);
            prop_assert_eq!(parsed, Ok(opt));
        }
    }

    #[test]
    fn bad_request_magic_is_rejected() {
        let mut buf = BytesMut::new();
        encode_request(
            &mut buf,
            &Request {
                flags: 0,
                command: Command::Read,
                cookie: 1,
                offset: 0,
                length: 512,
            },
        );
        buf[0] ^= 0xff;
        assert!(matches!(
            parse_request(&buf),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_with_lying_info_count_is_truncated_not_panicking() {
        let mut d = BytesMut::new();
        d.put_u32(1);
        d.put_slice(b"a");
        d.put_u16(1000);
        assert!(matches!(
            parse_option(OPT_GO, &d),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn meta_context_query_count_is_bounded_by_input() {
        let mut d = BytesMut::new();
        d.put_u32(0);
        d.put_u32(u32::MAX);
        assert!(matches!(
            parse_option(OPT_SET_META_CONTEXT, &d),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn list_with_data_is_invalid() {
        assert_eq!(
            parse_option(OPT_LIST, b"x"),
            Err(ProtoError::UnexpectedData { option: OPT_LIST })
        );
    }

    #[test]
    fn export_name_with_nul_is_rejected() {
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"a\0b"),
            Err(ProtoError::BadString)
        );
    }

    #[test]
    fn error_chunk_message_is_capped() {
        let mut buf = BytesMut::new();
        encode_error_chunk(&mut buf, 7, Errno::Io, &"é".repeat(500));
        assert!(buf.len() < 300);
    }
}
