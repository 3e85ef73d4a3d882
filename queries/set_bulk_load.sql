-- Tells this transaction's page triggers to leave statistics and the index
-- queue alone (a bulk import rebuilds both itself); returns the setting.
SELECT set_config('whoknows.bulk_load', 'on', true) AS bulk_load
