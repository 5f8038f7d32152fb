#!/usr/bin/env bash
# NBD benchmark: fio's nbd engine against
#   - a raw export on the volume (a csvd node, LUN file in /tmp),
#   - nbdkit's file plugin and qemu-nbd serving a plain file of the same size (same filesystem),
#   - a dynamic VHD export on the volume vs `qemu-nbd -f vpc` serving the same kind of VHD,
# in one run: 1 MiB sequential write and read at iodepth 8, 4 KiB random write and read at
# iodepth 32. Every target starts from a fresh sparse file (or fresh VHD), written before it is
# read. Prints a markdown table with ratios; docs/benchmarks.md records a run.
#   SIZE (default 512M), RUNTIME seconds per point (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio nbdkit qemu-nbd qemu-img >/dev/null || ./scripts/install-deps.sh
cargo build --release --bins --quiet
bin=$PWD/target/release
size="${SIZE:-512M}"; runtime="${RUNTIME:-5}"
work=$(mktemp -d /tmp/csvd-bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$bin/csvctl" cluster down --dir "$work/c" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server on $1 did not start" >&2; exit 1; }

parse='
import json, sys
raw = sys.stdin.read()
j = json.loads(raw[raw.index("{"):])["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f" % (d["bw"] / 1024) if sys.argv[1].startswith("seq") else "%.1f" % (d["iops"] / 1000))'

# fio URI PATTERN -> "value" (MiB/s for sequential, kIOPS for random)
point() {
  local uri=$1 pat=$2 rw bs qd
  case $pat in
    seqwrite) rw=write bs=1M qd=8 ;; seqread) rw=read bs=1M qd=8 ;;
    randwrite) rw=randwrite bs=4k qd=32 ;; randread) rw=randread bs=4k qd=32 ;;
  esac
  fio --name=b --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd --size="$size" \
      --time_based --runtime="$runtime" --ramp_time=1 --output-format=json 2>/dev/null |
    /usr/bin/python3 -c "$parse" "$pat"
}

patterns="seqwrite seqread randwrite randread"
declare -A R

# csvd: one node, the LUN a file on the same filesystem as the plain files.
"$bin/csvctl" cluster up --dir "$work/c" --nodes 1 --lun-size 4G --detach >/dev/null
nbd=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["nbd"])' "$work/c/cluster.json")
mnt="$work/c/node1/mnt"
truncate -s "$size" "$mnt/bench.img"
qemu-img create -q -f vpc -o subformat=dynamic "$mnt/bench.vhd" "$size"
for p in $patterns; do R[csvd,$p]=$(point "nbd://$nbd/bench.img" $p); done
for p in $patterns; do R[csvdvhd,$p]=$(point "nbd://$nbd/bench.vhd" $p); done
"$bin/csvctl" cluster down --dir "$work/c" >/dev/null

# nbdkit file plugin.
truncate -s "$size" "$work/nbdkit.img"
port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$port" file "$work/nbdkit.img" & pids+=($!)
wait_port "$port" ""
for p in $patterns; do R[nbdkit,$p]=$(point "nbd://127.0.0.1:$port/" $p); done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# qemu-nbd raw and vpc (writeback cache, 8 clients allowed).
truncate -s "$size" "$work/qemu.img"
qemu-img create -q -f vpc -o subformat=dynamic "$work/qemu.vhd" "$size"
for kind in raw vpc; do
  port=$(free_port)
  file=$work/qemu.img; [ $kind = vpc ] && file=$work/qemu.vhd
  qemu-nbd -f $kind -b 127.0.0.1 -p "$port" -x x -t --shared=8 "$file" & pids+=($!)
  wait_port "$port" x
  for p in $patterns; do R[qemu$kind,$p]=$(point "nbd://127.0.0.1:$port/x" $p); done
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done

ratio() { /usr/bin/python3 -c 'import sys; a=float(sys.argv[1]); b=max(map(float, sys.argv[2:])); print(f"{a/b:.2f}")' "$@"; }
echo "# $(date -u +%FT%TZ) $(nproc) cores, SIZE=$size RUNTIME=${runtime}s, fio $(fio --version), release build"
echo
echo "| pattern | unit | csvd raw | nbdkit file | qemu-nbd raw | csvd / best | csvd VHD | qemu-nbd -f vpc | csvd VHD / qemu |"
echo "|---|---|---|---|---|---|---|---|---|"
for p in $patterns; do
  unit="k IOPS"; case $p in seq*) unit="MiB/s" ;; esac
  echo "| $p | $unit | ${R[csvd,$p]} | ${R[nbdkit,$p]} | ${R[qemuraw,$p]} | $(ratio ${R[csvd,$p]} ${R[nbdkit,$p]} ${R[qemuraw,$p]}) | ${R[csvdvhd,$p]} | ${R[qemuvpc,$p]} | $(ratio ${R[csvdvhd,$p]} ${R[qemuvpc,$p]}) |"
done
