-- Returns, for each of the pages %(page_ids)s, its exact score parts, from
-- its own vector and the average body length that the index uses: terms,
-- the places (1-based) in %(lexemes)s of the query terms it contains, with
-- their impacts; phrases_ok, whether it matches every required phrase of
-- %(phrases)s; excluded, whether it contains an excluded word of
-- %(excluded)s. The vector is measured once per page, and read from TOAST
-- by each use (about 2 µs a page at 1M pages): a copy made once (|| '')
-- would cost about 10 µs, more than the three reads of a search without
-- phrases or exclusions (bench/README.md, "A page's vector copied only
-- when it is read often").
WITH query AS (
    SELECT lexeme, term::integer AS term
    FROM unnest(%(lexemes)s::text[]) WITH ORDINALITY AS q(lexeme, term)
),
sized AS MATERIALIZED (
    SELECT p.id, p.search, whoknows_body_length(p.search) AS body_length
    FROM pages AS p
    WHERE p.id = ANY(%(page_ids)s::bigint[])
)
SELECT s.id,
       coalesce(t.terms, ARRAY[]::integer[]) AS terms,
       coalesce(t.impacts, ARRAY[]::smallint[]) AS impacts,
       (SELECT coalesce(bool_and(s.search @@ phraseto_tsquery(%(config)s::regconfig, phrase)), true)
        FROM unnest(%(phrases)s::text[]) AS phrase) AS phrases_ok,
       (SELECT coalesce(bool_or(s.search @@ plainto_tsquery(%(config)s::regconfig, word)), false)
        FROM unnest(%(excluded)s::text[]) AS word) AS excluded
FROM sized AS s
LEFT JOIN LATERAL (
    SELECT array_agg(q.term ORDER BY q.term) AS terms,
           array_agg(whoknows_impact(
               coalesce(cardinality(array_positions(u.weights, 'A')), 0),
               cardinality(u.positions) - coalesce(cardinality(array_positions(u.weights, 'A')), 0),
               s.body_length, %(average_length)s) ORDER BY q.term) AS impacts
    -- Only the query's lexemes are unnested: the vector less every other
    -- lexeme (two ts_delete passes, in C), not every lexeme with its
    -- positions, then joined to the query. For 10 random pages of bench/'s
    -- 100k corpus (PG 15): 1.1-1.6 ms a call before, 0.73 ms after, the
    -- same rows.
    FROM unnest(ts_delete(s.search, tsvector_to_array(ts_delete(s.search, %(lexemes)s::text[])))) AS u
    JOIN query AS q ON q.lexeme = u.lexeme
) AS t ON true
