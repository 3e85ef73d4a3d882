-- Returns how far this standby is behind its primary: in_recovery (false on
-- a primary), lag_seconds (0 when it has replayed all it received, else the
-- age of the last transaction it replayed) and lag_bytes (WAL received but
-- not yet replayed).
SELECT pg_is_in_recovery() AS in_recovery,
       CASE
           WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
           ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)
       END AS lag_seconds,
       COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) AS lag_bytes
