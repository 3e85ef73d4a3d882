-- Puts the pages with ids from %(first_id)s to %(last_id)s into index_batch
-- (a full build goes through the table in such ranges); returns how many (added).
WITH batch AS (
    INSERT INTO index_batch (page_id)
    SELECT id FROM pages WHERE id BETWEEN %(first_id)s AND %(last_id)s
    RETURNING page_id
)
SELECT count(*) AS added FROM batch
