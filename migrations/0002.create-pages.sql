-- depends: 0001.create-users
-- Pages to search. `search` is a stored full-text vector, title weighted 'A'
-- above content 'B', built with the page's own language config. Prefix
-- matching on its lexemes ('javascr:*') and a trigram index on titles keep
-- partial words matching, as the legacy LIKE search did.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE pages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title        text NOT NULL CONSTRAINT pages_title_key UNIQUE,
    url          text NOT NULL CONSTRAINT pages_url_key UNIQUE,
    language     text NOT NULL DEFAULT 'en' CHECK (language IN ('en', 'da')),
    last_updated timestamptz,
    content      text NOT NULL,
    search       tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig
                                            ELSE 'english'::regconfig END, title), 'A')
        || setweight(to_tsvector(CASE language WHEN 'da' THEN 'danish'::regconfig
                                               ELSE 'english'::regconfig END, content), 'B')
    ) STORED
);

CREATE INDEX pages_search_idx ON pages USING gin (search);
CREATE INDEX pages_title_trgm_idx ON pages USING gin (title gin_trgm_ops);
