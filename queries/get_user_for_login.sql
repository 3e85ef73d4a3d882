-- Returns id, username and password_hash of the user with this username
-- (case-insensitive), or no row. The only query that reads password hashes.
SELECT id, username, password_hash
FROM users
WHERE lower(username) = lower(%(username)s)
