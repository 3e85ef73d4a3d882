-- Vacuums and analyzes pages after an import (needs autocommit); returns nothing.
VACUUM (ANALYZE) pages
