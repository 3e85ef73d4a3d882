-- Removes rows whose url appears again later in the same source, keeping the
-- last one; returns each removed row's lineno and url.
DELETE FROM import_staging AS s
USING (
    SELECT lineno
    FROM (
        SELECT lineno, row_number() OVER (PARTITION BY url ORDER BY lineno DESC) AS url_rank
        FROM import_staging
    ) AS numbered
    WHERE url_rank > 1
) AS duplicate
WHERE s.lineno = duplicate.lineno
RETURNING s.lineno, s.url
