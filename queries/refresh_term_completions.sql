-- Recomputes term_completions for the prefixes of %(shortest)s to
-- %(longest)s characters: each one's %(expansions)s most frequent lexemes
-- (df, then lexeme, as lookup_terms orders a prefix's range); returns nothing.
-- Every prefix when %(segment)s is NULL (a full build, after term_stats is
-- recounted). Else only the prefixes that a lexeme of segment %(segment)s
-- may now belong to: no row yet, or the lexeme not listed with a df that
-- reaches the row's floor_df. A listed lexeme whose df grew stays listed,
-- so its row needs no change.
WITH candidates AS (
    SELECT DISTINCT t.language, left(t.lexeme, n.chars) AS prefix
    FROM term_stats AS t
    CROSS JOIN generate_series(%(shortest)s::integer, %(longest)s::integer) AS n(chars)
    LEFT JOIN term_completions AS c ON c.language = t.language AND c.prefix = left(t.lexeme, n.chars)
    WHERE length(t.lexeme) >= n.chars AND t.df > 0
      AND (%(segment)s::integer IS NULL
           OR (t.language, t.lexeme) IN (SELECT language, lexeme FROM postings WHERE segment = %(segment)s)
              AND (c.prefix IS NULL OR t.df >= c.floor_df AND t.lexeme <> ALL (c.lexemes)))
)
INSERT INTO term_completions (language, prefix, lexemes, floor_df)
SELECT s.language, s.prefix, top.lexemes,
       CASE WHEN cardinality(top.lexemes) < %(expansions)s THEN 0 ELSE top.floor_df END
FROM candidates AS s
CROSS JOIN LATERAL (
    SELECT array_agg(b.lexeme ORDER BY b.df DESC, b.lexeme) AS lexemes, min(b.df) AS floor_df
    FROM (
        SELECT t.lexeme, t.df
        FROM term_stats AS t
        WHERE t.language = s.language AND t.lexeme >= s.prefix AND t.lexeme < whoknows_prefix_end(s.prefix)
          AND t.df > 0
        ORDER BY t.df DESC, t.lexeme
        LIMIT %(expansions)s
    ) AS b
) AS top
WHERE whoknows_prefix_end(s.prefix) IS NOT NULL
ON CONFLICT (language, prefix) DO UPDATE SET lexemes = excluded.lexemes, floor_df = excluded.floor_df
