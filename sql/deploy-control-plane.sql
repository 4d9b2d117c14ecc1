-- redis-quota control plane: per-user quota credits ("replenishments") and their audit trail.
--
-- Idempotent: safe to run any number of times, on a live system, with
--     psql -v ON_ERROR_STOP=1 -f sql/deploy-control-plane.sql
-- The module applies this same text when quota.auto-deploy is on. It first replaces every
-- occurrence of the default schema name with the configured one (quota.schema), so that name is
-- written only where the schema belongs: object qualifiers, trigger functions and the NOTIFY
-- channel. There is no BEGIN/COMMIT here: the module wraps the script in its own transaction
-- under an advisory lock, so that several nodes deploying at once do not collide.
--
-- Indexes and triggers are created only when missing (checked in DO blocks), so a redeploy takes
-- no lock that would stall traffic on the tables. Trigger behaviour lives in the functions, which
-- are replaced on every run; the triggers themselves only say when the functions fire.

CREATE SCHEMA IF NOT EXISTS "control_plane";

COMMENT ON SCHEMA "control_plane" IS
    'redis-quota control plane: per-user quota credits (replenishments) and their events';

-- One row per (tenant, project, user, bundle). bundle_id '*' applies to every bundle of the
-- user. NULL amounts add nothing to the base policy. Rows are never deleted by the module:
-- revoking or expiring a credit sets active = false.
CREATE TABLE IF NOT EXISTS "control_plane".user_quota_replenishment (
    tenant                        VARCHAR(255)  NOT NULL,
    project                       VARCHAR(255)  NOT NULL,
    user_id                       VARCHAR(255)  NOT NULL,
    bundle_id                     VARCHAR(255)  NOT NULL,
    additional_requests_per_day   INT           NULL,
    additional_requests_per_month INT           NULL,
    additional_total_requests     INT           NULL,
    additional_max_concurrent     INT           NULL,
    additional_tokens_per_hour    BIGINT        NULL,
    additional_tokens_per_day     BIGINT        NULL,
    additional_tokens_per_month   BIGINT        NULL,
    expires_at                    TIMESTAMPTZ   NULL,
    purchase_id                   VARCHAR(255)  NULL,
    purchase_amount_usd           NUMERIC(10,2) NULL,
    purchase_notes                TEXT          NULL,
    active                        BOOLEAN       NOT NULL DEFAULT TRUE,
    created_at                    TIMESTAMPTZ   NOT NULL DEFAULT now(),
    updated_at                    TIMESTAMPTZ   NOT NULL DEFAULT now(),
    CONSTRAINT user_quota_replenishment_pkey PRIMARY KEY (tenant, project, user_id, bundle_id)
);

COMMENT ON TABLE "control_plane".user_quota_replenishment IS
    'Quota credits granted or purchased per user and bundle (bundle_id ''*'' = every bundle); '
    'the effective limit is the base policy plus these amounts. Soft delete: active = false.';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.bundle_id IS
    'The bundle the credits apply to; ''*'' applies to every bundle without a row of its own';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.expires_at IS
    'When the credits stop applying; NULL = never';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.purchase_amount_usd IS
    'Money paid, exact decimal (never a float)';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.active IS
    'FALSE once revoked or expired (soft delete)';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.updated_at IS
    'Kept by the user_quota_replenishment_touch trigger';

-- Append-only history: every grant, top-up, revoke and expiry with the values it wrote.
-- Its unique index on (tenant, project, purchase_id) is what makes a purchase id idempotent:
-- a second grant carrying an already recorded purchase id cannot insert its event and is
-- rolled back by the module.
CREATE TABLE IF NOT EXISTS "control_plane".user_quota_replenishment_event (
    id          BIGSERIAL     NOT NULL,
    tenant      VARCHAR(255)  NOT NULL,
    project     VARCHAR(255)  NOT NULL,
    user_id     VARCHAR(255)  NOT NULL,
    bundle_id   VARCHAR(255)  NOT NULL,
    event_type  TEXT          NOT NULL,
    payload     JSONB         NOT NULL,
    purchase_id VARCHAR(255)  NULL,
    created_at  TIMESTAMPTZ   NOT NULL DEFAULT now(),
    CONSTRAINT user_quota_replenishment_event_pkey PRIMARY KEY (id),
    CONSTRAINT user_quota_replenishment_event_type_check
        CHECK (event_type IN ('grant', 'topup', 'revoke', 'expire', 'policy_set', 'policy_delete'))
);

