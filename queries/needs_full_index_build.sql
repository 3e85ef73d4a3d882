-- Returns whether the index needs a full build (rebuild) rather than new
-- segments: some language has pages but no average body length yet, or its
-- page count has moved by more than a quarter since the average was set.
SELECT coalesce(bool_or(average_length IS NULL OR pages > average_pages * 1.25 OR pages < average_pages * 0.8), false)
       AS rebuild
FROM corpus_stats
WHERE pages > 0
