-- Ends every session of a user (after a password change); returns nothing.
DELETE FROM sessions WHERE user_id = %(user_id)s
