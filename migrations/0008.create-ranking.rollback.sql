DROP TRIGGER pages_deleted ON pages;
DROP TRIGGER pages_updated ON pages;
DROP TRIGGER pages_inserted ON pages;
DROP FUNCTION whoknows_pages_deleted();
DROP FUNCTION whoknows_pages_updated();
DROP FUNCTION whoknows_pages_inserted();
DROP TABLE index_queue;
DROP TABLE dead_postings;
DROP TABLE page_segments;
DROP TABLE postings;
DROP TABLE index_segments;
DROP TABLE term_stats;
DROP TABLE corpus_stats;
DROP FUNCTION whoknows_impact(integer, integer, integer, float8);
DROP FUNCTION whoknows_body_length(tsvector);
ALTER TABLE pages ADD COLUMN title_search tsvector GENERATED ALWAYS AS (
    to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig ELSE 'english'::regconfig END, title)
) STORED;
CREATE INDEX pages_title_search_idx ON pages USING gin (title_search);
CREATE INDEX pages_search_idx ON pages USING gin (search);
ALTER TABLE pages ADD CONSTRAINT pages_title_key UNIQUE (title);
