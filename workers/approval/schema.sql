-- approval.request's store (wayang_workers.approval.store): applied at setup, idempotent.
CREATE SCHEMA IF NOT EXISTS wayang_approval;

-- One row per task: the request as filed, and its decision once someone (or the deadline) ends it.
CREATE TABLE IF NOT EXISTS wayang_approval.requests (
    task_id     text PRIMARY KEY,
    attempt     integer NOT NULL,
    ref         jsonb NOT NULL,             -- the TaskRef the answer is published with
    issuer      text NOT NULL,              -- who dispatched it (a cancel must come from them)
    capability  text NOT NULL,
    title       text NOT NULL,
    requester   text NOT NULL DEFAULT '',
    context     json NOT NULL,              -- json, not jsonb: the task's key order is kept
    assignees   text[] NOT NULL,
    groups      text[] NOT NULL,
    editable    json NOT NULL,
    deadline    timestamptz,
    escalate_to text,                       -- the group it goes to at its deadline, once
    escalated   boolean NOT NULL DEFAULT false,
    state       text NOT NULL DEFAULT 'pending',  -- pending | approved | rejected | counter | timeout | cancelled
    decided_by  text,
    decided_at  timestamptz,
    comment     text,
    counter     jsonb,                      -- the edited values of a counter-proposal
    answered    boolean NOT NULL DEFAULT false,   -- its result confirmed by the broker
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS requests_pending ON wayang_approval.requests (deadline) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_unanswered ON wayang_approval.requests (task_id) WHERE state <> 'pending' AND NOT answered;

-- Every decision and every refused attempt at one: who, when, what, from where.
CREATE TABLE IF NOT EXISTS wayang_approval.audit (
    id      bigserial PRIMARY KEY,
    task_id text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,                  -- a user name, or "deadline" / "dispatcher"
    action  text NOT NULL,                  -- approved | rejected | counter | timeout | escalated | cancelled | refused
    detail  jsonb NOT NULL DEFAULT '{}',
    ip      text
);
CREATE INDEX IF NOT EXISTS audit_task ON wayang_approval.audit (task_id, at);

-- Signed-in sessions; only the SHA-256 of a session id is stored.
CREATE TABLE IF NOT EXISTS wayang_approval.sessions (
    id_hash    text PRIMARY KEY,
    username   text NOT NULL,
    csrf       text NOT NULL,
    expires_at timestamptz NOT NULL
);
