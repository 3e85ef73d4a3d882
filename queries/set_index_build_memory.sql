-- Gives this transaction's index builds %(memory)s of maintenance_work_mem
-- (GIN rebuilds) and of work_mem (the hash aggregate of a segment's postings),
-- and makes that aggregate a hash, not a sort of every posting; returns the
-- settings.
SELECT set_config('maintenance_work_mem', %(memory)s, true) AS maintenance_work_mem,
       set_config('work_mem', %(memory)s, true) AS work_mem,
       set_config('enable_sort', 'off', true) AS enable_sort
