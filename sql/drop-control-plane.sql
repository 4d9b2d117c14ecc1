-- redis-quota control plane: removes everything deploy-control-plane.sql creates.
--
-- Irreversible: every credit, named policy and event goes with the schema. Usable with
--     psql -v ON_ERROR_STOP=1 -f sql/drop-control-plane.sql
-- The schema name is replaced like in the deploy script; with a configured schema that also
-- holds other objects (for example public), this drops those too, so check it first.

DROP TABLE IF EXISTS "control_plane".quota_ledger_batch;
DROP TABLE IF EXISTS "control_plane".quota_usage_hourly;
DROP TABLE IF EXISTS "control_plane".quota_policy;
DROP SCHEMA IF EXISTS "control_plane" CASCADE;
