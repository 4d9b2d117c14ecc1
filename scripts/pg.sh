#!/usr/bin/env bash
# A throwaway PostgreSQL server for development and tests.
#
#   scripts/pg.sh start   DIR   initdb (first time) + start; prints the URL, also written to DIR/url
#   scripts/pg.sh start-tls DIR the same with TLS only (see below); prints a verify-full URL
#   scripts/pg.sh stop    DIR   fast shutdown (data is kept; `start DIR` again reuses port and data)
#   scripts/pg.sh destroy DIR   stop and delete everything
#   scripts/pg.sh status  DIR   exit 0 when running
#   scripts/pg.sh url     DIR   print the URL
#   scripts/pg.sh psql    DIR [psql args...]
#
# The server: trust auth for user postgres, listens only on 127.0.0.1 on a free
# port chosen here (kept across stop/start while it stays free), unix socket in
# the server's home directory, fsync off, max_connections 200.
# As root, initdb/pg_ctl run as the `postgres` user (runuser). If that user
# cannot use DIR (e.g. a clone under /root), or DIR is too long for a unix
# socket path, the data lives in a private directory under /tmp instead
# (recorded in DIR/home, removed by `destroy`).
# URL: postgresql://postgres@127.0.0.1:PORT/postgres
#
# start-tls: at initdb, openssl makes a CA (DIR/tls/ca.crt), a server certificate for
# localhost and 127.0.0.1 signed by it, a client certificate for the role quota_cert
# (DIR/tls/client.crt, client.key, mode 0600) and a second, unrelated CA
# (DIR/tls/other-ca.crt). The server has ssl = on and refuses plain TCP connections;
# quota_cert logs in with its certificate only (pg_hba `cert`), quota_scram with the
# password scram-pw by SCRAM-SHA-256 (channel binding possible), everyone else by trust.
# URL: postgresql://postgres@127.0.0.1:PORT/postgres?sslmode=verify-full&sslrootcert=DIR/tls/ca.crt
set -euo pipefail

die() { echo "pg.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
cmd="$1"
dir="$2"
shift 2

find_pgbin() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "$PG_BIN"
        return
    fi
    local best
    best="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -n "$best" ]; then
        dirname "$best"
        return
    fi
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return
    fi
    die "no PostgreSQL server binaries (initdb) found: run scripts/deps.sh"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as the postgres user when we are root, from a directory it can read.
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

port_free() {
    # Nothing accepts a connection there.
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
    local p
    if command -v python3 >/dev/null 2>&1; then
        p="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
        echo "$p"
        return
    fi
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 30000))
        if port_free "$p"; then
            echo "$p"
            return
        fi
    done
    die "no free port found"
}

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd)
}

home_of() {
    [ -f "$dir/home" ] || return 1
    cat "$dir/home"
}

pgbin="$(find_pgbin)"

running() {
    local home
    home="$(home_of)" || return 1
    [ -f "$home/data/PG_VERSION" ] || return 1
    as_pg "$pgbin/pg_ctl" -D "$home/data" status >/dev/null 2>&1
}

tls=0
url_of() {
    if [ "$tls" = 1 ]; then
        echo "postgresql://postgres@127.0.0.1:$1/postgres?sslmode=verify-full&sslrootcert=$dir/tls/ca.crt"
    else
        echo "postgresql://postgres@127.0.0.1:$1/postgres"
    fi
}

