-- Returns the ids of pages that wait in the index queue with no postings at
-- all yet (new pages), in one language, that contain any of %(lexemes)s; at
-- most %(limit)s of them. A search scores these from their own vectors.
SELECT q.page_id
FROM index_queue AS q
JOIN pages AS p ON p.id = q.page_id
WHERE p.language = %(language)s
  AND NOT EXISTS (SELECT 1 FROM page_segments AS s WHERE s.page_id = q.page_id)
  AND tsvector_to_array(p.search) && %(lexemes)s::text[]
ORDER BY q.page_id
LIMIT %(limit)s
