-- Removes expired sessions and stale login-failure counters; returns nothing.
WITH expired AS (
    DELETE FROM sessions WHERE expires_at <= now()
)
DELETE FROM login_failures
WHERE last_failed_at < now() - make_interval(mins => %(lock_minutes)s)
