#!/bin/sh
# First start of the primary (the official image runs /docker-entrypoint-initdb.d
# once, on an empty volume): the role a standby clones and streams with, and
# the pg_hba.conf line that lets it in. The image's own line (host all all
# all scram-sha-256) does not cover replication connections.
set -eu
case "${REPLICATION_PASSWORD:-}" in
  "" | change-me*) echo "init-replication: REPLICATION_PASSWORD is unset or the placeholder; no standby can connect" >&2; exit 1 ;;
esac
psql -v ON_ERROR_STOP=1 -v password="$REPLICATION_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
