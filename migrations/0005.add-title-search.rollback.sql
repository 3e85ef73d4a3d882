ALTER TABLE pages DROP COLUMN title_search;
