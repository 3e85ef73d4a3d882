-- Records the outcome of fetching url: its new state (queued again after
-- retry_after seconds for a retry), HTTP status, note, validators, content
-- hash and whether its page is indexed; ends its lease. Returns nothing.
UPDATE crawl_frontier
SET state = %(state)s,
    last_status = %(status)s,
    note = %(note)s,
    etag = %(etag)s,
    last_modified = %(last_modified)s,
    content_hash = %(content_hash)s,
    indexed = %(indexed)s,
    fetched_at = now(),
    lease_until = NULL,
    next_fetch_at = now() + make_interval(secs => %(retry_after)s)
WHERE url = %(url)s
