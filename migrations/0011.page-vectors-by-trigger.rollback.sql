DROP TRIGGER pages_vector ON pages;
DROP FUNCTION whoknows_set_page_vector();
DROP FUNCTION whoknows_page_vector(text, text, text);
-- A generated column again: PostgreSQL cannot turn a column back into one,
-- so it is added anew, which computes every page's vector.
ALTER TABLE pages DROP COLUMN search;
ALTER TABLE pages ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig
                                        ELSE 'english'::regconfig END, title), 'A')
    || setweight(to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig
                                           ELSE 'english'::regconfig END, content), 'B')
) STORED;
