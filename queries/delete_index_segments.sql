-- Deletes the segments %(segments)s with their postings, page assignments
-- and dead postings (after a merge moved their pages elsewhere); returns
-- nothing. postings has no foreign key (see migration 0008), so its rows go
-- first, explicitly.
WITH gone AS (
    DELETE FROM postings WHERE segment = ANY(%(segments)s::integer[])
)
DELETE FROM index_segments WHERE id = ANY(%(segments)s::integer[])
