-- Returns one page of results (id, title, url, language, last_updated,
-- snippet) for a search in one language, and on every row the number of
-- matching pages found (total, at most %(cap)s) and whether there are more
-- (capped).
--
-- Candidates come in tiers, and the search stops collecting after %(cap)s + 1
-- pages, so a very common word costs about what a rare one does: 0 = the
-- title matches the whole query, 1 = the page matches it, 2 = the page matches
-- the words as prefixes ('javascr:*'), 3 = the title contains the text. The
-- tiers are disjoint, so every candidate is a different page: each leaves out
-- the title matches (a cheap test of the small title vector) and the pages of
-- the tiers before it. A tier runs only while the cap is not reached (LIMIT 0
-- does not run its scan), so when it runs, the tiers before it are complete.
-- Title matches rank by how much of the title the query covers (ts_rank_cd
-- over the title vector, divided by 1 + log(title length): "Time" above
-- "Letter Time Name"); the other tiers by ts_rank_cd over the page. Ties
-- break on id, so paging is stable.
--
-- The snippet is computed for the returned rows only, over %(snippet_chars)s
-- characters from %(snippet_lead)s before the first word that starts with the
-- first query word in lower case, capitalised or in capitals
-- (%(locate_words)s: " time", " Time", " TIME"; three plain strpos calls, far
-- cheaper than lower() over the page, which runs only when they all miss, as
-- for "JavaScript"; else the page's start), and marks matches with
-- %(start_sel)s / %(stop_sel)s.
-- ts_headline's cost grows with its input.
WITH query AS (
    SELECT websearch_to_tsquery(%(config)s::regconfig, %(q)s) AS words,
           to_tsquery(%(config)s::regconfig, %(prefix)s) AS prefix
),
tier0 AS MATERIALIZED (
    SELECT p.id, 0 AS tier, ts_rank_cd(p.title_search, query.words, 1) AS rank
    FROM pages AS p, query
    WHERE p.language = %(language)s AND p.title_search @@ query.words
    LIMIT %(cap)s + 1
),
tier1 AS MATERIALIZED (
    SELECT p.id, 1 AS tier, ts_rank_cd(p.search, query.words || query.prefix) AS rank
    FROM pages AS p, query
    WHERE p.language = %(language)s AND p.search @@ query.words AND NOT p.title_search @@ query.words
    LIMIT %(cap)s + 1 - (SELECT count(*) FROM tier0)
),
tier2 AS MATERIALIZED (
    SELECT p.id, 2 AS tier, ts_rank_cd(p.search, query.words || query.prefix) AS rank
    FROM pages AS p, query
    WHERE p.language = %(language)s AND p.search @@ query.prefix AND NOT p.title_search @@ query.words
      AND p.id NOT IN (SELECT id FROM tier1)
    LIMIT %(cap)s + 1 - (SELECT count(*) FROM tier0) - (SELECT count(*) FROM tier1)
),
tier3 AS MATERIALIZED (
    SELECT p.id, 3 AS tier, ts_rank_cd(p.search, query.words || query.prefix) AS rank
    FROM pages AS p, query
    WHERE p.language = %(language)s AND p.title ILIKE %(title_pattern)s AND NOT p.title_search @@ query.words
      AND p.id NOT IN (SELECT id FROM tier1) AND p.id NOT IN (SELECT id FROM tier2)
    LIMIT %(cap)s + 1 - (SELECT count(*) FROM tier0) - (SELECT count(*) FROM tier1) - (SELECT count(*) FROM tier2)
),
found AS (
    SELECT * FROM tier0 UNION ALL SELECT * FROM tier1 UNION ALL SELECT * FROM tier2 UNION ALL SELECT * FROM tier3
),
ranked AS (
    SELECT id, tier, rank, count(*) OVER () AS found
    FROM found
    ORDER BY tier, rank DESC, id
    LIMIT %(limit)s OFFSET %(offset)s
)
SELECT p.id, p.title, p.url, p.language, p.last_updated,
       least(ranked.found, %(cap)s) AS total, ranked.found > %(cap)s AS capped,
       ts_headline(%(config)s::regconfig,
                   substr(body.text,
                          greatest(1, coalesce(least(nullif(strpos(body.text, (%(locate_words)s::text[])[1]), 0),
                                                     nullif(strpos(body.text, (%(locate_words)s::text[])[2]), 0),
                                                     nullif(strpos(body.text, (%(locate_words)s::text[])[3]), 0)),
                                               nullif(strpos(lower(body.text), (%(locate_words)s::text[])[1]), 0), 1)
                                      - %(snippet_lead)s),
                          %(snippet_chars)s),
                   query.words || query.prefix,
                   'MaxWords=35, MinWords=15, MaxFragments=2, FragmentDelimiter=" … ", '
                   || 'StartSel=' || %(start_sel)s || ', StopSel=' || %(stop_sel)s) AS snippet
FROM ranked
JOIN pages AS p ON p.id = ranked.id
-- The page read from TOAST and decompressed once (OFFSET 0 keeps the
-- subquery apart), not once for each strpos and substr below.
CROSS JOIN LATERAL (SELECT left(p.content, 20000) AS text OFFSET 0) AS body
CROSS JOIN query
ORDER BY ranked.tier, ranked.rank DESC, ranked.id
