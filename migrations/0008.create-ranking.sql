-- depends: 0007.create-search-log
-- BM25F ranking over our own impact-ordered index.
--
-- Every (page, lexeme) pair has an impact: the BM25F term-frequency part of
-- its score, from the title and body term frequencies and the page's body
-- length, as a whole number 0..29999 (whoknows_impact). A search multiplies
-- impacts by each term's IDF, which comes from term_stats and corpus_stats:
-- those follow every write to pages (the triggers below), so document
-- frequencies and page counts are always current.
--
-- postings holds every pair once, grouped into rows by (language, lexeme,
-- impact level, segment): level = impact / 256, so the rows of one lexeme,
-- read from the highest level down, give its pages best first, and the level
-- of the first row not read bounds every impact not read. A segment is one
-- batch of pages indexed together (an import, a crawler's batch); a page's
-- live postings are in the segment page_segments names, and the pairs
-- (segment, page) in dead_postings are left over from a page that changed or
-- went away since. index_queue lists the pages that have no live postings
-- (new or changed): searches score those from their own vectors until the
-- next index build takes them.
--
-- Title uniqueness goes: web pages share titles ("Home"), and so do 29 of the
-- CISI test collection's abstracts.

ALTER TABLE pages DROP CONSTRAINT pages_title_key;
-- Title matches now count through BM25F (the 'A' weight of search); the
-- page-wide GIN index is replaced by postings.
DROP INDEX pages_search_idx;
ALTER TABLE pages DROP COLUMN title_search;

-- The length of a page, for BM25's length normalisation: the number of
-- distinct lexemes in its vector (title and body). Counting every position
-- instead scored a little better on CISI, but costs an unnest of the whole
-- vector per page, at every index build and every page scored from its
-- vector; length() reads the vector's header.
CREATE FUNCTION whoknows_body_length(vector tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT length(vector)
$$;

-- BM25F's term-frequency part, in 0..29999: title occurrences count three
-- times (not length-normalised: titles are short), body occurrences are
-- normalised by the page length against the average (b = 0.75), and the sum
-- saturates with k1 = 2.5 (Lucene's form, without BM25's constant (k1 + 1)
-- factor). These values scored best on the CISI collection (bench/README.md
-- has the figures). One expression, so that PostgreSQL inlines it, in
-- float8 throughout (0.75 alone is numeric, whose arithmetic per posting
-- was a large part of an index build).
CREATE FUNCTION whoknows_impact(tf_title integer, tf_body integer, body_length integer, average_length float8)
RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT round(30000 * (3 * tf_title + tf_body / (0.25 + 0.75::float8 * body_length / average_length))
                 / (3 * tf_title + tf_body / (0.25 + 0.75::float8 * body_length / average_length) + 2.5))::smallint
$$;

-- Per language: how many pages there are (exact, kept by the triggers), and
-- the average body length that the impacts in postings were computed with,
-- fixed at each full index build so that all segments agree, with the page
-- count at that build (average_pages: a full build follows when the count
-- has moved by more than a quarter since).
CREATE TABLE corpus_stats (
    language       text PRIMARY KEY,
    pages          bigint NOT NULL DEFAULT 0,
    average_length float8,
    average_pages  bigint
);

-- Document frequency per lexeme (exact, kept by the triggers), and how its
-- postings spread over the impact levels (levels, best first, with the
-- number of entries at each; refreshed when segments are built, for
-- planning only). The C collation lets a prefix (LIKE 'gover%') use the
-- primary key.
CREATE TABLE term_stats (
    language     text NOT NULL,
    lexeme       text COLLATE "C" NOT NULL,
    df           integer NOT NULL,
    levels       smallint[],
    level_counts integer[],
    PRIMARY KEY (language, lexeme)
);

CREATE TABLE index_segments (
    id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pages    integer NOT NULL,
    built_at timestamptz NOT NULL DEFAULT now()
);

-- entries packs each page with its impact and its floor (the lowest impact
-- any lexeme of the page can have): page id * 2^32 + impact * 2^16 + floor.
-- A row holds one impact level of a lexeme in a segment, or all of a short
-- list at its best level (every entry of a row is at most its level). No
-- foreign key to index_segments: checking it for every row cost a quarter of
-- an index build; delete_index_segments deletes a segment's postings itself.
CREATE TABLE postings (
    language text NOT NULL,
    lexeme   text COLLATE "C" NOT NULL,
    level    smallint NOT NULL,
    segment  integer NOT NULL,
    count    integer NOT NULL,
    entries  bigint[] NOT NULL,
    PRIMARY KEY (language, lexeme, level, segment)
);
CREATE INDEX postings_segment_idx ON postings (segment);

CREATE TABLE page_segments (
    page_id bigint PRIMARY KEY,
    segment integer NOT NULL REFERENCES index_segments (id) ON DELETE CASCADE
);
CREATE INDEX page_segments_segment_idx ON page_segments (segment);

CREATE TABLE dead_postings (
    segment integer NOT NULL REFERENCES index_segments (id) ON DELETE CASCADE,
    page_id bigint NOT NULL,
    PRIMARY KEY (segment, page_id)
);

CREATE TABLE index_queue (
    page_id  bigint PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- The triggers: statement-level, with transition tables, so a statement
-- that writes many pages costs one aggregate, not one call per row. A bulk
-- import disables them for its transaction (ALTER TABLE ... DISABLE TRIGGER
-- USER; PostgreSQL would otherwise still copy every written row into the
-- transition tables) and rebuilds the statistics and the whole index itself.

CREATE FUNCTION whoknows_pages_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO index_queue (page_id) SELECT id FROM new_pages ON CONFLICT DO NOTHING;
    INSERT INTO corpus_stats AS c (language, pages)
    SELECT language, count(*) FROM new_pages GROUP BY language
    ON CONFLICT (language) DO UPDATE SET pages = c.pages + excluded.pages;
    -- In key order, so that concurrent writers lock term_stats rows in one order.
    INSERT INTO term_stats AS t (language, lexeme, df)
    SELECT language, lexeme, count(*)
    FROM new_pages, unnest(tsvector_to_array(search)) AS lexeme
    GROUP BY language, lexeme
    ORDER BY language, lexeme COLLATE "C"
    ON CONFLICT (language, lexeme) DO UPDATE SET df = t.df + excluded.df;
    RETURN NULL;
END
$$;

CREATE FUNCTION whoknows_pages_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A changed page's postings describe its old text: they die now, and the
    -- page waits in the queue, where searches score it from its new text.
    WITH changed AS (
        SELECT n.id FROM new_pages AS n JOIN old_pages AS o USING (id)
        WHERE n.search IS DISTINCT FROM o.search OR n.language IS DISTINCT FROM o.language
    ), queued AS (
        INSERT INTO index_queue (page_id) SELECT id FROM changed ON CONFLICT DO NOTHING
    ), unassigned AS (
        DELETE FROM page_segments AS s USING changed AS c WHERE s.page_id = c.id RETURNING s.segment, s.page_id
    )
    INSERT INTO dead_postings (segment, page_id) SELECT segment, page_id FROM unassigned ON CONFLICT DO NOTHING;
    INSERT INTO corpus_stats AS c (language, pages)
    SELECT language, sum(delta) FROM (
        SELECT n.language, 1 AS delta FROM new_pages AS n JOIN old_pages AS o USING (id) WHERE n.language <> o.language
        UNION ALL
        SELECT o.language, -1 FROM new_pages AS n JOIN old_pages AS o USING (id) WHERE n.language <> o.language
    ) AS moves
    GROUP BY language
    ON CONFLICT (language) DO UPDATE SET pages = c.pages + excluded.pages;
    INSERT INTO term_stats AS t (language, lexeme, df)
    SELECT language, lexeme, sum(delta)::integer FROM (
        SELECT n.language, lexeme, 1 AS delta
        FROM new_pages AS n JOIN old_pages AS o USING (id), unnest(tsvector_to_array(n.search)) AS lexeme
        WHERE n.search IS DISTINCT FROM o.search OR n.language <> o.language
        UNION ALL
        SELECT o.language, lexeme, -1
        FROM new_pages AS n JOIN old_pages AS o USING (id), unnest(tsvector_to_array(o.search)) AS lexeme
        WHERE n.search IS DISTINCT FROM o.search OR n.language <> o.language
    ) AS changes
    GROUP BY language, lexeme
    HAVING sum(delta) <> 0
    ORDER BY language, lexeme COLLATE "C"
    ON CONFLICT (language, lexeme) DO UPDATE SET df = t.df + excluded.df;
    RETURN NULL;
END
$$;

CREATE FUNCTION whoknows_pages_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dead_postings (segment, page_id)
    SELECT s.segment, s.page_id FROM page_segments AS s JOIN old_pages AS o ON o.id = s.page_id
    ON CONFLICT DO NOTHING;
    DELETE FROM page_segments AS s USING old_pages AS o WHERE s.page_id = o.id;
    DELETE FROM index_queue AS q USING old_pages AS o WHERE q.page_id = o.id;
    INSERT INTO corpus_stats AS c (language, pages)
    SELECT language, -count(*) FROM old_pages GROUP BY language
    ON CONFLICT (language) DO UPDATE SET pages = c.pages + excluded.pages;
    INSERT INTO term_stats AS t (language, lexeme, df)
    SELECT language, lexeme, -count(*)
    FROM old_pages, unnest(tsvector_to_array(search)) AS lexeme
    GROUP BY language, lexeme
    ORDER BY language, lexeme COLLATE "C"
    ON CONFLICT (language, lexeme) DO UPDATE SET df = t.df + excluded.df;
    RETURN NULL;
END
$$;

CREATE TRIGGER pages_inserted AFTER INSERT ON pages
    REFERENCING NEW TABLE AS new_pages FOR EACH STATEMENT EXECUTE FUNCTION whoknows_pages_inserted();
CREATE TRIGGER pages_updated AFTER UPDATE ON pages
    REFERENCING OLD TABLE AS old_pages NEW TABLE AS new_pages FOR EACH STATEMENT EXECUTE FUNCTION whoknows_pages_updated();
CREATE TRIGGER pages_deleted AFTER DELETE ON pages
    REFERENCING OLD TABLE AS old_pages FOR EACH STATEMENT EXECUTE FUNCTION whoknows_pages_deleted();

-- The pages already stored: their statistics, and all of them queued for
-- indexing (python app.py migrate builds the index right after).
INSERT INTO corpus_stats (language, pages) SELECT language, count(*) FROM pages GROUP BY language;
INSERT INTO term_stats (language, lexeme, df)
SELECT language, lexeme, count(*) FROM pages, unnest(tsvector_to_array(search)) AS lexeme GROUP BY 1, 2;
INSERT INTO index_queue (page_id) SELECT id FROM pages;
