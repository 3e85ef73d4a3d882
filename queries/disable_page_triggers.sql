-- Turns the page triggers off for a bulk import, inside its transaction
-- (its rollback turns them on again): it rebuilds the statistics and the
-- whole index itself, and a disabled trigger also spares PostgreSQL copying
-- every written row into the triggers' transition tables. Takes the table's
-- ACCESS EXCLUSIVE lock, which the import's DROP INDEX takes anyway.
ALTER TABLE pages DISABLE TRIGGER USER
