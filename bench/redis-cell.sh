#!/usr/bin/env bash
# bench/redis-cell.sh [VERSION]: builds redis-cell (brandur/redis-cell, CL.THROTTLE), the peer
# `make bench` races ADMIT against, into .tools/, and prints the path of the library. It is
# never a dependency of the module and never committed (.tools is gitignored). Does nothing
# when that version is already built.
#
#   0.2.2 (default)  from the crate registry              -> .tools/redis-cell/libredis_cell.so
#   0.5.0            from ../shared/peers/redis-cell-0.5.0.tar.gz (its source release, MIT; the
#                    registry only has 0.2.2), or REDIS_CELL_050_TARBALL
#                                                          -> .tools/redis-cell-0.5.0/libredis_cell.so
#
# 0.5.0 is built with its own Cargo.lock (--locked: bitflags, libc, time and cc come from the
# registry), and with two strings renamed so that it loads into the same redis-server as 0.2.2
# and both race under the same conditions: its module name (Redis refuses a second module named
# redis-cell) and its command, CL.THROTTLE050 (both register CL.THROTTLE). The limiter itself
# is built as shipped.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-0.2.2}"

# build_dir SRC DEST: builds the crate in SRC on its own (its own workspace and target
# directory, so nothing of ours leaks into its build) and copies the library to DEST.
build_dir() {
    local src="$1" dest="$2" lib="$2/libredis_cell.so"
    grep -q '^\[workspace\]' "$src/Cargo.toml" || printf '\n[workspace]\n' >>"$src/Cargo.toml"
    local locked=()
    [ -f "$src/Cargo.lock" ] && locked=(--locked)
    cargo build --release "${locked[@]}" --manifest-path "$src/Cargo.toml" --target-dir "$dest/target" \
        </dev/null >"$dest/build.log" 2>&1 || { tail -n 40 "$dest/build.log" >&2; exit 1; }
    cp "$dest/target/release/libredis_cell.so" "$lib"
    echo "$lib"
}

case "$version" in
    0.2.2)
        dest="$root/.tools/redis-cell"
        lib="$dest/libredis_cell.so"
        if [ -f "$lib" ]; then
            echo "$lib"
            exit 0
        fi
        mkdir -p "$dest"
        # A throwaway manifest that depends on the crate: `cargo fetch` downloads and unpacks it
        # through the ordinary registry client; its source is then built on its own.
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
        build_dir "$dest/src" "$dest"
        ;;
    0.5.0)
        dest="$root/.tools/redis-cell-0.5.0"
        lib="$dest/libredis_cell.so"
        if [ -f "$lib" ]; then
            echo "$lib"
            exit 0
        fi
        tarball="${REDIS_CELL_050_TARBALL:-$root/../shared/peers/redis-cell-0.5.0.tar.gz}"
        [ -f "$tarball" ] || { echo "redis-cell 0.5.0: $tarball not found (set REDIS_CELL_050_TARBALL)" >&2; exit 1; }
        mkdir -p "$dest"
        rm -rf "$dest/src" "$dest/unpack"
        mkdir -p "$dest/unpack"
        tar -xzf "$tarball" -C "$dest/unpack"
        mv "$dest/unpack/redis-cell-0.5.0" "$dest/src"
        rm -rf "$dest/unpack"
        lib_rs="$dest/src/src/lib.rs"
        sed -i 's/^const MODULE_NAME: &str = "redis-cell";$/const MODULE_NAME: \&str = "redis-cell-050";/' "$lib_rs"
        sed -i 's/^        "cl\.throttle"$/        "cl.throttle050"/' "$lib_rs"
        # Both renames must have happened, or the two versions could not share a server.
        grep -q '"redis-cell-050"' "$lib_rs" && grep -q '"cl.throttle050"' "$lib_rs" || {
            echo "redis-cell 0.5.0: $lib_rs no longer has the names to rename" >&2
            exit 1
        }
        build_dir "$dest/src" "$dest"
        ;;
    *)
        echo "bench/redis-cell.sh: unknown version '$version' (0.2.2 or 0.5.0)" >&2
        exit 1
        ;;
esac
