-- Adds an account; returns its id. A taken username or email raises
-- UniqueViolation on users_username_key or users_email_key.
INSERT INTO users (username, email, password_hash)
VALUES (%(username)s, %(email)s, %(password_hash)s)
RETURNING id
