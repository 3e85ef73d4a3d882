-- Returns one row (ok = 1) when the database answers.
SELECT 1 AS ok
