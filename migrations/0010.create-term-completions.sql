-- depends: 0009.create-crawl-frontier
-- The most frequent completions of each short prefix, so that a partial last
-- word of two or three letters ('wo') does not scan every lexeme that starts
-- with it for the few it keeps: at a million pages, 'wo' has 1,639, and that
-- scan cost 0.7 ms of a 4.3 ms search (bench/README.md).
--
-- lexemes: the prefix's most frequent lexemes in term_stats (df, then the
-- lexeme, as the search orders them), as many as the search expands a
-- prefix to. floor_df: the df of the last one when the list is full, else 0;
-- a lexeme not listed may only belong in the list once its df reaches it.
--
-- A row is computed from term_stats whole; app.py recomputes every row at a
-- full build and, when it indexes a segment, the rows a lexeme of the segment
-- may now belong to. A prefix with no row (a longer one, or none computed yet,
-- as right after this migration) is looked up in term_stats, as before.
CREATE TABLE term_completions (
    language text NOT NULL,
    prefix   text COLLATE "C" NOT NULL,
    lexemes  text[] COLLATE "C" NOT NULL,
    floor_df integer NOT NULL,
    PRIMARY KEY (language, prefix)
);

-- The first string after every string that starts with prefix, in code
-- point order (the C collation's): the prefix's lexemes are those from
-- prefix up to it: the prefix without its trailing last code points (U+10FFFF),
-- with its last character the next one (skipping the surrogates). NULL when it
-- is only last code points. app.py's prefix_range computes the same in Python.
CREATE FUNCTION whoknows_prefix_end(prefix text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN stem = '' THEN NULL
        WHEN ascii(right(stem, 1)) + 1 BETWEEN 55296 AND 57343 THEN left(stem, -1) || chr(57344)
        ELSE left(stem, -1) || chr(ascii(right(stem, 1)) + 1)
    END
    FROM (SELECT rtrim(prefix, chr(1114111)) AS stem) AS s
$$;
