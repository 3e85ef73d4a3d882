-- Lets PostgreSQL choose between custom and generic plans for the rest of
-- this transaction (the pool's connections force generic plans, see
-- make_pool): an import's or an index build's statements plan for their
-- parameters. Returns nothing.
SET LOCAL plan_cache_mode = auto