COMMENT ON TABLE "control_plane".user_quota_replenishment_event IS
    'Append-only history of replenishment changes (grant, topup, revoke, expire) and of named '
    'policy changes (policy_set, policy_delete: user_id and bundle_id ''*'', the policy name '
    'in the payload); a purchase_id is recorded at most once per (tenant, project)';

-- Deployments made before named policies existed: widen the event types in place. Runs once
-- (the constraint then names policy_set); the check over existing rows is a single scan.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = '"control_plane".user_quota_replenishment_event'::regclass
          AND conname = 'user_quota_replenishment_event_type_check'
          AND pg_get_constraintdef(oid) LIKE '%policy_set%'
    ) THEN
        ALTER TABLE "control_plane".user_quota_replenishment_event
            DROP CONSTRAINT IF EXISTS user_quota_replenishment_event_type_check;
        ALTER TABLE "control_plane".user_quota_replenishment_event
            ADD CONSTRAINT user_quota_replenishment_event_type_check CHECK (event_type IN
                ('grant', 'topup', 'revoke', 'expire', 'policy_set', 'policy_delete'));
    END IF;
END
$$;

-- Prepaid balances (QUOTA.GRANT ... REQUESTS_BALANCE n / TOKENS_BALANCE n) that burn down.
-- Added in place to tables deployed before balances existed (ADD COLUMN IF NOT EXISTS takes a
-- brief lock and rewrites nothing: every new column has a constant default or none).
--   requests_balance / tokens_balance: granted in the row's current life (NULL = no balance);
--   *_balance_used: every debit ever flushed against the row (only grows; the ledger flush adds
--     to it);
--   *_balance_base: what *_balance_used was when the current life began (a grant without ADD,
--     or an ADD to a revoked or expired row). Left = balance - (used - base) - unflushed debits.
ALTER TABLE "control_plane".user_quota_replenishment
    ADD COLUMN IF NOT EXISTS requests_balance      BIGINT NULL,
    ADD COLUMN IF NOT EXISTS tokens_balance        BIGINT NULL,
    ADD COLUMN IF NOT EXISTS requests_balance_used BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS tokens_balance_used   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS requests_balance_base BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS tokens_balance_base   BIGINT NOT NULL DEFAULT 0;

COMMENT ON COLUMN "control_plane".user_quota_replenishment.requests_balance IS
    'Prepaid requests granted in the row''s current life; spent only when a window would deny';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.tokens_balance IS
    'Prepaid tokens granted in the row''s current life; spent by tokens beyond the token windows';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.requests_balance_used IS
    'Every request debit flushed against this row, ever (kept by the usage ledger flush)';
COMMENT ON COLUMN "control_plane".user_quota_replenishment.requests_balance_base IS
    'requests_balance_used when the current life of the balance began';

-- The sequence of the last usage ledger batch that debited the row (0 = none), set by the
-- flush with *_balance_used: a node that reads the row while its own batch is between
-- PostgreSQL's commit and its acknowledgement knows the row already counts that batch's debits.
-- Added in place to tables deployed before.
ALTER TABLE "control_plane".user_quota_replenishment
    ADD COLUMN IF NOT EXISTS balance_seq BIGINT NOT NULL DEFAULT 0;

COMMENT ON COLUMN "control_plane".user_quota_replenishment.balance_seq IS
    'Sequence of the last usage ledger batch that debited this row (kept by the flush)';

-- The usage ledger: per account and UTC hour, what the module counted there. Written only by
-- the module's flush (it adds each batch once, see quota_ledger_batch); never updated by hand.
CREATE TABLE IF NOT EXISTS "control_plane".quota_usage_hourly (
    tenant          VARCHAR(255) NOT NULL,
    project         VARCHAR(255) NOT NULL,
    user_id         VARCHAR(255) NOT NULL,
    bundle_id       VARCHAR(255) NOT NULL,
    hour            TIMESTAMPTZ  NOT NULL,
    requests        BIGINT       NOT NULL DEFAULT 0,
    tokens          BIGINT       NOT NULL DEFAULT 0,
    requests_debited BIGINT      NOT NULL DEFAULT 0,
    tokens_debited  BIGINT       NOT NULL DEFAULT 0,
    updated_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT quota_usage_hourly_pkey PRIMARY KEY (tenant, project, user_id, bundle_id, hour)
);

COMMENT ON TABLE "control_plane".quota_usage_hourly IS
    'Usage per account and UTC hour: requests admitted (minus released), tokens committed, and '
    'the debits of the balance of the credit row with this identity (bundle ''*'' = the shared '
    'balance of the user''s ''*'' row)';

