-- Computes the vector of every staged page of a bulk import, with the
-- function the pages_vector trigger uses. A CREATE TABLE AS may run its
-- query in parallel, where an INSERT never does: on two cores, 28 s instead
-- of 48 s for 100,000 pages. Dropped by drop_import_vectors.
CREATE UNLOGGED TABLE import_vectors AS
SELECT lineno, whoknows_page_vector(language, title, content) AS search
FROM import_texts
