-- The database server before taskomatic's schema exists (taskomatic/db/server.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- database_exists --
-- Is there a database of this name on the server (the embedded server's first start creates it)?
SELECT 1 AS present FROM pg_database WHERE datname = %(name)s;
