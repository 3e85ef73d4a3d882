-- Undoes set_index_build_memory for the rest of the transaction (work_mem,
-- maintenance_work_mem and enable_sort back to the session's values), so
-- that what the caller runs after an index build gets its usual plans;
-- returns the settings.
SELECT name, set_config(name, reset_val, true) AS value
FROM pg_settings
WHERE name IN ('work_mem', 'maintenance_work_mem', 'enable_sort')
