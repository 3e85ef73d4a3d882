-- Returns the most frequent searches of the last %(days)s days (query,
-- language, searches, avg_results, avg_ms), most frequent first; with
-- %(zero)s only those that found nothing.
SELECT query, language, count(*) AS searches,
       round(avg(results)) AS avg_results, round(avg(duration_ms)::numeric, 1) AS avg_ms
FROM search_log
WHERE searched_at > now() - make_interval(days => %(days)s)
  AND (NOT %(zero)s OR results = 0)
GROUP BY query, language
ORDER BY searches DESC, query, language
LIMIT %(limit)s