-- One row per account: the last flush batch applied. A batch whose sequence is not above it was
-- applied before (a retry, a replay, a failed-over master) and is skipped whole.
CREATE TABLE IF NOT EXISTS "control_plane".quota_ledger_batch (
    tenant     VARCHAR(255) NOT NULL,
    project    VARCHAR(255) NOT NULL,
    user_id    VARCHAR(255) NOT NULL,
    bundle_id  VARCHAR(255) NOT NULL,
    last_seq   BIGINT       NOT NULL,
    updated_at TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT quota_ledger_batch_pkey PRIMARY KEY (tenant, project, user_id, bundle_id)
);

-- The last batch's revision (its snapshot time) and exactly what it held, so a replica that
-- took over and sends the same sequence with more in it adds only the difference. Added in
-- place to tables deployed before.
ALTER TABLE "control_plane".quota_ledger_batch
    ADD COLUMN IF NOT EXISTS last_rev   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_hours TEXT   NOT NULL DEFAULT '';

COMMENT ON TABLE "control_plane".quota_ledger_batch IS
    'Idempotency of the usage ledger flush: the last batch applied per account (sequence, revision, hours)';

-- Named base policies ("free", "pro", ...) per (tenant, project), used by
-- QUOTA.ADMIT ... POLICY <name>. NULL = unlimited. Deleting a policy deletes its row (the
-- event table keeps the history).
CREATE TABLE IF NOT EXISTS "control_plane".quota_policy (
    tenant             VARCHAR(255) NOT NULL,
    project            VARCHAR(255) NOT NULL,
    policy_name        VARCHAR(255) NOT NULL,
    requests_per_day   BIGINT       NULL CHECK (requests_per_day >= 0),
    requests_per_month BIGINT       NULL CHECK (requests_per_month >= 0),
    total_requests     BIGINT       NULL CHECK (total_requests >= 0),
    tokens_per_hour    BIGINT       NULL CHECK (tokens_per_hour >= 0),
    tokens_per_day     BIGINT       NULL CHECK (tokens_per_day >= 0),
    tokens_per_month   BIGINT       NULL CHECK (tokens_per_month >= 0),
    max_concurrent     BIGINT       NULL CHECK (max_concurrent >= 0),
    created_at         TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT quota_policy_pkey PRIMARY KEY (tenant, project, policy_name)
);

COMMENT ON TABLE "control_plane".quota_policy IS
    'Named base policies per (tenant, project) for QUOTA.ADMIT ... POLICY <name>; '
    'NULL limit = unlimited';

-- Smooth rates (REQUESTS_PER_SECOND, REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE), added in place to
-- tables deployed before them (nullable, no default: the ALTER rewrites nothing). A credit adds
-- to a rate as it adds to a window.
ALTER TABLE "control_plane".quota_policy
    ADD COLUMN IF NOT EXISTS requests_per_second BIGINT NULL CHECK (requests_per_second >= 0),
    ADD COLUMN IF NOT EXISTS requests_per_minute BIGINT NULL CHECK (requests_per_minute >= 0),
    ADD COLUMN IF NOT EXISTS tokens_per_minute   BIGINT NULL CHECK (tokens_per_minute >= 0);
ALTER TABLE "control_plane".user_quota_replenishment
    ADD COLUMN IF NOT EXISTS additional_requests_per_second INT    NULL,
    ADD COLUMN IF NOT EXISTS additional_requests_per_minute INT    NULL,
    ADD COLUMN IF NOT EXISTS additional_tokens_per_minute   BIGINT NULL;
COMMENT ON COLUMN "control_plane".user_quota_replenishment_event.payload IS
    'The values the change wrote (money as a decimal string, times as Unix seconds)';

