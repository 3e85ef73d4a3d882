-- depends: 0005.add-title-search
-- What people search for, so operators see which content is missing. Nothing
-- about the client is kept: not the address, not the account, only whether
-- someone was logged in.

CREATE TABLE search_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    searched_at timestamptz NOT NULL DEFAULT now(),
    query       text NOT NULL,
    language    text NOT NULL,
    results     integer NOT NULL,
    duration_ms real NOT NULL,
    logged_in   boolean NOT NULL
);

CREATE INDEX search_log_searched_at_idx ON search_log (searched_at);
