-- Returns the dead postings (segment, page_id) of the pages %(page_ids)s:
-- entries a search has read that belong to a page's old text.
SELECT segment, page_id FROM dead_postings WHERE page_id = ANY(%(page_ids)s::bigint[])
