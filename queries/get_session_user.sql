-- Returns the user (id, username, must_change_password) of an unexpired
-- session, or no row. must_change_password is true while the account still
-- has a legacy MD5 hash, which is treated as leaked.
SELECT u.id, u.username, starts_with(u.password_hash, 'md5$') AS must_change_password
FROM sessions AS s
JOIN users AS u ON u.id = s.user_id
WHERE s.token_hash = %(token_hash)s
  AND s.expires_at > now()
