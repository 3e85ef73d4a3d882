-- Drops a bulk import's copy of its staged texts (create_import_texts) once
-- the vectors are computed, in the import's transaction.
DROP TABLE import_texts