# A CA, a server certificate signed by it (in the data directory, owned by postgres) and a
# client certificate for quota_cert, plus an unrelated CA, all with EC P-256 keys.
make_certs() { # data-dir
    local data="$1" certs="$dir/tls" ext
    command -v openssl >/dev/null || die "openssl not found: run scripts/deps.sh"
    mkdir -p "$certs"
    ext="$certs/ext.cnf"
    new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    make_ca() { # name cn
        new_key "$certs/$1.key"
        openssl req -x509 -new -key "$certs/$1.key" -out "$certs/$1.crt" -days 3650 \
            -subj "/CN=$2" 2>/dev/null
    }
    sign() { # name cn extensions
        new_key "$certs/$1.key"
        openssl req -new -key "$certs/$1.key" -out "$certs/$1.csr" -subj "/CN=$2" 2>/dev/null
        printf '%b' "$3" >"$ext"
        openssl x509 -req -in "$certs/$1.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
            -CAcreateserial -out "$certs/$1.crt" -days 3650 -extfile "$ext" 2>/dev/null
        rm -f "$certs/$1.csr"
    }
    make_ca ca "redis-quota test CA"
    make_ca other-ca "another CA"
    sign server localhost \
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    sign client quota_cert "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    rm -f "$ext"
    chmod 600 "$certs"/*.key
    cp "$certs/server.crt" "$certs/server.key" "$certs/ca.crt" "$data/"
    if is_root; then
        chown postgres: "$data/server.crt" "$data/server.key" "$data/ca.crt"
    fi
    chmod 600 "$data/server.key"
}

choose_home() {
    local home=""
    if is_root; then
        id postgres >/dev/null 2>&1 || die "user postgres does not exist (install postgresql: scripts/deps.sh)"
        chown postgres: "$dir"
        if [ "${#dir}" -le 80 ] && runuser -u postgres -- test -w "$dir" -a -x "$dir" 2>/dev/null; then
            home="$dir"
        fi
    elif [ "${#dir}" -le 80 ]; then
        home="$dir"
    fi
    if [ -z "$home" ]; then
        home="$(mktemp -d /tmp/quota-pg.XXXXXX)"
        if is_root; then
            chown postgres: "$home"
        fi
    fi
    echo "$home" >"$dir/home"
    echo "$home"
}

do_start() {
    local home data port attempt
    dir="$(abs_dir "$dir")"
    home="$(home_of)" || home="$(choose_home)"
    data="$home/data"

    if running; then
        port="$(cat "$dir/port")"
        url_of "$port" >"$dir/url"
        url_of "$port"
        return 0
    fi

    if [ ! -f "$data/PG_VERSION" ]; then
        rm -rf "$data"
        if ! as_pg "$pgbin/initdb" -D "$data" -A trust -U postgres -E UTF8 --no-locale --no-sync \
                >"$dir/initdb.log" 2>&1; then
            cat "$dir/initdb.log" >&2
            die "initdb failed"
        fi
        as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF

# --- throwaway server settings (scripts/pg.sh) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$home'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 64MB
log_min_messages = warning
log_line_prefix = '%m [%p] %u@%d '
EOF
        if [ "$tls" = 1 ]; then
            make_certs "$data"
            as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.crt'
EOF
            as_pg tee "$data/pg_hba.conf" >/dev/null <<EOF
local all all trust
hostssl all quota_cert 127.0.0.1/32 cert
hostssl all quota_scram 127.0.0.1/32 scram-sha-256
hostssl all all 127.0.0.1/32 trust
hostnossl all all 0.0.0.0/0 reject
EOF
            touch "$dir/tls-roles"
        fi
    fi

    port=""
    if [ -f "$dir/port" ]; then
        port="$(cat "$dir/port")"
        port_free "$port" || port=""
    fi
    for attempt in 1 2 3 4 5; do
        [ -n "$port" ] || port="$(free_port)"
        if as_pg "$pgbin/pg_ctl" -D "$data" -l "$home/log" -o "-c port=$port" -w -t 60 start >/dev/null 2>"$dir/pg_ctl.err"; then
            echo "$port" >"$dir/port"
            break
        fi
        if [ "$attempt" -lt 5 ] && tail -n 20 "$home/log" 2>/dev/null | grep -qiE 'could not bind|address already in use|could not create any TCP'; then
            port=""
            continue
        fi
        cat "$dir/pg_ctl.err" >&2 || true
        tail -n 30 "$home/log" >&2 || true
        die "PostgreSQL did not start (data $data, log $home/log)"
    done

    # Ready for connections over TCP?
    for _ in $(seq 1 100); do
        if "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
            if [ -f "$dir/tls-roles" ]; then
                as_pg "$pgbin/psql" -X -q -h "$home" -p "$port" -U postgres -d postgres \
                    -v ON_ERROR_STOP=1 \
                    -c "CREATE ROLE quota_cert LOGIN; GRANT CREATE ON DATABASE postgres TO quota_cert" \
                    -c "SET password_encryption = 'scram-sha-256'; CREATE ROLE quota_scram LOGIN PASSWORD 'scram-pw'; GRANT CREATE ON DATABASE postgres TO quota_scram" \
                    >/dev/null || die "cannot create the roles quota_cert and quota_scram"
                rm -f "$dir/tls-roles"
            fi
            url_of "$port" >"$dir/url"
            url_of "$port"
            return 0
        fi
        sleep 0.1
    done
    tail -n 30 "$home/log" >&2 || true
    die "PostgreSQL started but is not accepting connections on 127.0.0.1:$port"
}

do_stop() {
    local home
    [ -d "$dir" ] || return 0
    home="$(home_of)" || return 0
    [ -f "$home/data/PG_VERSION" ] || return 0
    if running; then
        as_pg "$pgbin/pg_ctl" -D "$home/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            as_pg "$pgbin/pg_ctl" -D "$home/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
            die "could not stop PostgreSQL in $home/data"
    fi
}

do_destroy() {
    local home=""
    [ -d "$dir" ] || return 0
    home="$(home_of)" || home=""
    do_stop || true
    if [ -n "$home" ] && [ "$home" != "$dir" ]; then
        rm -rf "$home"
    fi
    rm -rf "$dir"
}

if [ -f "$dir/tls/ca.crt" ]; then
    tls=1
fi
case "$cmd" in
    start) do_start ;;
    start-tls)
        tls=1
        do_start
        ;;
    stop) do_stop ;;
    destroy) do_destroy ;;
    status) running ;;
    url)
        [ -f "$dir/url" ] || die "no server in $dir"
        cat "$dir/url"
        ;;
    psql)
        [ -f "$dir/url" ] || die "no server in $dir"
        psql_bin="$pgbin/psql"
        [ -x "$psql_bin" ] || psql_bin=psql
        exec "$psql_bin" -X -v ON_ERROR_STOP=1 "$(cat "$dir/url")" "$@"
        ;;
    *) usage ;;
esac
