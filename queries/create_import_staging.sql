-- Creates an empty temporary staging table for one import, dropped at commit.
-- lineno is the line (JSON Lines) or row (SQLite) number in the source.
CREATE TEMPORARY TABLE import_staging (
    lineno       bigint NOT NULL,
    title        text NOT NULL,
    url          text NOT NULL,
    language     text NOT NULL,
    last_updated timestamptz,
    content      text NOT NULL
) ON COMMIT DROP
