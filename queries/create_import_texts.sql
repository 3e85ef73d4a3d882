-- Copies what a bulk import's vectors are computed from out of the
-- temporary staging table into an unlogged one in the same transaction:
-- parallel workers cannot read another session's temporary tables, and
-- create_import_vectors wants them. Dropped by drop_import_texts.
CREATE UNLOGGED TABLE import_texts AS
SELECT lineno, language, title, content
FROM import_staging
