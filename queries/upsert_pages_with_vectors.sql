-- upsert_pages_from_staging for a bulk import, whose page triggers are
-- disabled: each page's vector comes from import_vectors (computed in
-- parallel by whoknows_page_vector, as the pages_vector trigger would),
-- inserted or updated with its page.
INSERT INTO pages (title, url, language, last_updated, content, search)
SELECT s.title, s.url, s.language, s.last_updated, s.content, v.search
FROM import_staging AS s
JOIN import_vectors AS v ON v.lineno = s.lineno
ORDER BY s.lineno
ON CONFLICT (url) DO UPDATE
SET title = excluded.title,
    language = excluded.language,
    last_updated = excluded.last_updated,
    content = excluded.content,
    search = excluded.search
WHERE (pages.title, pages.language, pages.last_updated, pages.content)
      IS DISTINCT FROM
      (excluded.title, excluded.language, excluded.last_updated, excluded.content)
RETURNING (xmax = 0) AS inserted