-- Indexes, created only when missing so that a redeploy never locks the tables. An index added
-- by a later release is built here, inside the deploy's transaction, which blocks writes to its
-- table while it builds: on a large live table, build it first with CREATE INDEX CONCURRENTLY
-- (same name, same definition, in psql) and the deploy finds it there.
DO $$
BEGIN
    -- A user's active rows (the cache loads all of them at once).
    IF to_regclass('"control_plane".user_quota_replenishment_active_user_idx') IS NULL THEN
        CREATE INDEX user_quota_replenishment_active_user_idx
            ON "control_plane".user_quota_replenishment (tenant, project, user_id)
            WHERE active;
    END IF;
    -- Active rows that can expire (cleanup).
    IF to_regclass('"control_plane".user_quota_replenishment_active_expiry_idx') IS NULL THEN
        CREATE INDEX user_quota_replenishment_active_expiry_idx
            ON "control_plane".user_quota_replenishment (expires_at)
            WHERE active AND expires_at IS NOT NULL;
    END IF;
    -- QUOTA.FIND: a project's live rows in (user, bundle) order, one page after another
    -- (keyset pagination: each page starts after the last row of the one before). Byte order
    -- ("C"), whatever the database's collation, so the order and the cursor are the same
    -- everywhere. Partial: revoked and expired-and-cleaned rows, which only accumulate, are not
    -- in it.
    IF to_regclass('"control_plane".user_quota_replenishment_find_idx') IS NULL THEN
        CREATE INDEX user_quota_replenishment_find_idx
            ON "control_plane".user_quota_replenishment
            (tenant, project, user_id COLLATE "C", bundle_id COLLATE "C")
            WHERE active;
    END IF;
    -- QUOTA.FIND ... EXPIRES_WITHIN: a project's live rows that can expire, soonest first; a
    -- page ends at the horizon instead of reading every row of the project.
    IF to_regclass('"control_plane".user_quota_replenishment_find_expiry_idx') IS NULL THEN
        CREATE INDEX user_quota_replenishment_find_expiry_idx
            ON "control_plane".user_quota_replenishment
            (tenant, project, expires_at, user_id COLLATE "C", bundle_id COLLATE "C")
            WHERE active AND expires_at IS NOT NULL;
    END IF;
    -- QUOTA.TOP: a project's ledger rows over a range of hours (the primary key leads with the
    -- user, so it would read every hour of the project). The counters are not in it, so a
    -- flush's update of an hour's row stays a HOT update.
    IF to_regclass('"control_plane".quota_usage_hourly_project_hour_idx') IS NULL THEN
        CREATE INDEX quota_usage_hourly_project_hour_idx
            ON "control_plane".quota_usage_hourly (tenant, project, hour);
    END IF;
    -- One event per purchase id and (tenant, project): the idempotency guard.
    IF to_regclass('"control_plane".user_quota_replenishment_event_purchase_idx') IS NULL THEN
        CREATE UNIQUE INDEX user_quota_replenishment_event_purchase_idx
            ON "control_plane".user_quota_replenishment_event (tenant, project, purchase_id)
            WHERE purchase_id IS NOT NULL;
    END IF;
END
$$;

-- updated_at follows every UPDATE.
CREATE OR REPLACE FUNCTION "control_plane".user_quota_replenishment_touch()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The ledger flush only adds to *_balance_used (and sets balance_seq): that is not a change
    -- of the credit.
    IF TG_TABLE_NAME = 'user_quota_replenishment' AND TG_OP = 'UPDATE' AND
        (to_jsonb(NEW) - 'requests_balance_used' - 'tokens_balance_used' - 'balance_seq'
            - 'updated_at') =
        (to_jsonb(OLD) - 'requests_balance_used' - 'tokens_balance_used' - 'balance_seq'
            - 'updated_at') THEN
        RETURN NEW;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION "control_plane".user_quota_replenishment_touch() IS
    'Trigger: sets updated_at = now() on every UPDATE of a replenishment row';

-- Tells every Redis node which user's cached credits are stale. The payload is the identity of
-- the changed row plus the operation and the writer's origin: a node sets
-- redis_quota.origin for its own write transactions only (set_config(..., true), so it holds
-- through a transaction pooler and never leaks to the next transaction), and recognises its own
-- writes by it; a change made by plain SQL has origin null. A row moved to another identity
-- notifies both users. Notifications are delivered at commit, and not at all when the
-- transaction rolls back.
CREATE OR REPLACE FUNCTION "control_plane".user_quota_replenishment_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('control_plane_quota_changed', json_build_object(
            'tenant', OLD.tenant, 'project', OLD.project, 'user_id', OLD.user_id,
            'bundle_id', OLD.bundle_id, 'op', TG_OP,
            'origin', nullif(current_setting('redis_quota.origin', true), ''))::text);
        RETURN NULL;
    END IF;
    -- The ledger flush only adds to *_balance_used (and sets balance_seq), which the flushing
    -- node tracks itself: no cache needs dropping.
    IF TG_OP = 'UPDATE' AND
        (to_jsonb(NEW) - 'requests_balance_used' - 'tokens_balance_used' - 'balance_seq'
            - 'updated_at') =
        (to_jsonb(OLD) - 'requests_balance_used' - 'tokens_balance_used' - 'balance_seq'
            - 'updated_at') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (OLD.tenant, OLD.project, OLD.user_id, OLD.bundle_id)
            IS DISTINCT FROM (NEW.tenant, NEW.project, NEW.user_id, NEW.bundle_id) THEN
            PERFORM pg_notify('control_plane_quota_changed', json_build_object(
                'tenant', OLD.tenant, 'project', OLD.project, 'user_id', OLD.user_id,
                'bundle_id', OLD.bundle_id, 'op', TG_OP,
                'origin', nullif(current_setting('redis_quota.origin', true), ''))::text);
        END IF;
    END IF;
    PERFORM pg_notify('control_plane_quota_changed', json_build_object(
        'tenant', NEW.tenant, 'project', NEW.project, 'user_id', NEW.user_id,
        'bundle_id', NEW.bundle_id, 'op', TG_OP,
        'origin', nullif(current_setting('redis_quota.origin', true), ''))::text);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION "control_plane".user_quota_replenishment_notify() IS
    'Trigger: pg_notify on channel control_plane_quota_changed with '
    '{tenant, project, user_id, bundle_id, op, origin} for every changed replenishment row';

