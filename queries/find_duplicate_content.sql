-- Returns the indexed URLs (url, content_hash) whose content hash is one of
-- hashes, other than the urls given: the pages that a new page duplicates.
SELECT url, content_hash
FROM crawl_frontier
WHERE indexed
  AND content_hash = ANY(%(hashes)s::text[])
  AND url <> ALL(%(urls)s::text[])
