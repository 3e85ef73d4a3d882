-- depends: 0005.add-title-search
-- The last answer from the weather provider per location, so that load on
-- our side never becomes load on theirs, and so that an outage of theirs
-- still shows the last known weather (marked stale). data is the app's own
-- shape, already validated; fetched_at says how old it is.

CREATE TABLE weather_cache (
    location   text PRIMARY KEY,
    data       jsonb NOT NULL,
    fetched_at timestamptz NOT NULL
);
