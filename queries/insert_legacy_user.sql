-- Adds a user imported from the legacy app with its legacy password hash,
-- unless the username or email is already taken; returns the new id, or no
-- row when the user already existed (a re-import never resets a password).
INSERT INTO users (username, email, password_hash)
VALUES (%(username)s, %(email)s, %(password_hash)s)
ON CONFLICT DO NOTHING
RETURNING id
