#!/usr/bin/env bash
# Redirector benchmark on a 3-node local cluster with nbdkit SAN paths (release build):
#  - the same verifying block workload on node 1, direct and redirected through a peer
#    (operator redirect): throughput and latency;
#  - the failover stall (slowest request around the fault) over INJECTIONS san-down/san-hang
#    injections on node 1, with p50/p99/max.
# Prints a markdown table; docs/benchmarks.md ("Redirector") records a run.
#   SECS (default 5), INJECTIONS (default 20), BLOCK (default 65536), WORKERS (default 16)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --bins --quiet
bin=./target/release
export CSVD_BIN=$bin/csvd
work=$(mktemp -d /tmp/csvd-bench-redirect.XXXXXX)
trap '$bin/csvctl cluster down --dir "$work/c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
secs="${SECS:-5}"; inj="${INJECTIONS:-20}"; block="${BLOCK:-65536}"; workers="${WORKERS:-16}"
echo "# $(date -u +%FT%TZ) $(nproc) cores, 3 nodes, nbdkit SAN paths, block=$block workers=$workers secs=$secs, io_timeout 1000 ms, failback 2000 ms, no flap damping, release build"
$bin/csvctl cluster up --dir "$work/c" --nodes 3 --san nbdkit --lun-size 1G \
  --io-timeout-ms 1000 --failback-ms 2000 --flap-window-ms 100 --detach >/dev/null
$bin/csvctl --cluster "$work/c" bench redirect --node 1 --secs "$secs" --injections "$inj" \
  --block-size "$block" --workers "$workers"
