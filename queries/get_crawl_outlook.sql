-- Returns how many URLs still wait in the crawl frontier (queued, or being
-- fetched under a lease) and in how many seconds the first of them could be
-- claimed (wait_seconds, null when none waits; negative when one is due).
SELECT count(*) AS waiting,
       extract(epoch FROM min(greatest(
           CASE f.state WHEN 'queued' THEN f.next_fetch_at ELSE f.lease_until END,
           h.next_allowed_at,
           h.busy_until
       )) - clock_timestamp())::float8 AS wait_seconds
FROM crawl_frontier AS f
JOIN crawl_hosts AS h ON h.host = f.host
WHERE f.state IN ('queued', 'fetching')
