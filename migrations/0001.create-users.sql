-- Accounts. Usernames and emails are unique case-insensitively, enforced by
-- the indexes below so that concurrent registrations cannot both succeed.
-- password_hash is self-describing: 'scrypt$...' for our hashes, 'md5$...' for
-- unsalted hashes imported from the legacy app (treated as leaked).

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text NOT NULL CHECK (length(username) BETWEEN 1 AND 64),
    email         text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
