#!/bin/sh
# The first start on an empty PGDATA makes the cluster the way postgres:15-bookworm's
# entrypoint does (superuser POSTGRES_USER with POSTGRES_PASSWORD, database POSTGRES_DB,
# password auth over TCP); later starts find PG_VERSION and only run the server.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "entrypoint: POSTGRES_PASSWORD is empty; set it (the manifest takes it from the Secret scale-postgres)" >&2
    exit 1
  fi
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA"
  # The password goes through a file, never a command line another process could read.
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  # UTF-8, as the public image initialises it (Debian's default here would be SQL_ASCII).
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    # Socket only while the database is made: nothing connects before it exists.
    pg_ctl --silent --wait -o "-c listen_addresses=''" start
    # From stdin: psql interpolates :"db" (quoted as an identifier) there, not in -c.
    echo 'CREATE DATABASE :"db"' | psql --quiet -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" \
      --dbname=postgres --set=db="$POSTGRES_DB"
    pg_ctl --silent --wait --mode=fast stop
  fi
  echo "entrypoint: initialised $PGDATA for database $POSTGRES_DB"
fi
exec "$@"
