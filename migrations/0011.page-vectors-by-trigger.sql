-- depends: 0010.create-term-completions
-- A page's full-text vector (`search`) is set by a trigger from one function
-- instead of being a generated column, so that a bulk import can compute the
-- vectors of its pages in parallel and supply them. PostgreSQL computes a
-- generated column in the INSERT that writes the row, and an INSERT never
-- runs in parallel: to_tsvector on one core was 48 of the 60 s that writing
-- 100,000 pages took. A CREATE TABLE AS may use parallel workers, so the
-- import computes the vectors that way, with whoknows_page_vector, and writes
-- them with its page triggers disabled (bench/README.md, "Bulk imports").
-- Every other write gets its vector from the trigger, which overwrites any
-- vector the writer gives: `search` cannot drift from the page's text.

-- The title weighted 'A' above the content 'B', each parsed with the page's
-- own language config. An inlined SQL function, immutable and parallel safe.
CREATE FUNCTION whoknows_page_vector(page_language text, page_title text, page_content text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT setweight(to_tsvector(CASE page_language WHEN 'da' THEN 'danish'::regconfig
                                                    ELSE 'english'::regconfig END, page_title), 'A')
           || setweight(to_tsvector(CASE page_language WHEN 'da' THEN 'danish'::regconfig
                                                       ELSE 'english'::regconfig END, page_content), 'B')
$$;

CREATE FUNCTION whoknows_set_page_vector() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.search := whoknows_page_vector(NEW.language, NEW.title, NEW.content);
    RETURN NEW;
END
$$;

-- Keeps every stored vector as it is.
ALTER TABLE pages ALTER COLUMN search DROP EXPRESSION;

CREATE TRIGGER pages_vector BEFORE INSERT OR UPDATE OF title, language, content, search ON pages
    FOR EACH ROW EXECUTE FUNCTION whoknows_set_page_vector();
