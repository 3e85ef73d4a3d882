DROP FUNCTION whoknows_prefix_end(text);
DROP TABLE term_completions;
