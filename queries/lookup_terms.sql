-- Returns the lexemes of a search: for each word of %(words)s (its group in
-- %(word_groups)s), the lexemes the language's config makes of it; and
-- for the prefix group %(prefix_group)s, the %(expansions)s most frequent
-- lexemes from %(prefix_low)s up to %(prefix_high)s (those that start with
-- the prefix: a range, which a generic plan can use the key for), or the
-- ones term_completions lists when it has a row for the prefix (a short one).
-- Each with its document frequency (df), its postings' counts by impact level
-- (best level first), and the language's page count, the average body length that the
-- index uses, whether any dead postings exist (has_dead), and whether any
-- page waits in the index queue (has_queued), and whether the lexeme is all
-- that an excluded word of %(excluded)s makes (excluded): no page with it can
-- be a result, so the search leaves it out, and its postings are not read.
--
-- With them, the first round of its postings (fetch_postings), so that a
-- search starts with one round trip less: the levels from the best down to
-- first_level, the first at which the counts reach %(depth)s entries (0: all
-- of them), as the segments and array_send entries of each row read. The
-- completions of the prefix share that depth (share: how many there are,
-- 1 for a word typed): eight of them read about what one word does, and the
-- search reads on in those that can score most (Ranker.plan in app.py).
WITH words AS (
    SELECT w.grp, v.lexeme COLLATE "C" AS lexeme, false AS completion
    FROM unnest(%(words)s::text[], %(word_groups)s::integer[]) AS w(word, grp),
         unnest(to_tsvector(%(config)s::regconfig, w.word)) AS v
    UNION ALL
    SELECT %(prefix_group)s::integer, c.lexeme, true
    FROM (
        SELECT unnest(lexemes[1:%(expansions)s]) AS lexeme
        FROM term_completions
        WHERE language = %(language)s AND prefix = %(prefix_low)s
        UNION ALL
        (SELECT lexeme FROM term_stats
         WHERE language = %(language)s AND lexeme >= %(prefix_low)s AND lexeme < %(prefix_high)s AND df > 0
           AND NOT EXISTS (SELECT FROM term_completions WHERE language = %(language)s AND prefix = %(prefix_low)s)
         ORDER BY df DESC, lexeme
         LIMIT %(expansions)s)
    ) AS c
),
shared AS (
    SELECT w.*, CASE WHEN w.completion THEN count(*) FILTER (WHERE w.completion) OVER () ELSE 1 END AS share,
           w.lexeme IN (SELECT (tsvector_to_array(v))[1]
                        FROM unnest(%(excluded)s::text[]) AS x(word),
                             to_tsvector(%(config)s::regconfig, x.word) AS v
                        WHERE length(v) = 1) AS excluded
    FROM words AS w
)
SELECT w.grp, w.lexeme, w.completion, coalesce(t.df, 0) AS df, t.levels, t.level_counts,
       s.pages AS corpus_pages, s.average_length,
       EXISTS (SELECT 1 FROM dead_postings) AS has_dead, EXISTS (SELECT 1 FROM index_queue) AS has_queued,
       first.level AS first_level, first.segments, first.chunks, w.excluded
FROM shared AS w
LEFT JOIN term_stats AS t ON t.language = %(language)s AND t.lexeme = w.lexeme
LEFT JOIN corpus_stats AS s ON s.language = %(language)s
LEFT JOIN LATERAL (
    SELECT coalesce((
        SELECT c.level
        FROM (SELECT l.level, l.n, sum(l.count) OVER (ORDER BY l.n) AS total
              FROM unnest(t.levels, t.level_counts) WITH ORDINALITY AS l(level, count, n)) AS c
        WHERE c.total * w.share >= %(depth)s
        ORDER BY c.n
        LIMIT 1
    ), 0) AS level
) AS plan ON t.lexeme IS NOT NULL AND NOT w.excluded
LEFT JOIN LATERAL (
    SELECT plan.level, array_agg(p.segment) AS segments, array_agg(array_send(p.entries)) AS chunks
    FROM postings AS p
    WHERE p.language = %(language)s AND p.lexeme = w.lexeme AND p.level >= plan.level
) AS first ON plan.level IS NOT NULL
ORDER BY w.grp, w.completion, w.lexeme
