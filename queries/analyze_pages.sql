-- Refreshes the planner's statistics for pages and the index tables after a
-- bulk import rebuilt them (no GIN pending list to flush); returns nothing.
ANALYZE pages, postings, term_stats, page_segments, corpus_stats
