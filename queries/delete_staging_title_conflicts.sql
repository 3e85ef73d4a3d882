-- Removes rows whose title already belongs to a stored page with another
-- url (titles are unique); returns each removed row's lineno and title.
DELETE FROM import_staging AS s
USING pages AS p
WHERE p.title = s.title AND p.url <> s.url
RETURNING s.lineno, s.title
