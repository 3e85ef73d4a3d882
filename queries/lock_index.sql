-- Waits for, then holds until the end of this transaction, the lock that
-- lets one writer at a time change the index (postings, segments, queue);
-- returns nothing of use. Searches never take it.
SELECT pg_advisory_xact_lock(hashtext('whoknows index')) AS locked
