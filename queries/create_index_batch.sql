-- Creates an empty temporary table of the pages one index build covers,
-- dropped at commit.
CREATE TEMPORARY TABLE index_batch (page_id bigint PRIMARY KEY) ON COMMIT DROP
