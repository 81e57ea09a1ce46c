#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tenant store's tests (Debian's postgresql package):
#
#   eval "$(.ci/postgres.sh start)"    # exports AUTOGLM_TEST_POSTGRES_URL and _DIR
#   .ci/postgres.sh stop "$AUTOGLM_TEST_POSTGRES_DIR"
#
# It lives in a temporary directory, listens on 127.0.0.1 and a free port, trusts local
# connections and skips fsync. PostgreSQL refuses to run as root, so root runs it as the
# postgres user that the package creates.
set -euo pipefail

bindir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -n "$found" ]]; then
        echo "$found"
    elif command -v pg_ctl >/dev/null; then
        dirname "$(command -v pg_ctl)"
    else
        echo "postgres.sh: PostgreSQL is not installed: apt-get install postgresql" >&2
        exit 1
    fi
}

as_owner() {
    if [[ $(id -u) == 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    bin=$(bindir)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-postgres.XXXXXX")
    if [[ $(id -u) == 0 ]]; then
        chown postgres: "$dir"
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if ! as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 ||
        ! as_owner "$bin/pg_ctl" -w -D "$dir/data" -l "$dir/server.log" \
            -o "-k $dir -p $port -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" \
            start >/dev/null; then
        cat "$dir"/*.log >&2
        exit 1
    fi
    echo "export AUTOGLM_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    echo "export AUTOGLM_TEST_POSTGRES_DIR=$dir"
    ;;
stop)
    dir=${2:?usage: postgres.sh stop DIR}
    as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
