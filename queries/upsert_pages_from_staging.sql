-- Inserts staged pages, or updates the stored page with the same url when
-- anything changed; returns one row per written page, inserted = true for
-- new pages. Unchanged pages return no row.
INSERT INTO pages (title, url, language, last_updated, content)
SELECT title, url, language, last_updated, content
FROM import_staging
ORDER BY lineno
ON CONFLICT (url) DO UPDATE
SET title = excluded.title,
    language = excluded.language,
    last_updated = excluded.last_updated,
    content = excluded.content
WHERE (pages.title, pages.language, pages.last_updated, pages.content)
      IS DISTINCT FROM
      (excluded.title, excluded.language, excluded.last_updated, excluded.content)
RETURNING (xmax = 0) AS inserted
