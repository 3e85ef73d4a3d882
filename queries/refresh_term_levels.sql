-- Recomputes, for the lexemes that segment %(segment)s holds (every lexeme
-- when it is NULL), how their postings spread over the impact levels
-- (term_stats.levels and level_counts, best level first); returns nothing.
UPDATE term_stats AS t
SET levels = h.levels, level_counts = h.level_counts
FROM (
    SELECT language, lexeme, array_agg(level ORDER BY level DESC) AS levels,
           array_agg(n ORDER BY level DESC) AS level_counts
    FROM (
        SELECT p.language, p.lexeme, p.level, sum(p.count)::integer AS n
        FROM postings AS p
        WHERE %(segment)s::integer IS NULL
           OR (p.language, p.lexeme) IN (SELECT language, lexeme FROM postings WHERE segment = %(segment)s)
        GROUP BY p.language, p.lexeme, p.level
    ) AS per_level
    GROUP BY language, lexeme
) AS h
WHERE t.language = h.language AND t.lexeme = h.lexeme
