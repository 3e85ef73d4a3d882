-- Returns the cached weather data for %(location)s, when it was fetched, and
-- whether it is still fresh (younger than %(max_age_seconds)s seconds), or no row.
SELECT data,
       fetched_at,
       fetched_at > now() - make_interval(secs => %(max_age_seconds)s) AS fresh
FROM weather_cache
WHERE location = %(location)s
