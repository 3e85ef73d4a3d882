-- Leases, for lease seconds, the best due URL of a host that may be asked
-- now (its delay has passed and no request to it is in flight), and that
-- host with it; returns the URL's row (url, host, depth, attempts, etag,
-- last_modified, content_hash, indexed), or no row when nothing is due. Due:
-- queued and past next_fetch_at, or fetching under a lease that ran out (its
-- crawler died). SKIP LOCKED lets any number of crawlers claim at once.
WITH host AS (
    SELECT h.host
    FROM crawl_hosts AS h
    WHERE h.next_allowed_at <= now()
      AND (h.busy_until IS NULL OR h.busy_until < now())
      AND EXISTS (
          SELECT 1
          FROM crawl_frontier AS f
          WHERE f.host = h.host
            AND ((f.state = 'queued' AND f.next_fetch_at <= now())
                 OR (f.state = 'fetching' AND f.lease_until < now()))
      )
    ORDER BY h.next_allowed_at
    LIMIT 1
    FOR UPDATE OF h SKIP LOCKED
),
due AS (
    SELECT f.url
    FROM crawl_frontier AS f
    JOIN host ON host.host = f.host
    WHERE (f.state = 'queued' AND f.next_fetch_at <= now())
       OR (f.state = 'fetching' AND f.lease_until < now())
    ORDER BY f.priority DESC, f.depth, f.added_at, f.url
    LIMIT 1
    FOR UPDATE OF f SKIP LOCKED
),
busy AS (
    UPDATE crawl_hosts AS h
    SET busy_until = now() + make_interval(secs => %(lease)s)
    FROM host
    WHERE h.host = host.host AND EXISTS (SELECT 1 FROM due)
)
UPDATE crawl_frontier AS f
SET state = 'fetching',
    lease_until = now() + make_interval(secs => %(lease)s),
    attempts = f.attempts + 1
FROM due
WHERE f.url = due.url
RETURNING f.url, f.host, f.depth, f.attempts, f.etag, f.last_modified, f.content_hash, f.indexed
