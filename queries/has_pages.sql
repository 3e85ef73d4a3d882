-- Returns one row (exists) telling whether the pages table holds any page.
SELECT EXISTS (SELECT 1 FROM pages) AS exists
