-- Bulk-loads validated rows into import_staging (COPY FROM STDIN).
COPY import_staging (lineno, title, url, language, last_updated, content) FROM STDIN
