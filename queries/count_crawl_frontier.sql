-- Returns, per host of the crawl frontier, how many URLs are in each state
-- and how many are indexed, hosts in name order.
SELECT host,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'fetching') AS fetching,
       count(*) FILTER (WHERE state = 'done') AS done,
       count(*) FILTER (WHERE indexed) AS indexed,
       count(*) FILTER (WHERE state = 'skipped') AS skipped,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'gone') AS gone
FROM crawl_frontier
GROUP BY host
ORDER BY host
