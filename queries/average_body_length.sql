-- Returns the average body length (average) of the pages of one language:
-- the length a search uses while the index has none stored (before the
-- first index build).
SELECT avg(whoknows_body_length(search)) AS average FROM pages WHERE language = %(language)s
