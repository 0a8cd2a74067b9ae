#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the serve tests (profiles shared by replicas).
#   eval "$(scripts/test-postgres.sh start)"   -> exports AYAR_TEST_POSTGRES_URL, or AYAR_TEST_POSTGRES_SKIP (why not)
#   scripts/test-postgres.sh stop
# Installs Debian's postgresql package when it is missing and we are root with apt-get; never touches
# a system cluster: the data directory is a temporary folder, the port a fixed unusual one.
set -u
DIR=${AYAR_PG_DIR:-/tmp/ayar-test-postgres}
PORT=${AYAR_PG_PORT:-54329}

skip() { echo "export AYAR_TEST_POSTGRES_SKIP=$(printf %q "$1")"; exit 0; }

find_bin() {
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && { echo "$d"; return; }; done
  command -v initdb >/dev/null && dirname "$(command -v initdb)"
}

as_pg() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
  BIN=$(find_bin)
  if [ -z "$BIN" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >&2 \
        || skip "apt-get install postgresql failed"
      BIN=$(find_bin)
    fi
    [ -n "$BIN" ] || skip "no PostgreSQL server here and it cannot be installed (needs root and apt-get)"
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then skip "no postgres user to run the server as"; fi
  if ! as_pg "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    rm -rf "$DIR"; mkdir -p "$DIR" || skip "cannot create $DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
    as_pg "$BIN/initdb" -D "$DIR" -U ayar --auth=trust >/dev/null 2>&1 || skip "initdb failed"
    as_pg "$BIN/pg_ctl" -D "$DIR" -l "$DIR/log" -w -o "-h 127.0.0.1 -p $PORT -k $DIR" start >/dev/null 2>&1 \
      || skip "the server did not start (see $DIR/log)"
  fi
  echo "export AYAR_TEST_POSTGRES_URL=postgresql+psycopg://ayar@127.0.0.1:$PORT/postgres"
  ;;
stop)
  BIN=$(find_bin)
  [ -n "$BIN" ] && as_pg "$BIN/pg_ctl" -D "$DIR" -m fast stop >/dev/null 2>&1
  rm -rf "$DIR"
  ;;
*)
  echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
