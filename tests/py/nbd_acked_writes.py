"""Acknowledged-write checker for the NBD handoff tests. Run with /usr/bin/python3.

  write URI SECONDS SEED REPORT   writes through one connection until SECONDS pass or a write is
                                  refused; REPORT (JSON) records the last acknowledged sequence
                                  number of every slot, and every refusal with its errno
  verify URI REPORT               reads every slot back: each must hold exactly its last
                                  acknowledged write (a refused write must not have landed)

Slots are 64 KiB at 64 KiB offsets in the first 32 MiB; every write carries (slot, sequence)
in its bytes. At most 8 writes are in flight, never two on one slot, so "last acknowledged"
is well defined. Every write in flight is waited for; no acknowledgement is dropped.
"""
import json
import random
import sys
import time

import nbd

SLOT = 64 << 10
SLOTS = 512


def pattern(slot, seq):
    head = f"slot={slot:08d} seq={seq:012d} ".encode()
    return (head * (SLOT // len(head) + 1))[:SLOT]


def write(uri, seconds, seed, report):
    print(f"seed={seed}", file=sys.stderr)
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    acked, refused, inflight = {}, [], {}
    seq, stop = 0, False
    deadline = time.time() + seconds
    while True:
        busy = {s for s, _, _ in inflight.values()}
        while not stop and len(inflight) < 8 and time.time() < deadline:
            slot = rng.randrange(SLOTS)
            if slot in busy:
                continue
            seq += 1
            busy.add(slot)
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(slot, seq)))
            inflight[h.aio_pwrite(buf, slot * SLOT)] = (slot, seq, buf)
        if not inflight:
            break
        h.poll(-1)
        for cookie in list(inflight):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                slot, s, _ = inflight.pop(cookie)
                refused.append({"slot": slot, "seq": s, "errno": e.errnum})
                stop = True
                continue
            if done:
                slot, s, _ = inflight.pop(cookie)
                acked[slot] = max(acked.get(slot, 0), s)
        if time.time() >= deadline:
            stop = True
    try:
        h.shutdown()
    except nbd.Error:
        pass
    with open(report, "w") as f:
        json.dump({"acked": acked, "writes": seq, "refused": refused}, f)
    print(f"acked={seq - len(refused)} refused={len(refused)}")


def verify(uri, report):
    with open(report) as f:
        acked = {int(k): v for k, v in json.load(f)["acked"].items()}
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = []
    for slot, seq in sorted(acked.items()):
        got = h.pread(SLOT, slot * SLOT)
        if got != pattern(slot, seq):
            bad.append((slot, seq, got[:40]))
    h.shutdown()
    assert not bad, f"{len(bad)} acknowledged writes lost, e.g. {bad[:3]}"
    print(f"verified={len(acked)}")


if sys.argv[1] == "write":
    write(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
else:
    verify(sys.argv[2], sys.argv[3])
print("OK")
