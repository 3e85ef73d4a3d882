-- Recounts the pages of each language in %(languages)s, and sets the average
-- body length the index uses from %(sample)s pages picked at random (an
-- estimate: every impact is computed with it, so it only has to be the same
-- everywhere); returns nothing.
INSERT INTO corpus_stats AS c (language, pages, average_length, average_pages)
SELECT language, pages, average, pages
FROM (
    SELECT l.language,
           (SELECT count(*) FROM pages AS p WHERE p.language = l.language) AS pages,
           (SELECT avg(whoknows_body_length(search))
            FROM (SELECT search FROM pages AS p WHERE p.language = l.language ORDER BY random() LIMIT %(sample)s) AS picked)
               AS average
    FROM unnest(%(languages)s::text[]) AS l(language)
) AS counted
ON CONFLICT (language) DO UPDATE
SET pages = excluded.pages, average_length = excluded.average_length, average_pages = excluded.average_pages
