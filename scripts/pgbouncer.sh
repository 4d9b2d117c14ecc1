#!/usr/bin/env bash
# A throwaway PgBouncer in transaction mode, in front of a PostgreSQL on 127.0.0.1.
#
#   scripts/pgbouncer.sh start   DIR PG_PORT   start (config written the first time); prints its URL
#   scripts/pgbouncer.sh stop    DIR           stop it
#   scripts/pgbouncer.sh destroy DIR           stop and delete DIR
#
# PgBouncer's defaults except: pool_mode = transaction, listen on 127.0.0.1 on a free
# port, no Unix socket, and SCRAM authentication of the user postgres with a password
# (auth_file DIR/userlist.txt) that has a '/', a '+' and a '=' in it, as base64 passwords
# do. PgBouncer logs in to PostgreSQL as postgres (trust on the throwaway servers).
# It refuses to run as root: as root it runs as the `postgres` user.
# URL: postgresql://postgres:<password, percent-encoded>@127.0.0.1:PORT/postgres
set -euo pipefail

die() { echo "pgbouncer.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
cmd="$1"
dir="$2"

# The password, raw and percent-encoded for the URL.
PASSWORD='pgb/9kQ+Lm='
PASSWORD_IN_URL='pgb%2F9kQ%2BLm%3D'

# Debian installs it in /usr/sbin, which a non-root PATH may lack.
PGBOUNCER="${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}"

is_root() { [ "$(id -u)" -eq 0 ]; }
as_bouncer() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

running() {
    [ -f "$dir/pgbouncer.pid" ] && kill -0 "$(cat "$dir/pgbouncer.pid")" 2>/dev/null
}

url() {
    echo "postgresql://postgres:$PASSWORD_IN_URL@127.0.0.1:$(cat "$dir/port")/postgres"
}

do_start() {
    local pg_port="$1" port
    [ -x "$PGBOUNCER" ] || die "pgbouncer not found: run scripts/deps.sh"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if running; then
        url
        return 0
    fi
    port="$(free_port)"
    echo "$port" >"$dir/port"
    printf '"postgres" "%s"\n' "$PASSWORD" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
    chmod 600 "$dir/userlist.txt"
    if is_root; then
        chown -R postgres: "$dir"
    fi
    as_bouncer "$PGBOUNCER" -d -q "$dir/pgbouncer.ini" || {
        tail -n 20 "$dir/pgbouncer.log" >&2 || true
        die "pgbouncer did not start"
    }
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            url
            return 0
        fi
        sleep 0.1
    done
    die "pgbouncer is not accepting connections on 127.0.0.1:$port"
}

do_stop() {
    if running; then
        local pid
        pid="$(cat "$dir/pgbouncer.pid")"
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || return 0
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

case "$cmd" in
    start)
        [ $# -ge 3 ] || die "start needs the PostgreSQL port"
        do_start "$3"
        ;;
    stop) do_stop ;;
    destroy)
        do_stop
        rm -rf "$dir"
        ;;
    *) die "unknown command $cmd" ;;
esac
