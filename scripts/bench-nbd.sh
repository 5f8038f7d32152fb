#!/usr/bin/env bash
# NBD benchmark: fio's nbd engine against
#   - a raw export on the volume (a csvd node, LUN file in /tmp),
#   - nbdkit's file plugin and qemu-nbd serving a plain file of the same size (same filesystem),
#   - a dynamic VHD export on the volume vs `qemu-nbd -f vpc` serving the same kind of VHD,
# 1 MiB sequential write and read at iodepth 8, 4 KiB random write and read at iodepth 32, and
# (as root) 4 KiB random reads that all miss the page cache. nbdkit's null plugin (which keeps
# nothing and reads zeros) shows what fio's one client thread reaches when the server
# does no storage work at all. Each server's CPU use during each point is measured from
# /proc/PID/stat (percent of one core, over the whole fio run).
# All servers run at once and the targets take turns, pattern by pattern, for ROUNDS rounds:
# load that comes and goes on the machine hits every target alike. Every target starts from a
# fresh sparse file (or fresh VHD), and the first sequential write lays it out. Prints a
# markdown table of medians with ratios; docs/benchmarks.md records runs.
# Run as root, everything runs in a network namespace of its own whose TCP congestion control
# is BENCH_CC (default cubic, the kernel's and Debian's default), whatever the host uses:
# a host set to bbr paces every loopback connection, and the reordering that pacing causes
# made consecutive identical sequential runs differ by up to 2x (docs/benchmarks.md, "TCP
# congestion control on loopback"). BENCH_CC=host keeps the host's network and setting.
#   SIZE (default 512M), RUNTIME seconds per point (default 5), ROUNDS (default 3), BENCH_CC
set -euo pipefail
cd "$(dirname "$0")/.."
# Installed and built once, before entering the namespace (which has no network).
if [ -z "${CSVD_BENCH_NETNS:-}" ]; then
  command -v fio nbdkit qemu-nbd qemu-img >/dev/null || ./scripts/install-deps.sh
  cargo build --release --bins --quiet
fi
cc="${BENCH_CC:-cubic}"
if [ "$cc" != host ] && [ -z "${CSVD_BENCH_NETNS:-}" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "not root: running in the host's network (as BENCH_CC=host)" >&2
  else
    ns=csvd-bench-$$
    # A namespace may only pick a congestion control the host allows: a host whose
    # default is bbr allows "reno bbr" alone. Add ours for the run, then restore the list.
    allowed_key=net.ipv4.tcp_allowed_congestion_control
    allowed=$(sysctl -n $allowed_key)
    case " $allowed " in
      *" $cc "*) allowed= ;;
      *) sysctl -qw "$allowed_key=$allowed $cc" ;;
    esac
    ip netns add "$ns"
    trap 'ip netns del "$ns" 2>/dev/null || true; [ -z "$allowed" ] || sysctl -qw "$allowed_key=$allowed"' EXIT
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw "net.ipv4.tcp_congestion_control=$cc"
    rc=0
    CSVD_BENCH_NETNS=$ns ip netns exec "$ns" "$0" "$@" || rc=$?
    exit $rc
  fi
