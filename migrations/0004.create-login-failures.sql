-- depends: 0003.create-sessions
-- Failed logins per (lowercased username, client), to slow down password
-- guessing across threads, processes and restarts. client is a keyed hash
-- of the client's address, never the address itself.

CREATE TABLE login_failures (
    username       text NOT NULL,
    client         text NOT NULL,
    failures       integer NOT NULL,
    last_failed_at timestamptz NOT NULL,
    PRIMARY KEY (username, client)
);

CREATE INDEX login_failures_last_failed_at_idx ON login_failures (last_failed_at);
