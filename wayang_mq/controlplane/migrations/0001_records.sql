-- wayang-mq control plane, schema version 1: the registry and every task's record.
--
-- Written only by the control plane (`wayang-mq control-plane`), applied by
-- `wayang-mq db migrate`. Every row comes from a message the broker delivered; every message
-- is written once: `facts.digest` (sha256 of what the message is) is unique, and a message
-- whose fact is already there changes nothing (a redelivery after a crash, a second control
-- plane instance, a rebuild from the stream). The other tables are projections of the facts,
-- updated in the same transaction.

CREATE TABLE facts (
    seq          bigserial PRIMARY KEY,
    digest       bytea NOT NULL UNIQUE,          -- sha256 of the message's identity
    kind         text NOT NULL,                  -- task, retry, result, progress, registration,
                                                 -- heartbeat, dead_letter, cancel, redispatch
    task_id      text,                           -- NULL for executor events
    executor_id  text,
    attempt      integer,
    at           timestamptz NOT NULL,           -- when the message says it happened
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX facts_task ON facts (task_id, seq) WHERE task_id IS NOT NULL;

-- The registry: one row per executor; heartbeats update it (no row per heartbeat).
CREATE TABLE executors (
    executor_id      text PRIMARY KEY,
    capabilities     text[] NOT NULL,
    protocol         text NOT NULL DEFAULT 'amqp-0-9-1',
    metadata         jsonb NOT NULL DEFAULT '{}',
    concurrency      integer NOT NULL DEFAULT 1,
    version          text NOT NULL DEFAULT '',
    key_id           text NOT NULL DEFAULT '',   -- the key that signed its last event
    registered_at    timestamptz,                -- NULL: known from heartbeats only
    started_at       timestamptz,
    last_seen        timestamptz NOT NULL,
    last_sequence    bigint NOT NULL DEFAULT 0,
    in_flight        text[] NOT NULL DEFAULT '{}',
    load             real NOT NULL DEFAULT 0,    -- in flight / concurrency, 0..1
    state            text NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'lost')),
    lost_at          timestamptz
);
CREATE INDEX executors_capabilities ON executors USING gin (capabilities);

-- One row per task id: its latest attempt and, once it has one, its terminal result.
CREATE TABLE tasks (
    task_id             text PRIMARY KEY,
    capability          text NOT NULL,
    node_id             text NOT NULL,
    issuer              text NOT NULL,
    publisher           text NOT NULL DEFAULT '',    -- the AMQP user that published it first
    key_id              text NOT NULL,
    token               text NOT NULL,               -- the current attempt's token
    reply_to            text NOT NULL,
    attempt             integer NOT NULL DEFAULT 1,  -- the current attempt
    max_attempts        integer NOT NULL DEFAULT 1,
    heartbeat_timeout_ms bigint,
    policy              jsonb NOT NULL DEFAULT '{}',
    issued_at           timestamptz NOT NULL,
    deadline_at         timestamptz NOT NULL,        -- of the current attempt
    first_seen          timestamptz NOT NULL,
    state               text NOT NULL CHECK (state IN
                            ('queued', 'retrying', 'running', 'pending', 'finished')),
    executor_id         text,                        -- running or finished on
    status              text CHECK (status IN ('SUCCESS', 'FAILED')),
    error_code          text,
    finished_at         timestamptz,
    cancel_requested_at timestamptz,
    body                bytea NOT NULL,              -- the issuer's signed bytes
    key_header          text NOT NULL,               -- wayang-key-id of the publish
    signature_header    text NOT NULL                -- wayang-signature of the publish
);
CREATE INDEX tasks_capability_seen ON tasks (capability, first_seen);
CREATE INDEX tasks_state ON tasks (state) WHERE state <> 'finished';

-- Every copy of a task id that was published: the first is the task, the others duplicates.
CREATE TABLE task_copies (
    task_id     text NOT NULL,
    token       text NOT NULL,
    body_sha256 bytea NOT NULL,
    reply_to    text NOT NULL,
    publisher   text NOT NULL DEFAULT '',
    seen_at     timestamptz NOT NULL,
    duplicate   boolean NOT NULL,
    answered    boolean NOT NULL DEFAULT false,   -- a duplicate answered from the record
    PRIMARY KEY (task_id, body_sha256)
);

