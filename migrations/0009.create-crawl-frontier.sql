-- depends: 0008.create-ranking
-- The crawler's shared state (crawler.py). Every crawler process, on any
-- machine, works from these tables, so that many of them share one frontier,
-- one robots.txt cache and one rate limit per host.

-- One row per URL the crawl knows. state: queued (waits until next_fetch_at),
-- fetching (leased until lease_until; an expired lease counts as queued
-- again, so a killed crawler loses nothing), done (fetched; indexed says
-- whether it is in pages under this url), skipped (robots.txt, not HTML,
-- too large, another language, noindex, a duplicate...: note says which),
-- failed (after max attempts, or refused) and gone (404 or 410: its page was
-- removed). host is the politeness key: host[:port] as in the normalised url.
CREATE TABLE crawl_frontier (
    url           text PRIMARY KEY,
    host          text NOT NULL,
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'fetching', 'done', 'skipped', 'failed', 'gone')),
    priority      integer NOT NULL DEFAULT 0,
    depth         integer NOT NULL DEFAULT 0,
    next_fetch_at timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0,
    lease_until   timestamptz,
    last_status   integer,
    note          text,
    etag          text,
    last_modified text,
    content_hash  text,
    indexed       boolean NOT NULL DEFAULT false,
    fetched_at    timestamptz,
    added_at      timestamptz NOT NULL DEFAULT now()
);

-- What a claim reads: the due URLs of one host, best first.
CREATE INDEX crawl_frontier_due_idx ON crawl_frontier (host, priority DESC, depth, next_fetch_at)
    WHERE state IN ('queued', 'fetching');
-- The duplicate check: an indexed page with the same content.
CREATE INDEX crawl_frontier_hash_idx ON crawl_frontier (content_hash) WHERE indexed;

-- One row per host: when the next request may start (the crawl delay after
-- the last one ended), and until when a request to it is in flight (a lease,
-- so that at most one request per host runs at a time across all crawlers).
CREATE TABLE crawl_hosts (
    host            text PRIMARY KEY,
    next_allowed_at timestamptz NOT NULL DEFAULT now(),
    busy_until      timestamptz
);

-- robots.txt per host, as fetched (status and body), until expires_at.
CREATE TABLE crawl_robots (
    host       text PRIMARY KEY,
    status     integer NOT NULL,
    body       text NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
