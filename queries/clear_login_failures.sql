-- Forgets the failed logins of (username, client) after a success; returns nothing.
DELETE FROM login_failures WHERE username = lower(%(username)s) AND client = %(client)s
