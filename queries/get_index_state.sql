-- Returns the index's state: segments, pages with postings, dead postings,
-- queued pages (queued) and queued pages with no postings yet (unindexed).
SELECT (SELECT count(*) FROM index_segments) AS segments,
       (SELECT count(*) FROM page_segments) AS indexed,
       (SELECT count(*) FROM dead_postings) AS dead,
       (SELECT count(*) FROM index_queue) AS queued,
       (SELECT count(*) FROM index_queue AS q
        WHERE NOT EXISTS (SELECT 1 FROM page_segments AS s WHERE s.page_id = q.page_id)) AS unindexed
