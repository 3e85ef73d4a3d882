-- Lets this session's commits return before their WAL reaches disk; returns
-- the setting. For the crawler: a crash of the database may then forget the
-- last claims and writes, which only means that their URLs are fetched
-- again once their leases run out; nothing is half written.
SELECT set_config('synchronous_commit', 'off', false) AS synchronous_commit
