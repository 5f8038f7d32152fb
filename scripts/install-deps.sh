#!/usr/bin/env bash
# Installs the system packages csvd's demo cluster and test suite need, when they are missing.
# Debian 12 (bookworm) package names; safe to run again.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
want() { # want BINARY PACKAGE
  have "$1" || need_pkgs+=("$2")
}
want fusermount3 fuse3
want qemu-img qemu-utils
want nbdkit nbdkit
want nbdinfo libnbd-bin
want nbdcopy libnbd-bin
want fio fio
want bindfs bindfs
want ip iproute2
want losetup mount
want qemu-nbd qemu-utils
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then need_pkgs+=(python3-libnbd); fi

if [ ${#need_pkgs[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "csvd: missing packages: ${need_pkgs[*]}; run this script as root (or: apt-get install ${need_pkgs[*]})" >&2
  exit 1
fi
# shellcheck disable=SC2207
uniq_pkgs=($(printf '%s\n' "${need_pkgs[@]}" | sort -u))
echo "csvd: installing ${uniq_pkgs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${uniq_pkgs[@]}" >/dev/null