CREATE TABLE attempts (
    task_id      text NOT NULL,
    attempt      integer NOT NULL,
    token        text NOT NULL,
    executor_id  text,
    state        text NOT NULL CHECK (state IN
                     ('queued', 'retrying', 'running', 'pending', 'finished', 'lost')),
    queued_at    timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    decided_by   text NOT NULL DEFAULT '',      -- who made this attempt (issuer, executor, ...)
    PRIMARY KEY (task_id, attempt)
);

-- Every result seen. The first terminal one per task wins; later ones are duplicates, and
-- a result of another attempt's token is fenced; 'retried' is the FAILED result of an
-- attempt that was tried again, 'pending' a PENDING one. Never overwritten.
CREATE TABLE results (
    seq          bigserial PRIMARY KEY,
    task_id      text NOT NULL,
    attempt      integer NOT NULL,
    token        text NOT NULL,
    executor_id  text NOT NULL,
    capability   text NOT NULL,
    status       text NOT NULL,
    error_code   text,
    verdict      text NOT NULL CHECK (verdict IN ('won', 'pending', 'retried', 'duplicate', 'fenced')),
    finished_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    key_id       text NOT NULL,
    body         bytea NOT NULL
);
CREATE UNIQUE INDEX results_one_winner ON results (task_id) WHERE verdict = 'won';
CREATE INDEX results_task ON results (task_id, seq);

CREATE TABLE progress (
    task_id      text NOT NULL,
    attempt      integer NOT NULL,
    executor_id  text NOT NULL,
    fraction     double precision,
    message      text NOT NULL DEFAULT '',
    details      jsonb NOT NULL DEFAULT '{}',
    sent_at      timestamptz NOT NULL,
    fact_seq     bigint NOT NULL REFERENCES facts (seq),
    PRIMARY KEY (fact_seq)
);
CREATE INDEX progress_task ON progress (task_id, sent_at);

CREATE TABLE dead_letters (
    fact_seq     bigint PRIMARY KEY REFERENCES facts (seq),
    task_id      text NOT NULL,
    capability   text NOT NULL,
    reason       text NOT NULL,             -- expired, delivery_limit, rejected, maxlen, ...
    source_queue text NOT NULL DEFAULT '',
    died_at      timestamptz NOT NULL,
    by_worker    boolean NOT NULL DEFAULT false   -- a worker's own copy of input it refused
);
CREATE INDEX dead_letters_task ON dead_letters (task_id);

CREATE TABLE cancels (
    task_id       text PRIMARY KEY,
    requester     text NOT NULL,
    reason        text NOT NULL DEFAULT '',
    requested_at  timestamptz NOT NULL,
    forget_at     timestamptz NOT NULL
);

-- What each finished attempt cost, for billing (issue 12 adds CPU, bytes and units).
CREATE TABLE usage (
    task_id      text NOT NULL,
    attempt      integer NOT NULL,
    executor_id  text NOT NULL,
    capability   text NOT NULL,
    issuer       text NOT NULL DEFAULT '',
    wall_ms      bigint,
    finished_at  timestamptz NOT NULL,
    PRIMARY KEY (task_id, attempt, executor_id)
);

-- Messages the control plane refused to write (malformed, unverifiable): counted, never
-- written; the message itself is set aside in the queue wayang.record.refused.
CREATE TABLE refusals (
    reason       text PRIMARY KEY,
    count        bigint NOT NULL DEFAULT 0,
    last_at      timestamptz NOT NULL,
    last_detail  text NOT NULL DEFAULT ''
);

-- Messages decided in a transaction and published after it commits (the transactional
-- outbox): re-dispatches, answers to duplicates. A row is deleted once the broker confirmed it.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    body         bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}',
    message_id   text NOT NULL,
    type         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
