#!/bin/sh
# The standby of the compose `replica` profile, from the same image as the
# primary. On first start (an empty volume) it clones the primary with
# pg_basebackup -R, which also writes primary_conninfo and standby.signal;
# on every later start it resumes streaming from where it stopped.
set -eu
: "${PRIMARY_HOST:?}" "${REPLICATION_PASSWORD:?}"
export PGPASSWORD="$REPLICATION_PASSWORD"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -q -h "$PRIMARY_HOST" -U replicator; do
    echo "replica: waiting for the primary at $PRIMARY_HOST"
    sleep 2
  done
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  gosu postgres pg_basebackup -h "$PRIMARY_HOST" -U replicator -D "$PGDATA" -R -X stream -c fast --progress
fi
unset PGPASSWORD
exec gosu postgres postgres -c config_file=/etc/postgresql/postgresql.conf
