-- One round of a search: reads each query term's postings from its best
-- impact level down to its %(min_levels)s, and returns the pages seen, best
-- first: matched, a bit mask of the query's groups known to occur in the
-- page; low, the sum over those groups of the best score (weight * impact)
-- of the group's terms. Pages that match every group (%(all_groups)s) come
-- first. Dead postings (a page changed or deleted since its segment was
-- built) are left out. After the first %(limit)s rows, one more row with
-- page_id NULL gives the highest low among the pages not returned, and how
-- many there are.
WITH query AS (
    SELECT lexeme, weight, grp, min_level
    FROM unnest(%(lexemes)s::text[], %(weights)s::float8[], %(groups)s::integer[], %(min_levels)s::integer[])
        AS q(lexeme, weight, grp, min_level)
),
entries AS (
    SELECT q.grp, q.weight * (e & 65535) AS score, e >> 16 AS page_id, p.segment
    FROM query AS q
    JOIN postings AS p ON p.language = %(language)s AND p.lexeme = q.lexeme AND p.level >= q.min_level
    CROSS JOIN LATERAL unnest(p.entries) AS e
),
best AS (
    SELECT page_id, grp, max(score) AS score
    FROM entries
    WHERE NOT EXISTS (
        SELECT 1 FROM dead_postings AS d WHERE d.segment = entries.segment AND d.page_id = entries.page_id
    )
    GROUP BY page_id, grp
),
pages_seen AS (
    SELECT page_id, sum(score) AS low, bit_or(1::bigint << grp) AS matched
    FROM best
    GROUP BY page_id
),
ranked AS (
    SELECT page_id, low, matched,
           row_number() OVER (ORDER BY matched = %(all_groups)s DESC, low DESC, page_id) AS place
    FROM pages_seen
)
SELECT page_id, low, matched FROM ranked WHERE place <= %(limit)s
UNION ALL
SELECT NULL, max(low), count(*) FROM ranked WHERE place > %(limit)s
