-- Returns name and definition (CREATE INDEX ...) of the GIN indexes on pages,
-- which a bulk import drops and rebuilds: building a GIN index in one pass is
-- far faster than updating it row by row.
SELECT i.relname AS name, pg_get_indexdef(x.indexrelid) AS definition
FROM pg_index AS x
JOIN pg_class AS i ON i.oid = x.indexrelid
JOIN pg_am AS am ON am.oid = i.relam
WHERE x.indrelid = 'pages'::regclass AND am.amname = 'gin'
ORDER BY i.relname
