-- Returns what a results page shows of the pages %(page_ids)s, in that
-- order: title, url, language, last_updated and a snippet with the query's
-- lexemes (%(lexemes)s) marked by %(start_sel)s / %(stop_sel)s.
--
-- The snippet is ts_headline over %(snippet_chars)s characters from
-- %(snippet_lead)s before the first word that starts with the first query
-- word in lower case, capitalised or in capitals (%(locate_words)s: " time",
-- " Time", " TIME"; three plain strpos calls, far cheaper than lower() over
-- the page, which runs only when they all miss, as for "JavaScript"; else
-- the page's start). ts_headline's cost grows with its input.
WITH query AS (
    SELECT coalesce((SELECT string_agg(quote_literal(lexeme), ' | ') FROM unnest(%(lexemes)s::text[]) AS lexeme), '')::tsquery
        AS words
),
chosen AS (
    SELECT page_id, place FROM unnest(%(page_ids)s::bigint[]) WITH ORDINALITY AS c(page_id, place)
)
SELECT p.id, p.title, p.url, p.language, p.last_updated,
       ts_headline(%(config)s::regconfig,
                   substr(body.text,
                          greatest(1, coalesce(least(nullif(strpos(body.text, (%(locate_words)s::text[])[1]), 0),
                                                     nullif(strpos(body.text, (%(locate_words)s::text[])[2]), 0),
                                                     nullif(strpos(body.text, (%(locate_words)s::text[])[3]), 0)),
                                               nullif(strpos(lower(body.text), (%(locate_words)s::text[])[1]), 0), 1)
                                      - %(snippet_lead)s),
                          %(snippet_chars)s),
                   query.words,
                   'MaxWords=35, MinWords=15, MaxFragments=2, FragmentDelimiter=" … ", '
                   || 'StartSel=' || %(start_sel)s || ', StopSel=' || %(stop_sel)s) AS snippet
FROM chosen
JOIN pages AS p ON p.id = chosen.page_id
-- The page read from TOAST and decompressed once (OFFSET 0 keeps the
-- subquery apart), not once for each strpos and substr.
CROSS JOIN LATERAL (SELECT left(p.content, 20000) AS text OFFSET 0) AS body
CROSS JOIN query
ORDER BY chosen.place
