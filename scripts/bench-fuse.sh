#!/usr/bin/env bash
# FUSE frontend benchmark: the same fio patterns on a file in a csvd FUSE mount, on the
# local filesystem directly, and through bindfs (a plain FUSE passthrough), in one run.
#
#   scripts/bench-fuse.sh [SIZE] [RUNTIME_SECONDS]      (defaults: 1G 10)
#
# Patterns (all O_DIRECT, libaio, like a VM disk with cache=none):
#   seqwrite  1 MiB sequential write, iodepth 4
#   seqread   1 MiB sequential read,  iodepth 4
#   randwrite 4 KiB random write,     iodepth 32 (overwrites of an allocated file)
#   randread  4 KiB random read,      iodepth 32
# Two csvd nodes are measured: "csvd" opens its LUN file buffered (the default for a
# regular file; like bindfs, which opens its backing file without O_DIRECT, the
# host page cache sits under it) and "csvd-direct" with O_DIRECT (nothing cached on the
# host). Files are laid out once before the runs.
set -euo pipefail

SIZE=${1:-1G}
RUNTIME=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin csvd --bin csvctl
CSVCTL=$ROOT/target/release/csvctl
export CSVD_BIN=$ROOT/target/release/csvd

WORK=$(mktemp -d /var/tmp/csvd-bench.XXXXXX)
CL=$WORK/cluster
CLD=$WORK/cluster-direct
cleanup() {
    set +e
    fusermount3 -u -z "$WORK/bindmnt" 2>/dev/null
    "$CSVCTL" cluster down --dir "$CL" >/dev/null 2>&1
    "$CSVCTL" cluster down --dir "$CLD" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

# One node is enough: the FUSE data path is what is measured.
"$CSVCTL" cluster up --dir "$CL" --nodes 1 --lun-size 8G --detach >/dev/null
"$CSVCTL" cluster up --dir "$CLD" --nodes 1 --lun-size 8G --detach >/dev/null
"$CSVCTL" cluster down --dir "$CLD" >/dev/null
sed -i '/^lun_direct = /d; /^lun = /a lun_direct = true' "$CLD/node1/node.toml"
grep -q '^lun_direct = true$' "$CLD/node1/node.toml"
"$CSVCTL" cluster up --dir "$CLD" --nodes 1 --lun-size 8G --detach >/dev/null

mkdir -p "$WORK/local" "$WORK/bindsrc" "$WORK/bindmnt"
bindfs "$WORK/bindsrc" "$WORK/bindmnt"

declare -A FILE=(
    [local]="$WORK/local/bench.dat"
    [bindfs]="$WORK/bindmnt/bench.dat"
    [csvd]="$CL/node1/mnt/bench.dat"
    [csvd-direct]="$CLD/node1/mnt/bench.dat"
)
TARGETS=(local bindfs csvd csvd-direct)

run_fio() { # target pattern rw bs iodepth -> prints "bw_bytes iops"
    local file=$1 rw=$2 bs=$3 qd=$4
    fio --name=b --filename="$file" --size="$SIZE" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --ioengine=libaio --direct=1 --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --randrepeat=0 --norandommap --group_reporting --output-format=json |
        $PY -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["write"] if j["write"]["io_bytes"]>0 else j["read"]; print(d["bw_bytes"], d["iops"])'
}

for t in "${TARGETS[@]}"; do
    fio --name=layout --filename="${FILE[$t]}" --size="$SIZE" --rw=write --bs=1M \
        --ioengine=libaio --direct=1 --iodepth=4 --output-format=terse >/dev/null
done

RESULTS=$WORK/results.txt
: > "$RESULTS"
for p in "seqwrite write 1M 4" "seqread read 1M 4" "randwrite randwrite 4k 32" "randread randread 4k 32"; do
    set -- $p
    for t in "${TARGETS[@]}"; do
        echo "$1 $t $(run_fio "${FILE[$t]}" "$2" "$3" "$4")" >> "$RESULTS"
    done
done

$PY - "$RESULTS" "$SIZE" "$RUNTIME" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    pat, tgt, bw, iops = line.split()
    rows.setdefault(pat, {})[tgt] = (float(bw), float(iops))
print(f"fio, {sys.argv[2]} file, {sys.argv[3]} s per run, O_DIRECT libaio")
print("| pattern | local | bindfs | csvd | csvd (O_DIRECT LUN) | csvd/local | csvd/bindfs | csvd-direct/local | csvd-direct/bindfs |")
print("|---|---|---|---|---|---|---|---|---|")
for pat in ["seqwrite", "seqread", "randwrite", "randread"]:
    r = rows[pat]
    if pat.startswith("seq"):
        fmt = lambda v: f"{v[0]/2**20:.0f} MiB/s"
        key = 0
    else:
        fmt = lambda v: f"{v[1]/1000:.1f}k IOPS"
        key = 1
    l, b, c, d = r["local"], r["bindfs"], r["csvd"], r["csvd-direct"]
    pct = lambda x, y: f"{x[key]/y[key]*100:.0f}%"
    print(f"| {pat} | {fmt(l)} | {fmt(b)} | {fmt(c)} | {fmt(d)} | {pct(c, l)} | {pct(c, b)} | {pct(d, l)} | {pct(d, b)} |")
PYEOF
