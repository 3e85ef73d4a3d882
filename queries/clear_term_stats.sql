-- Empties term_stats before a full build recounts it; returns nothing.
TRUNCATE term_stats
