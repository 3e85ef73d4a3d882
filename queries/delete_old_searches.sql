-- Deletes search log rows older than %(days)s days; returns nothing.
DELETE FROM search_log WHERE searched_at < now() - make_interval(days => %(days)s)
