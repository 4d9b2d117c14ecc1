#!/usr/bin/env bash
# Installs the system packages that building and testing redis-quota need, only
# when they are missing (idempotent, quiet when everything is there):
#   redis-server (+ redis-cli, redis-benchmark)   Redis 7.0, the supported floor
#   libclang-dev                                  bindgen inside the redis-module crate
#   a C compiler                                  cc crates
#   postgresql                                    initdb / pg_ctl / postgres / psql for throwaway servers
#   openssl                                       certificates for the TLS test server
#   pgbouncer                                     the transaction-pooler tests
#   prometheus-redis-exporter                     the metrics test (examples/prometheus)
#   python3 (+ venv, pip)                         Redis 8 download, examples
#   nodejs + npm                                  the Node examples (examples/node)
# Runs apt-get update at most once. Needs root (or sudo) only when something is missing.
# Services that the packages ship are NOT started by this install (policy-rc.d).
set -euo pipefail

missing=()

have() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

if ! have redis-server || ! have redis-cli || ! have redis-benchmark; then
    missing+=(redis-server redis-tools)
fi
# (bindgen needs libclang and clang's own headers; LIBCLANG_PATH means the user set one up.)
if ! have_pkg libclang-dev && [ -z "${LIBCLANG_PATH:-}" ]; then
    missing+=(libclang-dev)
fi
if ! have cc; then
    missing+=(gcc libc6-dev)
fi
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! have initdb; then
    missing+=(postgresql)
fi
if ! have psql; then
    missing+=(postgresql-client)
fi
have openssl || missing+=(openssl)
# Debian puts it in /usr/sbin, which a non-root PATH may lack.
if ! have pgbouncer && [ ! -x /usr/sbin/pgbouncer ]; then
    missing+=(pgbouncer)
fi
# Debian's exporter for INFO quota through examples/prometheus/quota.lua (tests/prometheus.rs).
if ! have prometheus-redis-exporter; then
    missing+=(prometheus-redis-exporter)
fi
if ! have python3; then
    missing+=(python3 python3-venv python3-pip)
else
    python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi
if ! have node || ! have npm; then
    missing+=(nodejs npm)
fi
# redis-server and postgres need these at run time; tiny, usually present.
have runuser || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "deps.sh: installing missing packages: ${missing[*]}" >&2

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then
        SUDO=(sudo)
    else
        echo "deps.sh: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

# Keep apt from starting the packaged redis/postgres services (they would take
# ports 6379/5432): the standard policy-rc.d trick, only if none is in place.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null

echo "deps.sh: done" >&2
