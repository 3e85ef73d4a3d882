-- Removes the pages with these urls (gone, noindex, duplicates); the page
-- triggers take them out of the ranking index. Returns the ids removed.
DELETE FROM pages
WHERE url = ANY(%(urls)s::text[])
RETURNING id