-- Tells every Redis node which named policy changed: {tenant, project, policy, op, origin} on the
-- same channel as the credits (a payload without user_id is a policy).
CREATE OR REPLACE FUNCTION "control_plane".quota_policy_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND
        (OLD.tenant, OLD.project, OLD.policy_name)
            IS DISTINCT FROM (NEW.tenant, NEW.project, NEW.policy_name)) THEN
        PERFORM pg_notify('control_plane_quota_changed', json_build_object(
            'tenant', OLD.tenant, 'project', OLD.project, 'policy', OLD.policy_name,
            'op', TG_OP, 'origin', nullif(current_setting('redis_quota.origin', true), ''))::text);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('control_plane_quota_changed', json_build_object(
            'tenant', NEW.tenant, 'project', NEW.project, 'policy', NEW.policy_name,
            'op', TG_OP, 'origin', nullif(current_setting('redis_quota.origin', true), ''))::text);
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION "control_plane".quota_policy_notify() IS
    'Trigger: pg_notify on channel control_plane_quota_changed with '
    '{tenant, project, policy, op, origin} for every changed named policy';

-- The event table only grows.
CREATE OR REPLACE FUNCTION "control_plane".user_quota_replenishment_event_append_only()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'user_quota_replenishment_event is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

COMMENT ON FUNCTION "control_plane".user_quota_replenishment_event_append_only() IS
    'Trigger: refuses UPDATE, DELETE and TRUNCATE on the event table';

-- Triggers, created only when missing (a DROP TRIGGER on every run would take an ACCESS
-- EXCLUSIVE lock on a live table). CREATE OR REPLACE TRIGGER does not exist before PostgreSQL 14.
-- One row per trigger: its table, its name, when it fires, per row or statement, its function.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('user_quota_replenishment', 'user_quota_replenishment_touch',
            'BEFORE UPDATE', 'ROW', 'user_quota_replenishment_touch'),
        ('user_quota_replenishment', 'user_quota_replenishment_notify',
            'AFTER INSERT OR UPDATE OR DELETE', 'ROW', 'user_quota_replenishment_notify'),
        ('quota_policy', 'quota_policy_touch',
            'BEFORE UPDATE', 'ROW', 'user_quota_replenishment_touch'),
        ('quota_policy', 'quota_policy_notify',
            'AFTER INSERT OR UPDATE OR DELETE', 'ROW', 'quota_policy_notify'),
        ('user_quota_replenishment_event', 'user_quota_replenishment_event_append_only',
            'BEFORE UPDATE OR DELETE', 'ROW', 'user_quota_replenishment_event_append_only'),
        ('user_quota_replenishment_event', 'user_quota_replenishment_event_no_truncate',
            'BEFORE TRUNCATE', 'STATEMENT', 'user_quota_replenishment_event_append_only')
    ) AS v (tbl, trigger_name, fires, level, fn)
    LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_trigger
            WHERE tgrelid = format('"control_plane".%I', t.tbl)::regclass
              AND tgname = t.trigger_name
        ) THEN
            -- fires and level come from the list above, never from data.
            EXECUTE format(
                'CREATE TRIGGER %I %s ON "control_plane".%I FOR EACH %s '
                'EXECUTE FUNCTION "control_plane".%I()',
                t.trigger_name, t.fires, t.tbl, t.level, t.fn);
        END IF;
    END LOOP;
END
$$;
