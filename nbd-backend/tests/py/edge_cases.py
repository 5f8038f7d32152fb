"""Edge cases of csvd's NBD server, driven with libnbd (run with /usr/bin/python3).

argv: rw_uri_base ro_uri_base   (e.g. "nbd+unix:///{}?socket=/tmp/x/nbd.sock"; {} = export name)
Exports expected on the rw server: "raw.img" (4 MiB, zero), "dyn.vhd" (dynamic VHD, unallocated).
The ro server serves the same directory read-only; "-" skips the read-only checks (csvd's
volume exports have no read-only server). Prints OK on success; any failure raises.
"""
import errno
import sys

import nbd

RW, RO = sys.argv[1], sys.argv[2]


def connect(uri, *, sr=True, meta=True, flags=None, strict=None):
    h = nbd.NBD()
    if not sr:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if flags is not None:
        h.set_handshake_flags(flags)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h


def expect_errno(want, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        assert e.errnum == want, f"{fn.__name__}: got errno {e.errnum} ({e}), want {want}"
        return
    raise AssertionError(f"{fn.__name__} succeeded, expected errno {want}")


def extents(h, count, offset, flags=0):
    got = []

    def cb(ctx, off, entries, err):
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION, ctx
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, offset, cb, flags)
    return got


raw = RW.format("raw.img")
size = 4 << 20

# --- option haggling: LIST / INFO reports the real size / GO ---------------------------------
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(raw)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert "raw.img" in names and "dyn.vhd" in names, names
h.opt_info()
assert h.get_size() == size, h.get_size()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], ctxs
h.set_export_name("no-such-export")
try:
    h.opt_info()
    raise AssertionError("INFO of a missing export succeeded")
except nbd.Error:
    pass
h.set_export_name("raw.img")
h.opt_go()
assert h.get_size() == size
assert h.can_multi_conn() and h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_df() and h.can_cache()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.shutdown()

# --- opt_abort is acknowledged ---------------------------------------------------------------
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(raw)
h.opt_abort()

# --- I/O edge cases with strict mode off ----------------------------------------------------
h = connect(raw, strict=0)
h.pwrite(b"\xab" * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b"\xab" * 4096
expect_errno(errno.EINVAL, h.pread, 512, size)           # read past the end
expect_errno(errno.EINVAL, h.pread, 1024, size - 512)    # read straddling the end
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 512, size)   # write past the end
expect_errno(errno.ENOSPC, h.zero, 512, size)            # write zeroes past the end
expect_errno(errno.EINVAL, h.trim, 512, size)            # trim past the end
expect_errno(errno.EINVAL, h.pread, 512, (1 << 64) - 256)  # offset+len overflows
# zero-length requests succeed
assert h.pread(0, 0) == b""
h.pwrite(b"", 0)
h.trim(0, 0)
h.zero(0, 0)
h.flush()
# unaligned requests are served exactly
h.pwrite(b"abc", 1001)
assert h.pread(5, 1000) == b"\xab" + b"abc" + b"\xab"
# write zeroes with and without NO_HOLE; FAST_ZERO is honoured (punching is fast here)
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.pwrite(b"\x01" * 8192, 8192)
h.zero(8192, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 8192) == bytes(8192)
h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
expect_errno(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
h.cache(4096, 0)
# a read larger than the advertised maximum is refused, not a disconnect
expect_errno(errno.EOVERFLOW, h.pread, (32 << 20) + 512, 0)
assert h.pread(512, 0) == bytes(512)
h.shutdown()

# --- block status with and without REQ_ONE --------------------------------------------------
h = connect(raw)
h.pwrite(b"\x07" * 65536, 1 << 20)  # data in a sparse file
h.flush()
all_ext = extents(h, size, 0)
assert sum(l for l, _ in all_ext) == size, all_ext
assert len(all_ext) >= 2, all_ext
assert any(f & nbd.STATE_HOLE for _, f in all_ext), all_ext
assert any(f == 0 for _, f in all_ext), all_ext
one = extents(h, size, 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0][0] <= size, one
assert one[0] == all_ext[0], (one, all_ext)
h.shutdown()

# --- simple replies (no structured replies negotiated) --------------------------------------
h = connect(raw, sr=False, meta=False)
assert not h.get_structured_replies_negotiated()
assert h.pread(65536, 1 << 20) == b"\x07" * 65536
h.shutdown()

# --- EXPORT_NAME fallback: non-fixed newstyle, with and without NO_ZEROES --------------------
for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
    h = connect(raw, sr=True, meta=False, flags=flags)
    assert h.get_size() == size
    assert h.pread(65536, 1 << 20) == b"\x07" * 65536
    h.shutdown()

# --- dynamic VHD: unallocated blocks are holes (OFFSET_HOLE, HOLE|ZERO) ----------------------
dyn = RW.format("dyn.vhd")
h = connect(dyn)
vsize = h.get_size()
kinds = []


def chunk(buf, off, status, err):
    kinds.append((status, off, len(buf)))
    assert status != nbd.READ_HOLE or buf == bytes(len(buf))
    return 0


h.pread_structured(65536, 0, chunk)
assert kinds == [(nbd.READ_HOLE, 0, 65536)], kinds
ext = extents(h, 4 << 20, 0)
assert ext[0][1] == nbd.STATE_HOLE | nbd.STATE_ZERO, ext
h.pwrite(b"\x42" * 512, (2 << 20) - 512)  # last sector of block 0
kinds.clear()
h.pread_structured(4096, (2 << 20) - 2048, chunk)  # data then hole
assert [k[0] for k in kinds] == [nbd.READ_DATA, nbd.READ_HOLE], kinds
kinds.clear()
h.pread_structured(4096, (2 << 20) - 2048, chunk, nbd.CMD_FLAG_DF)  # DF: one data chunk
assert [k[0] for k in kinds] == [nbd.READ_DATA], kinds
assert h.pread(4096, (2 << 20) - 2048) == bytes(1536) + b"\x42" * 512 + bytes(2048)
ext = extents(h, 4 << 20, 0)
assert ext[0] == (2 << 20, 0) and ext[1][1] == 3, ext
h.shutdown()

# --- read-only export: writes get EPERM, reads work ------------------------------------------
if RO != "-":
    h = connect(RO.format("raw.img"), strict=0)
    assert h.is_read_only()
    expect_errno(errno.EPERM, h.pwrite, b"x" * 512, 0)
    expect_errno(errno.EPERM, h.zero, 512, 0)
    expect_errno(errno.EPERM, h.trim, 512, 0)
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()

print("OK")
