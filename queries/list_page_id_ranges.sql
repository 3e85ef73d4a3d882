-- Returns the pages' ids cut into ranges of %(size)s pages (first_id,
-- last_id), in order: the segments of a full index build.
SELECT min(id) AS first_id, max(id) AS last_id
FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1) / %(size)s AS chunk FROM pages) AS numbered
GROUP BY chunk
ORDER BY chunk
