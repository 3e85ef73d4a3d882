-- Makes segment %(segment)s hold the live postings of the pages in
-- index_batch: their postings in an older segment become dead, and the
-- segment's page count is set; returns how many pages (assigned).
WITH older AS (
    INSERT INTO dead_postings (segment, page_id)
    SELECT s.segment, s.page_id FROM page_segments AS s JOIN index_batch AS b USING (page_id)
    WHERE s.segment <> %(segment)s
    ON CONFLICT DO NOTHING
), assigned AS (
    INSERT INTO page_segments (page_id, segment)
    SELECT b.page_id, %(segment)s FROM index_batch AS b JOIN pages AS p ON p.id = b.page_id
    ON CONFLICT (page_id) DO UPDATE SET segment = excluded.segment
    RETURNING page_id
)
SELECT count(*) AS assigned FROM assigned
