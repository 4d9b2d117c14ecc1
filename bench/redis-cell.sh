#!/usr/bin/env bash
# bench/redis-cell.sh: builds redis-cell 0.2.2 (brandur/redis-cell, CL.THROTTLE) from the crate
# registry into .tools/redis-cell/libredis_cell.so, the peer `make bench` compares ADMIT with.
# It is never a dependency of the module and never committed (.tools is gitignored). Prints the
# path of the library. Does nothing when it is already built.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.tools/redis-cell"
lib="$dest/libredis_cell.so"
if [ -f "$lib" ]; then
    echo "$lib"
    exit 0
fi
mkdir -p "$dest"
# A throwaway manifest that depends on the crate: `cargo fetch` downloads and unpacks it through
# the ordinary registry client; its source is then built on its own.
fetch="$dest/fetch"
mkdir -p "$fetch/src"
cat >"$fetch/Cargo.toml" <<'TOML'
[package]
name = "redis-cell-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
redis-cell = "=0.2.2"
[workspace]
TOML
: >"$fetch/src/lib.rs"
cargo fetch --manifest-path "$fetch/Cargo.toml" --quiet </dev/null
src="$(cargo metadata --manifest-path "$fetch/Cargo.toml" --format-version 1 </dev/null |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="redis-cell"))')"
rm -rf "$dest/src"
cp -r "$(dirname "$src")" "$dest/src"
# Its own workspace and target directory, so nothing of ours leaks into its build.
grep -q '^\[workspace\]' "$dest/src/Cargo.toml" || printf '\n[workspace]\n' >>"$dest/src/Cargo.toml"
cargo build --release --manifest-path "$dest/src/Cargo.toml" --target-dir "$dest/target" \
    </dev/null >"$dest/build.log" 2>&1 || { tail -n 40 "$dest/build.log" >&2; exit 1; }
cp "$dest/target/release/libredis_cell.so" "$lib"
echo "$lib"