fi
bin=$PWD/target/release
size="${SIZE:-512M}"; runtime="${RUNTIME:-5}"; rounds="${ROUNDS:-3}"
work=$(mktemp -d /tmp/csvd-bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$bin/csvctl" cluster down --dir "$work/c" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# A port below the kernel's ephemeral range, which outgoing connections draw from (as
# csv_core::ports does for the nodes).
free_port() { /usr/bin/python3 -c '
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    p = random.randrange(10000, lo) if lo > 11000 else 0
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(s.getsockname()[1])
    break'; }
wait_port() { for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server on $1 did not start" >&2; exit 1; }

parse='
import json, sys
raw = sys.stdin.read()
j = json.loads(raw[raw.index("{"):])["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f" % (d["bw"] / 1024) if sys.argv[1].startswith("seq") else "%.1f" % (d["iops"] / 1000))'

# fio URI PATTERN PID -> "value cpu" (MiB/s for sequential, kIOPS for random; the server's
# CPU use in percent of one core)
ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
point() {
  local uri=$1 pat=$2 pid=$3 rw bs qd t0 t1 s0 s1 v
  local how=(--time_based --runtime="$runtime" --ramp_time=1)
  case $pat in
    seqwrite) rw=write bs=1M qd=8 ;; seqread) rw=read bs=1M qd=8 ;;
    randwrite) rw=randwrite bs=4k qd=32 ;; randread) rw=randread bs=4k qd=32 ;;
    # Every read misses the page cache: caches dropped first, then a quarter of the file's
    # blocks read once each in random order.
    coldread) rw=randread bs=4k qd=32; sync; echo 3 > /proc/sys/vm/drop_caches
              how=(--io_size=$(( $(numfmt --from=iec "$size") / 4 ))) ;;
  esac
  t0=$(ticks "$pid"); s0=$(date +%s%N)
  v=$(fio --name=b --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd --size="$size" \
      "${how[@]}" --output-format=json 2>/dev/null | /usr/bin/python3 -c "$parse" "$pat")
  t1=$(ticks "$pid"); s1=$(date +%s%N)
  echo "$v $(( (t1 - t0) * 100 * 1000000000 / $(getconf CLK_TCK) / (s1 - s0) ))"
}

patterns="seqwrite seqread randwrite randread"
# Reads that miss the page cache need `echo 3 > /proc/sys/vm/drop_caches` (root).
[ -w /proc/sys/vm/drop_caches ] && patterns+=" coldread"
targets="csvd nbdkit qemuraw null csvdvhd qemuvpc"
declare -A URI R C PID

# csvd: one node, the LUN a file on the same filesystem as the plain files.
"$bin/csvctl" cluster up --dir "$work/c" --nodes 1 --lun-size 4G --detach >/dev/null
read -r nbd PID[csvd] < <(/usr/bin/python3 -c 'import json,sys; n=json.load(open(sys.argv[1]))["nodes"][0]; print(n["nbd"], n["pid"])' "$work/c/cluster.json")
mnt="$work/c/node1/mnt"
truncate -s "$size" "$mnt/bench.img"
qemu-img create -q -f vpc -o subformat=dynamic "$mnt/bench.vhd" "$size"
URI[csvd]="nbd://$nbd/bench.img"; URI[csvdvhd]="nbd://$nbd/bench.vhd"
PID[csvdvhd]=${PID[csvd]}

# nbdkit file plugin.
truncate -s "$size" "$work/nbdkit.img"
port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$port" file "$work/nbdkit.img" & pids+=($!)
PID[nbdkit]=$!
wait_port "$port" ""
URI[nbdkit]="nbd://127.0.0.1:$port/"

# The ceiling: nbdkit's null plugin does no storage work (writes vanish, reads are zeros).
port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$port" null "$size" & pids+=($!)
PID[null]=$!
wait_port "$port" ""
URI[null]="nbd://127.0.0.1:$port/"

# qemu-nbd raw and vpc (writeback cache, 8 clients allowed).
truncate -s "$size" "$work/qemu.img"
qemu-img create -q -f vpc -o subformat=dynamic "$work/qemu.vhd" "$size"
for kind in raw vpc; do
  port=$(free_port)
  file=$work/qemu.img; [ $kind = vpc ] && file=$work/qemu.vhd
  qemu-nbd -f $kind -b 127.0.0.1 -p "$port" -x x -t --shared=8 "$file" & pids+=($!)
  PID[qemu$kind]=$!
  wait_port "$port" x
  URI[qemu$kind]="nbd://127.0.0.1:$port/x"
done

for round in $(seq "$rounds"); do
  for p in $patterns; do
    for t in $targets; do
      # Reads that miss the page cache mean nothing for a server that keeps no data.
      [ "$t,$p" = null,coldread ] && continue
      read -r v c < <(point "${URI[$t]}" $p "${PID[$t]}")
      R[$t,$p]+="$v "; C[$t,$p]+="$c "
    done
  done
  echo "round $round of $rounds done" >&2
done

