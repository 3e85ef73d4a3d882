-- Returns the number of pages a search matches (same filter as
-- search_pages.sql), counting at most %(cap)s so a very common word stays
-- cheap; the caller shows a count at the cap as "cap or more".
WITH query AS (
    SELECT websearch_to_tsquery(%(config)s::regconfig, %(q)s) AS words,
           to_tsquery(%(config)s::regconfig, %(prefix)s) AS prefix
)
SELECT count(*) AS total
FROM (
    SELECT 1
    FROM pages AS p, query
    WHERE p.language = %(language)s
      AND (p.search @@ query.words
           OR p.search @@ query.prefix
           OR p.title ILIKE %(title_pattern)s)
    LIMIT %(cap)s
) AS capped
