#!/usr/bin/env bash
# Metadata benchmark: creates and lock acquire/release through the real path
# (csvctl -> node -> leader -> Raft quorum commit) on 1, 3 and 16 local nodes.
# Prints one markdown table; docs/benchmarks.md records a run.
#   OPS (default 2000), CONCURRENCY (default 16), NODES (default "1 3 16")
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --bins --quiet
bin=./target/release
ops="${OPS:-2000}"; conc="${CONCURRENCY:-16}"
work=$(mktemp -d /tmp/csvd-bench-meta.XXXXXX)
trap '$bin/csvctl cluster down --dir "$work/c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
echo "# $(date -u +%FT%TZ) $(nproc) cores, ops=$ops concurrency=$conc, release build"
first=1
for n in ${NODES:-1 3 16}; do
  rm -rf "$work/c"
  $bin/csvctl cluster up --dir "$work/c" --nodes "$n" --lun-size 1G --detach >/dev/null
  out=$($bin/csvctl --cluster "$work/c" bench meta --ops "$ops" --concurrency "$conc")
  if [ $first = 1 ]; then echo "$out"; first=0; else echo "$out" | tail -n +3; fi
  $bin/csvctl cluster down --dir "$work/c" >/dev/null
done
