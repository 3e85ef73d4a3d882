-- Replaces a user's password hash, only if it is still the one that was
-- checked (so two concurrent changes cannot both win); returns the id, or
-- no row when the hash had changed meanwhile.
UPDATE users
SET password_hash = %(new_hash)s
WHERE id = %(user_id)s AND password_hash = %(old_hash)s
RETURNING id