median() { /usr/bin/python3 -c 'import sys, statistics; v=statistics.median(map(float, sys.argv[1:])); print(f"{v:.1f}" if v < 1000 else f"{v:.0f}")' "$@"; }
ratio() { /usr/bin/python3 -c 'import sys; a=float(sys.argv[1]); b=max(map(float, sys.argv[2:])); print(f"{a/b:.2f}")' "$@"; }
where="host network"; [ -n "${CSVD_BENCH_NETNS:-}" ] && where="own network namespace"
echo "# $(date -u +%FT%TZ) $(nproc) cores, SIZE=$size RUNTIME=${runtime}s ROUNDS=$rounds, fio $(fio --version), release build, TCP $(sysctl -n net.ipv4.tcp_congestion_control) ($where)"
echo
echo "Medians of $rounds interleaved rounds (each round's values in the last table)."
echo
echo "| pattern | unit | csvd raw | nbdkit file | qemu-nbd raw | csvd / best | nbdkit null (no storage) | csvd / null | csvd VHD | qemu-nbd -f vpc | csvd VHD / qemu |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
declare -A M MC
for p in $patterns; do
  for t in $targets; do
    [ -n "${R[$t,$p]:-}" ] || { M[$t,$p]=-; MC[$t,$p]=-; continue; }
    # shellcheck disable=SC2086
    M[$t,$p]=$(median ${R[$t,$p]}); MC[$t,$p]=$(median ${C[$t,$p]})
  done
  unit="k IOPS"; case $p in seq*) unit="MiB/s" ;; esac
  ceil=-; [ "${M[null,$p]}" = - ] || ceil=$(ratio ${M[csvd,$p]} ${M[null,$p]})
  echo "| $p | $unit | ${M[csvd,$p]} | ${M[nbdkit,$p]} | ${M[qemuraw,$p]} | $(ratio ${M[csvd,$p]} ${M[nbdkit,$p]} ${M[qemuraw,$p]}) | ${M[null,$p]} | $ceil | ${M[csvdvhd,$p]} | ${M[qemuvpc,$p]} | $(ratio ${M[csvdvhd,$p]} ${M[qemuvpc,$p]}) |"
done
echo
# Within a round the targets run one right after the other, so a ratio taken round by round
# is less exposed to the machine's drift than the ratio of medians.
paired() { /usr/bin/python3 -c '
import sys, statistics
a = [float(x) for x in sys.argv[1].split()]
peers = [[float(x) for x in s.split()] for s in sys.argv[2:]]
r = sorted(v / max(p[i] for p in peers) for i, v in enumerate(a))
print(f"{r[0]:.2f}–{r[-1]:.2f} (median {statistics.median(r):.2f}, {sum(x >= 1 for x in r)} of {len(r)} rounds ≥ 1)")' "$@"; }
echo "csvd raw / the better of nbdkit and qemu-nbd, round by round:"
echo
echo "| pattern | paired ratios |"
echo "|---|---|"
for p in $patterns; do
  echo "| $p | $(paired "${R[csvd,$p]}" "${R[nbdkit,$p]}" "${R[qemuraw,$p]}") |"
done
echo
echo "Server CPU during each point, percent of one core (medians; fio uses the rest of the 2 cores):"
echo
echo "| pattern | csvd raw | nbdkit file | qemu-nbd raw | nbdkit null | csvd VHD | qemu-nbd -f vpc |"
echo "|---|---|---|---|---|---|---|"
for p in $patterns; do
  echo "| $p | ${MC[csvd,$p]} | ${MC[nbdkit,$p]} | ${MC[qemuraw,$p]} | ${MC[null,$p]} | ${MC[csvdvhd,$p]} | ${MC[qemuvpc,$p]} |"
done
echo
echo "Each round's values:"
echo
echo "| pattern | csvd raw | nbdkit file | qemu-nbd raw | nbdkit null | csvd VHD | qemu-nbd -f vpc |"
echo "|---|---|---|---|---|---|---|"
for p in $patterns; do
  row="| $p |"
  for t in $targets; do row+=" $(echo ${R[$t,$p]:--} | tr ' ' '/') |"; done
  echo "$row"
done
