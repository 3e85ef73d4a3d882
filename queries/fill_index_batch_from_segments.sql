-- Puts the pages whose live postings are in the segments %(segments)s into
-- index_batch (a merge rebuilds them as one segment); returns how many (added).
WITH batch AS (
    INSERT INTO index_batch (page_id)
    SELECT page_id FROM page_segments WHERE segment = ANY(%(segments)s::integer[])
    ON CONFLICT DO NOTHING
    RETURNING page_id
)
SELECT count(*) AS added FROM batch
