-- Records a batch of searches (parallel arrays, one element per search);
-- returns nothing.
INSERT INTO search_log (searched_at, query, language, results, duration_ms, logged_in)
SELECT *
FROM unnest(%(searched_at)s::timestamptz[], %(query)s::text[], %(language)s::text[],
            %(results)s::integer[], %(duration_ms)s::real[], %(logged_in)s::boolean[])
