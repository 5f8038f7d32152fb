"""Malformed NBD traffic against a csvd export; the server must refuse it cleanly and keep
serving. Run with /usr/bin/python3.

argv: HOST PORT SCRATCH KEEP SEED ROUNDS
  SCRATCH  an export the fuzzer may write (random valid-looking WRITEs can land there)
  KEEP     an export it never names; its content must be unchanged at the end
Covers: unknown options, STARTTLS and EXTENDED_HEADERS (NBD_REP_ERR_UNSUP), an unknown export,
bad request magic (connection closed, nothing written), and ROUNDS seeded rounds of random
headers, flags, commands, lengths and truncated payloads on fresh connections. libnbd then
checks both exports still work and KEEP is intact. Prints OK.
"""
import hashlib
import random
import socket
import struct
import sys

import nbd

HOST, PORT, SCRATCH, KEEP = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
SEED, ROUNDS = int(sys.argv[5]), int(sys.argv[6])
print(f"seed={SEED}", file=sys.stderr)
rng = random.Random(SEED)

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
OPT_GO, OPT_STARTTLS, OPT_STRUCTURED, OPT_EXTENDED = 7, 5, 8, 11
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_UNKNOWN = 1, 3, 2**31 + 1, 2**31 + 6


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def greet():
    s = socket.create_connection((HOST, PORT), timeout=10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == 0x4E42444D41474943 and opt == IHAVEOPT, (magic, opt)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def option(s, code, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)


def reply(s):
    magic, opt, typ, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, typ, recv_exact(s, length)


def go(s, name):
    n = name.encode()
    option(s, OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
    while True:
        _, typ, _ = reply(s)
        if typ == REP_ACK:
            return
        assert typ == REP_INFO, typ


def closed_or_answers(s):
    """Reads until the server closes or goes quiet; returns bytes read."""
    got = b""
    s.settimeout(2)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return got


def digest(uri, size):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = hashlib.sha256()
    for off in range(0, size, 1 << 20):
        out.update(h.pread(min(1 << 20, size - off), off))
    h.shutdown()
    return out.hexdigest()


keep_uri = f"nbd://{HOST}:{PORT}/{KEEP}"
h = nbd.NBD()
h.connect_uri(keep_uri)
keep_size = h.get_size()
h.shutdown()
keep_before = digest(keep_uri, keep_size)

# Unknown options, STARTTLS and EXTENDED_HEADERS are refused with ERR_UNSUP; the session goes on.
s = greet()
for code, data in ((0x1234, b"junk"), (OPT_STARTTLS, b""), (OPT_EXTENDED, b""), (999, b"")):
    option(s, code, data)
    opt, typ, _ = reply(s)
    assert (opt, typ) == (code, REP_ERR_UNSUP), (code, opt, typ)
# An unknown export is refused (ERR_UNKNOWN), then a real one works.
n = b"no/such/file"
option(s, OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
_, typ, _ = reply(s)
assert typ == REP_ERR_UNKNOWN, typ
go(s, SCRATCH)
# Bad magic on a WRITE header: the server must drop the connection without writing.
s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 1, 7, 0, 512) + b"\xee" * 512)
assert closed_or_answers(s) == b"", "the server answered a request with bad magic"
h = nbd.NBD()
h.connect_uri(f"nbd://{HOST}:{PORT}/{SCRATCH}")
assert h.pread(512, 0) != b"\xee" * 512, "a request with bad magic was executed"
scratch_size = h.get_size()
h.shutdown()

# Seeded random rounds.
for r in range(ROUNDS):
    s = greet()
    if rng.random() < 0.3:
        option(s, OPT_STRUCTURED)
        reply(s)
    go(s, SCRATCH)
    frames = []
    for _ in range(rng.randrange(1, 6)):
        magic = REQ_MAGIC if rng.random() < 0.85 else rng.getrandbits(32)
        cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, rng.getrandbits(16)])
        flags = rng.choice([0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)])
        offset = rng.choice([0, 4096, scratch_size - 512, scratch_size, 2**64 - 1, rng.getrandbits(64)])
        length = rng.choice([0, 1, 512, 65536, 2**31, 2**32 - 1, rng.getrandbits(32)])
        frame = struct.pack(">IHHQQI", magic, flags, cmd, rng.getrandbits(64), offset, length)
        if cmd == 1:  # a (possibly truncated) payload
            frame += bytes(rng.getrandbits(8) for _ in range(min(length, rng.randrange(0, 2048))))
        frames.append(frame)
    if rng.random() < 0.2:
        frames.append(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))))
    try:
        s.sendall(b"".join(frames))
        # EOF after the frames: the server must also cope with a client vanishing mid-request.
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    closed_or_answers(s)

# The server still serves both exports, and KEEP is untouched.
h = nbd.NBD()
h.connect_uri(f"nbd://{HOST}:{PORT}/{SCRATCH}")
h.pwrite(b"\x5a" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"\x5a" * 4096
h.shutdown()
assert digest(keep_uri, keep_size) == keep_before, "an export the fuzzer never named changed"
print("OK")
