-- Deletes the segments %(segments)s with their postings and dead postings
-- (after a merge moved their pages elsewhere); returns nothing.
DELETE FROM index_segments WHERE id = ANY(%(segments)s::integer[])
