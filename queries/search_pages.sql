-- Returns one page of results (id, title, url, language, last_updated,
-- snippet) for a search in one language. Full-text matches of the whole query
-- come first (title matches above content matches, then by ts_rank_cd), then
-- pages that only match word prefixes, then pages whose title only contains
-- the text; ties break on id so paging is stable. The snippet is computed for
-- the returned rows only, with %(start_sel)s / %(stop_sel)s around matches.
WITH query AS (
    SELECT websearch_to_tsquery(%(config)s::regconfig, %(q)s) AS words,
           to_tsquery(%(config)s::regconfig, %(prefix)s) AS prefix
),
ranked AS (
    SELECT p.id, p.title, p.url, p.language, p.last_updated, p.content,
           CASE WHEN ts_filter(p.search, '{a}') @@ query.words THEN 0
                WHEN p.search @@ query.words THEN 1
                WHEN p.search @@ query.prefix THEN 2
                ELSE 3
           END AS tier,
           ts_rank_cd(p.search, query.words || query.prefix) AS rank
    FROM pages AS p, query
    WHERE p.language = %(language)s
      AND (p.search @@ query.words
           OR p.search @@ query.prefix
           OR p.title ILIKE %(title_pattern)s)
    ORDER BY tier, rank DESC, p.id
    LIMIT %(limit)s OFFSET %(offset)s
)
SELECT ranked.id, ranked.title, ranked.url, ranked.language, ranked.last_updated,
       ts_headline(%(config)s::regconfig, left(ranked.content, 20000),
                   query.words || query.prefix,
                   'MaxWords=35, MinWords=15, MaxFragments=2, FragmentDelimiter=" … ", '
                   || 'StartSel=' || %(start_sel)s || ', StopSel=' || %(stop_sel)s) AS snippet
FROM ranked, query
ORDER BY ranked.tier, ranked.rank DESC, ranked.id
