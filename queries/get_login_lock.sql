-- Returns seconds_left (> 0) while (username, client) is locked out after
-- %(max_failures)s failures within the lock window, or no row.
SELECT ceil(extract(epoch FROM last_failed_at + make_interval(mins => %(lock_minutes)s) - now()))::int
       AS seconds_left
FROM login_failures
WHERE username = lower(%(username)s)
  AND client = %(client)s
  AND failures >= %(max_failures)s
  AND last_failed_at > now() - make_interval(mins => %(lock_minutes)s)
