-- Returns the ids (migration_id) of the yoyo migrations applied to this
-- database; fails if yoyo has never run here.
SELECT migration_id FROM _yoyo_migration
