#!/usr/bin/env bash
# Starts a local csvd demo cluster on defaults: a sparse LUN file, N nodes on
# 127.0.0.1, FUSE mounts and NBD ports, and prints what to do next.
# Ctrl-C stops the cluster (or pass --detach and use `csvctl cluster down`).
#   CSV_DEMO_DIR (default /tmp/csvd-demo), CSV_DEMO_NODES (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --bins --quiet
dir="${CSV_DEMO_DIR:-/tmp/csvd-demo}"
echo "csvd: starting a ${CSV_DEMO_NODES:-3}-node cluster in $dir (add ./target/release to PATH for csvctl)"
exec ./target/release/csvctl cluster up --dir "$dir" --nodes "${CSV_DEMO_NODES:-3}" "$@"
