-- Returns the postings of some query terms between two impact levels: for
-- each term of %(lexemes)s (term, its 1-based place there) with rows at a
-- level from its %(min_levels)s up to, not including, its %(max_levels)s,
-- one row: the rows' segments, and their entries (page id * 2^32 +
-- impact * 2^16 + floor, see build_segment_postings) in the binary array
-- format (array_send), which the search joins and decodes in one step. A
-- search reads a term best level first, a band of levels at a time; one row
-- per term, not per posting row, since a term has a row per segment and level.
SELECT q.term::integer AS term, array_agg(p.segment) AS segments, array_agg(array_send(p.entries)) AS chunks
FROM unnest(%(lexemes)s::text[], %(min_levels)s::integer[], %(max_levels)s::integer[])
    WITH ORDINALITY AS q(lexeme, min_level, max_level, term)
JOIN postings AS p
  ON p.language = %(language)s AND p.lexeme = q.lexeme AND p.level >= q.min_level AND p.level < q.max_level
GROUP BY q.term
