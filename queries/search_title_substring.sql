-- Returns the ids of the pages in one language whose title contains the text
-- (%(pattern)s, an ILIKE pattern served by the trigram index), shortest title
-- first: the fallback when no word matches ('mascri' finds ECMAScript). In
-- each row, total: how many there are, counted up to %(count_limit)s.
SELECT id, count(*) OVER () AS total
FROM (
    SELECT id, title FROM pages
    WHERE language = %(language)s AND title ILIKE %(pattern)s
    LIMIT %(count_limit)s
) AS found
ORDER BY length(title), id
LIMIT %(limit)s OFFSET %(offset)s
