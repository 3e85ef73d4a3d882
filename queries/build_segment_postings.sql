-- Writes the postings of the pages in index_batch into segment %(segment)s:
-- for each language, lexeme and impact level (impact / 256), the pages'
-- entries (a short list in one row, below), packed as page id * 2^32 +
-- impact * 2^16 + floor, where floor is the lowest impact any lexeme of
-- that page can have (one title or one body occurrence): a search that has read a lexeme's postings down to below a
-- page's floor without meeting the page knows the page lacks the lexeme.
-- Impacts use the page language's average body length in corpus_stats. A
-- lexeme seen once in the body (most of them) gets the page's
-- single-occurrence impact, computed once per page. Grouping by lexeme
-- first, then by level within each lexeme, keeps the hash aggregate small.
INSERT INTO postings (language, lexeme, level, segment, count, entries)
SELECT term.language, term.lexeme, part.level, %(segment)s, part.count, part.entries
FROM (
    SELECT p.language, u.lexeme,
           array_agg(p.id * 4294967296 + 65536 * CASE
               WHEN cardinality(u.positions) = 1 AND u.weights[1] <> 'A' THEN size.single
               ELSE whoknows_impact(coalesce(cardinality(array_positions(u.weights, 'A')), 0),
                                    cardinality(u.positions) - coalesce(cardinality(array_positions(u.weights, 'A')), 0),
                                    size.body_length, s.average_length)
           END + size.floor) AS entries
    FROM index_batch AS b
    JOIN pages AS p ON p.id = b.page_id
    JOIN corpus_stats AS s ON s.language = p.language
    -- An aggregate, so that the planner keeps it apart: the page is measured
    -- once, not once per posting.
    CROSS JOIN LATERAL (
        SELECT max(body_length) AS body_length,
               max(whoknows_impact(0, 1, body_length, s.average_length)) AS single,
               max(least(whoknows_impact(0, 1, body_length, s.average_length),
                         whoknows_impact(1, 0, body_length, s.average_length))) AS floor
        FROM (SELECT whoknows_body_length(p.search) AS body_length) AS measured
    ) AS size
    CROSS JOIN LATERAL unnest(p.search) AS u
    GROUP BY p.language, u.lexeme
) AS term
CROSS JOIN LATERAL (
    -- A list of at least %(whole_below)s entries is split by impact level,
    -- a shorter one (most lexemes) is one row at its best level: a search
    -- reads it whole at once, and the index has far fewer rows to write.
    SELECT ((e >> 24) & 255)::smallint AS level, count(*)::integer AS count, array_agg(e) AS entries
    FROM unnest(term.entries) AS e
    WHERE cardinality(term.entries) >= %(whole_below)s
    GROUP BY 1
    UNION ALL
    SELECT max((e >> 24) & 255)::smallint, count(*)::integer, array_agg(e)
    FROM unnest(term.entries) AS e
    WHERE cardinality(term.entries) < %(whole_below)s
    HAVING count(*) > 0
) AS part
