-- Ends one session; returns nothing.
DELETE FROM sessions WHERE token_hash = %(token_hash)s
