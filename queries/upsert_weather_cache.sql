-- Stores the weather data for %(location)s as fetched now, replacing any
-- older copy; returns fetched_at.
INSERT INTO weather_cache (location, data, fetched_at)
VALUES (%(location)s, %(data)s, now())
ON CONFLICT (location) DO UPDATE
SET data = EXCLUDED.data,
    fetched_at = EXCLUDED.fetched_at
RETURNING fetched_at
