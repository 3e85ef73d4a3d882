DROP TABLE crawl_robots;
DROP TABLE crawl_hosts;
DROP TABLE crawl_frontier;
