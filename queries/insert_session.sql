-- Starts a session for a user, valid for %(days)s days; returns nothing.
INSERT INTO sessions (token_hash, user_id, expires_at)
VALUES (%(token_hash)s, %(user_id)s, now() + make_interval(days => %(days)s))
