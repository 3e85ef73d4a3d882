-- Returns, for each of the pages %(page_ids)s, which query terms it contains
-- (terms: their 1-based places in %(lexemes)s), whether it matches every
-- required phrase of %(phrases)s (phrases_ok) and whether it contains an
-- excluded word of %(excluded)s (excluded). Only lookups in the page's
-- vector (no unnest): the cheap check of a page whose place is open.
--
-- Each test below reads the vector from TOAST again (about 2 µs a page at
-- 1M pages); a copy made once (|| '') costs about 10 µs. So the copy is
-- made only for more than 4 tests (bench/README.md, "A page's vector
-- copied only when it is read often").
WITH query AS (
    SELECT term::integer AS term, quote_literal(lexeme)::tsquery AS lexeme_query
    FROM unnest(%(lexemes)s::text[]) WITH ORDINALITY AS q(lexeme, term)
),
candidates AS MATERIALIZED (
    SELECT p.id,
           CASE WHEN cardinality(%(lexemes)s::text[]) + cardinality(%(phrases)s::text[])
                     + cardinality(%(excluded)s::text[]) > 4
                THEN p.search || ''::tsvector ELSE p.search END AS search
    FROM pages AS p
    WHERE p.id = ANY(%(page_ids)s::bigint[])
)
SELECT c.id,
       ARRAY(SELECT q.term FROM query AS q WHERE c.search @@ q.lexeme_query ORDER BY q.term) AS terms,
       (SELECT coalesce(bool_and(c.search @@ phraseto_tsquery(%(config)s::regconfig, phrase)), true)
        FROM unnest(%(phrases)s::text[]) AS phrase) AS phrases_ok,
       (SELECT coalesce(bool_or(c.search @@ plainto_tsquery(%(config)s::regconfig, word)), false)
        FROM unnest(%(excluded)s::text[]) AS word) AS excluded
FROM candidates AS c
