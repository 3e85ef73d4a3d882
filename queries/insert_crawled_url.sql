-- Records url (where a redirect ended) in the crawl frontier as done, so
-- that it is not fetched again; a queued row for it is taken over. Returns
-- nothing.
INSERT INTO crawl_frontier (url, host, depth, state)
VALUES (%(url)s, %(host)s, %(depth)s, 'done')
ON CONFLICT (url) DO UPDATE
SET state = 'done'
WHERE crawl_frontier.state = 'queued'
