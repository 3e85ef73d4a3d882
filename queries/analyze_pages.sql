-- Refreshes the planner's statistics for pages after a bulk import whose
-- indexes were rebuilt (no GIN pending list to flush); returns nothing.
ANALYZE pages
