-- Returns the top %(limit)s pages of a search by the ranking function
-- evaluated on every page of the language from the page's own vector: no
-- index, no pruning (python app.py search --from-vectors, and the tests,
-- check the fast path against it). Columns and order as rank_candidates:
-- matched (the groups that occur), low (the score), pages matching every
-- group first, then by score, then by id. Pages failing a required phrase
-- or containing an excluded word are left out.
WITH query AS (
    SELECT lexeme, weight, grp
    FROM unnest(%(lexemes)s::text[], %(weights)s::float8[], %(groups)s::integer[]) AS q(lexeme, weight, grp)
),
matching AS MATERIALIZED (
    SELECT p.id, p.search || ''::tsvector AS search
    FROM pages AS p
    WHERE p.language = %(language)s AND tsvector_to_array(p.search) && %(lexemes)s::text[]
),
kept AS MATERIALIZED (
    SELECT m.id, m.search, whoknows_body_length(m.search) AS body_length
    FROM matching AS m
    WHERE (SELECT coalesce(bool_and(m.search @@ phraseto_tsquery(%(config)s::regconfig, phrase)), true)
           FROM unnest(%(phrases)s::text[]) AS phrase)
      AND NOT (SELECT coalesce(bool_or(m.search @@ plainto_tsquery(%(config)s::regconfig, word)), false)
               FROM unnest(%(excluded)s::text[]) AS word)
),
best AS (
    SELECT k.id, q.grp,
           max(q.weight * whoknows_impact(
               coalesce(cardinality(array_positions(u.weights, 'A')), 0),
               cardinality(u.positions) - coalesce(cardinality(array_positions(u.weights, 'A')), 0),
               k.body_length, %(average_length)s)) AS score
    FROM kept AS k
    CROSS JOIN LATERAL unnest(k.search) AS u
    JOIN query AS q ON q.lexeme = u.lexeme
    GROUP BY k.id, q.grp
)
SELECT id AS page_id, sum(score) AS low, bit_or(1::bigint << grp) AS matched
FROM best
GROUP BY id
ORDER BY count(*) = %(group_count)s DESC, sum(score) DESC, id
LIMIT %(limit)s
