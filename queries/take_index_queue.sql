-- Moves up to %(limit)s queued pages (oldest first) from index_queue into
-- index_batch; returns how many (taken).
WITH taken AS (
    DELETE FROM index_queue
    WHERE page_id IN (SELECT page_id FROM index_queue ORDER BY queued_at, page_id LIMIT %(limit)s)
    RETURNING page_id
), batch AS (
    INSERT INTO index_batch (page_id) SELECT page_id FROM taken ON CONFLICT DO NOTHING RETURNING page_id
)
SELECT count(*) AS taken FROM batch
