-- Turns the page triggers on again after a bulk import's upsert, in the
-- same transaction.
ALTER TABLE pages ENABLE TRIGGER USER
