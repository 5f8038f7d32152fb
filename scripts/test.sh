#!/usr/bin/env bash
# The whole test suite: installs missing system packages, then the gate
# (format, clippy with -D warnings) and every test with real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
echo "== cargo fmt --all --check"
cargo fmt --all --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace -- --test-threads="${CSV_TEST_THREADS:-2}"
