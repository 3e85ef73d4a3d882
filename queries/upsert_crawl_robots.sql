-- Stores the robots.txt fetched for origin, valid for seconds; returns
-- nothing.
INSERT INTO crawl_robots (host, status, body, fetched_at, expires_at)
VALUES (%(origin)s, %(status)s, %(body)s, now(), now() + make_interval(secs => %(seconds)s))
ON CONFLICT (host) DO UPDATE
SET status = excluded.status, body = excluded.body, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at
