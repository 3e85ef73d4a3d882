-- Recounts every lexeme's document frequency and level spread from the
-- postings (a full build: every page is in exactly one live segment);
-- returns nothing.
INSERT INTO term_stats (language, lexeme, df, levels, level_counts)
SELECT language, lexeme, sum(n)::integer, array_agg(level ORDER BY level DESC), array_agg(n ORDER BY level DESC)
FROM (
    SELECT language, lexeme, level, sum(count)::integer AS n
    FROM postings
    GROUP BY language, lexeme, level
) AS per_level
GROUP BY language, lexeme
