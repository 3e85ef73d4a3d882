-- Ends the request in flight to host and lets the next one start after
-- delay seconds (its crawl delay); returns nothing.
UPDATE crawl_hosts
SET busy_until = NULL,
    next_allowed_at = now() + make_interval(secs => %(delay)s)
WHERE host = %(host)s
