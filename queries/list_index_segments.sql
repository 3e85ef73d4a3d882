-- Returns every index segment (id, pages), smallest first.
SELECT id, pages FROM index_segments ORDER BY pages, id
