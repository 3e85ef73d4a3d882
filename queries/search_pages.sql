-- Returns one page of results (id, title, url, language, last_updated,
-- snippet) for a search in one language, and on every row the number of
-- matching pages found (total, at most %(cap)s) and whether the search
-- stopped at that cap (capped).
--
-- Candidates come in tiers, and the search stops collecting at %(cap)s rows,
-- so a very common word costs about what a rare one does: 0 = the title
-- matches the whole query, 1 = the page matches it, 2 = the page matches the
-- words as prefixes ('javascr:*'), 3 = the title contains the text. Within a
-- tier, pages rank by ts_rank_cd; ties break on id so paging is stable. The
-- snippet marks matches with %(start_sel)s / %(stop_sel)s and is computed for
-- the returned rows only, over %(snippet_chars)s characters from just before
-- the first occurrence of %(locate)s (ts_headline's cost grows with its input).
WITH query AS (
    SELECT websearch_to_tsquery(%(config)s::regconfig, %(q)s) AS words,
           to_tsquery(%(config)s::regconfig, %(prefix)s) AS prefix
),
found AS (
    SELECT id, tier
    FROM (
        (SELECT p.id, 0 AS tier FROM pages AS p, query
         WHERE p.language = %(language)s AND p.title_search @@ query.words)
        UNION ALL
        (SELECT p.id, 1 FROM pages AS p, query
         WHERE p.language = %(language)s AND p.search @@ query.words)
        UNION ALL
        (SELECT p.id, 2 FROM pages AS p, query
         WHERE p.language = %(language)s AND p.search @@ query.prefix)
        UNION ALL
        (SELECT p.id, 3 FROM pages AS p
         WHERE p.language = %(language)s AND p.title ILIKE %(title_pattern)s)
    ) AS tiers
    LIMIT %(cap)s
),
ranked AS (
    SELECT p.id, p.title, p.url, p.language, p.last_updated, p.content, best.tier,
           ts_rank_cd(p.search, query.words || query.prefix) AS rank,
           count(*) OVER () AS total
    FROM (SELECT id, min(tier) AS tier FROM found GROUP BY id) AS best
    JOIN pages AS p ON p.id = best.id, query
    ORDER BY best.tier, rank DESC, p.id
    LIMIT %(limit)s OFFSET %(offset)s
)
SELECT ranked.id, ranked.title, ranked.url, ranked.language, ranked.last_updated, ranked.total,
       (SELECT count(*) FROM found) >= %(cap)s AS capped,
       ts_headline(%(config)s::regconfig,
                   substr(ranked.content,
                          greatest(1, strpos(lower(left(ranked.content, 20000)), %(locate)s) - 120),
                          %(snippet_chars)s),
                   query.words || query.prefix,
                   'MaxWords=35, MinWords=15, MaxFragments=2, FragmentDelimiter=" … ", '
                   || 'StartSel=' || %(start_sel)s || ', StopSel=' || %(stop_sel)s) AS snippet
FROM ranked, query
ORDER BY ranked.tier, ranked.rank DESC, ranked.id
