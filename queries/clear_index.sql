-- Empties the index (segments, postings, page assignments, dead postings and
-- the queue) for a full build; returns nothing.
TRUNCATE postings, page_segments, dead_postings, index_queue, index_segments
