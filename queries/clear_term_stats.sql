-- Empties term_stats, and the completions computed from it, before a full
-- build recounts them; returns nothing.
TRUNCATE term_stats, term_completions
