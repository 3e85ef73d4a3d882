-- Adds urls (with their hosts, in the order given) to the crawl frontier at
-- depth with priority, within the limits: at most max_pages URLs in the
-- frontier and max_per_host per host; known urls stay as they are. Makes a
-- crawl_hosts row for each new host. Returns the urls added.
WITH candidate AS (
    SELECT DISTINCT ON (u.url) u.url, u.host, u.position
    FROM unnest(%(urls)s::text[], %(hosts)s::text[]) WITH ORDINALITY AS u (url, host, position)
    WHERE NOT EXISTS (SELECT 1 FROM crawl_frontier AS f WHERE f.url = u.url)
    ORDER BY u.url, u.position
),
ranked AS (
    SELECT url, host, position, row_number() OVER (PARTITION BY host ORDER BY position) AS n
    FROM candidate
),
known AS (
    SELECT f.host, count(*) AS n
    FROM crawl_frontier AS f
    WHERE f.host IN (SELECT host FROM candidate)
    GROUP BY f.host
),
new_hosts AS (
    INSERT INTO crawl_hosts (host)
    SELECT DISTINCT host FROM candidate
    ON CONFLICT (host) DO NOTHING
)
INSERT INTO crawl_frontier (url, host, depth, priority)
SELECT r.url, r.host, %(depth)s, %(priority)s
FROM ranked AS r
LEFT JOIN known AS k ON k.host = r.host
WHERE r.n + coalesce(k.n, 0) <= %(max_per_host)s
ORDER BY r.position
LIMIT greatest(0, %(max_pages)s - (SELECT count(*) FROM crawl_frontier))
ON CONFLICT (url) DO NOTHING
RETURNING url
