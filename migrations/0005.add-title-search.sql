-- depends: 0004.create-login-failures
-- A full-text vector of the title alone, with its own GIN index: title
-- matches rank first, and finding them must not read the (large, TOASTed)
-- vector of the whole page.

ALTER TABLE pages ADD COLUMN title_search tsvector GENERATED ALWAYS AS (
    to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig ELSE 'english'::regconfig END, title)
) STORED;

CREATE INDEX pages_title_search_idx ON pages USING gin (title_search);
