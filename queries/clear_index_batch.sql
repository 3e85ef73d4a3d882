-- Empties index_batch between the segments of one build; returns nothing.
TRUNCATE index_batch
