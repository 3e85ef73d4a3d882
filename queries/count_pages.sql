-- Returns the number of stored pages (n).
SELECT count(*) AS n FROM pages
