-- Queues every fetched URL (done or skipped) again, due now, for a recrawl
-- (conditional GETs with the stored validators); returns how many.
WITH requeued AS (
    UPDATE crawl_frontier
    SET state = 'queued', next_fetch_at = now(), attempts = 0
    WHERE state IN ('done', 'skipped')
    RETURNING 1
)
SELECT count(*) AS requeued FROM requeued
