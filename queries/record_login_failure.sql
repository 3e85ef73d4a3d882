-- Counts one failed login for (username, client), restarting the count when
-- the last failure is older than the lock window; returns the new count.
INSERT INTO login_failures AS f (username, client, failures, last_failed_at)
VALUES (lower(%(username)s), %(client)s, 1, now())
ON CONFLICT (username, client) DO UPDATE
SET failures = CASE WHEN f.last_failed_at < now() - make_interval(mins => %(lock_minutes)s)
                    THEN 1 ELSE f.failures + 1 END,
    last_failed_at = now()
RETURNING failures
