-- Creates a segment for the pages in index_batch; returns its id.
INSERT INTO index_segments (pages) SELECT count(*) FROM index_batch RETURNING id
