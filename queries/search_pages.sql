-- Returns one page of results (id, title, url, language, last_updated,
-- snippet) for a search in one language, and on every row the number of
-- matching pages found (total, at most %(cap)s) and whether the search
-- stopped at that cap (capped).
--
-- Candidates come in tiers, and the search stops collecting at %(cap)s rows,
-- so a very common word costs about what a rare one does: 0 = the title
-- matches the whole query, 1 = the page matches it, 2 = the page matches the
-- words as prefixes ('javascr:*'), 3 = the title contains the text. A page
-- counts in its best tier. Title matches rank by how much of the title the
-- query covers (ts_rank_cd over the small title vector, divided by
-- 1 + log(title length): "Time" above "Letter Time Name"); the other tiers by
-- ts_rank_cd over the page. Ties break on id, so paging is stable.
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
found AS (
    SELECT id, tier, rank
    FROM (
        (SELECT p.id, 0 AS tier, ts_rank_cd(p.title_search, query.words, 1) AS rank
         FROM pages AS p, query
         WHERE p.language = %(language)s AND p.title_search @@ query.words)
        UNION ALL
        (SELECT p.id, 1, ts_rank_cd(p.search, query.words || query.prefix)
         FROM pages AS p, query
         WHERE p.language = %(language)s AND p.search @@ query.words)
        UNION ALL
        (SELECT p.id, 2, ts_rank_cd(p.search, query.words || query.prefix)
         FROM pages AS p, query
         WHERE p.language = %(language)s AND p.search @@ query.prefix)
        UNION ALL
        (SELECT p.id, 3, ts_rank_cd(p.search, query.words || query.prefix)
         FROM pages AS p, query
         WHERE p.language = %(language)s AND p.title ILIKE %(title_pattern)s)
    ) AS tiers
    LIMIT %(cap)s
),
ranked AS (
    SELECT id, tier, rank, count(*) OVER () AS total
    FROM (SELECT DISTINCT ON (id) id, tier, rank FROM found ORDER BY id, tier) AS best
    ORDER BY tier, rank DESC, id
    LIMIT %(limit)s OFFSET %(offset)s
)
SELECT p.id, p.title, p.url, p.language, p.last_updated, ranked.total,
       (SELECT count(*) FROM found) >= %(cap)s AS capped,
       ts_headline(%(config)s::regconfig,
                   substr(p.content,
                          greatest(1, coalesce(least(nullif(strpos(p.content, (%(locate_words)s::text[])[1]), 0),
                                                     nullif(strpos(p.content, (%(locate_words)s::text[])[2]), 0),
                                                     nullif(strpos(p.content, (%(locate_words)s::text[])[3]), 0)),
                                               nullif(strpos(lower(p.content), (%(locate_words)s::text[])[1]), 0), 1)
                                      - %(snippet_lead)s),
                          %(snippet_chars)s),
                   query.words || query.prefix,
                   'MaxWords=35, MinWords=15, MaxFragments=2, FragmentDelimiter=" … ", '
                   || 'StartSel=' || %(start_sel)s || ', StopSel=' || %(stop_sel)s) AS snippet
FROM ranked
JOIN pages AS p ON p.id = ranked.id
CROSS JOIN query
ORDER BY ranked.tier, ranked.rank DESC, ranked.id
