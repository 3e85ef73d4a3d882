-- Gives this transaction's index builds %(memory)s of maintenance_work_mem;
-- returns the setting.
SELECT set_config('maintenance_work_mem', %(memory)s, true) AS maintenance_work_mem
