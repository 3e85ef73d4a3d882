-- Drops a bulk import's vectors (create_import_vectors) once its pages are
-- written, in the import's transaction.
DROP TABLE import_vectors
