-- Returns the lexemes of a search: for each word of %(words)s (its group in
-- %(word_groups)s), the lexemes the language's config makes of it; and
-- for the prefix group %(prefix_group)s, the %(expansions)s most frequent
-- lexemes that start with %(prefix_pattern)s (a LIKE pattern). Each with its
-- document frequency (df), its postings' counts by impact level (best level
-- first), and the language's page count, the average body length that the
-- index uses, whether any dead postings exist (has_dead), and whether any
-- page waits in the index queue (has_queued).
WITH words AS (
    SELECT w.grp, v.lexeme COLLATE "C" AS lexeme, false AS completion
    FROM unnest(%(words)s::text[], %(word_groups)s::integer[]) AS w(word, grp),
         unnest(to_tsvector(%(config)s::regconfig, w.word)) AS v
    UNION ALL
    SELECT %(prefix_group)s::integer, c.lexeme, true
    FROM (
        SELECT lexeme FROM term_stats
        WHERE language = %(language)s AND lexeme LIKE %(prefix_pattern)s AND df > 0
        ORDER BY df DESC, lexeme
        LIMIT %(expansions)s
    ) AS c
)
SELECT w.grp, w.lexeme, w.completion, coalesce(t.df, 0) AS df, t.levels, t.level_counts,
       s.pages AS corpus_pages, s.average_length,
       EXISTS (SELECT 1 FROM dead_postings) AS has_dead, EXISTS (SELECT 1 FROM index_queue) AS has_queued
FROM words AS w
LEFT JOIN term_stats AS t ON t.language = %(language)s AND t.lexeme = w.lexeme
LEFT JOIN corpus_stats AS s ON s.language = %(language)s
ORDER BY w.grp, w.completion, w.lexeme
