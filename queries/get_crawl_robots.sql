-- Returns the cached robots.txt of origin (status and body), unless it has
-- expired.
SELECT status, body
FROM crawl_robots
WHERE host = %(origin)s AND expires_at > now()
