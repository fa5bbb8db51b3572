-- wayang-mq control plane, schema version 2: claims (`wayang-mq worker --claims`).
--
-- Before it runs a task, a worker with claims asks the control plane (wayang.claims); the
-- first claim of a (task id, attempt) holds it, and every later claim is decided against it
-- in one transaction: a copy with another token is a duplicate, the holder asking again or a
-- broker redelivery (the holder's channel closed) runs. See wayang_mq/controlplane/claims.py.

CREATE TABLE claims (
    task_id       text NOT NULL,
    attempt       integer NOT NULL,
    token         text NOT NULL,
    executor_id   text NOT NULL,                 -- who holds it (a takeover changes it)
    issued_at_ms  bigint NOT NULL,               -- of the copy that holds it: a later one
                                                 -- with the same token is a reissue (a replay)
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    taken_over    integer NOT NULL DEFAULT 0,    -- times another executor took it over
    PRIMARY KEY (task_id, attempt)
);

-- A duplicate copy's node: its answer from the record must name it (clients fence results
-- of another node). NULL for copies recorded before this version: the winner's node is used.
ALTER TABLE task_copies ADD COLUMN node_id text;

-- Duplicate copies not yet answered from the record: looked up per task when it finishes.
CREATE INDEX task_copies_unanswered ON task_copies (task_id) WHERE duplicate AND NOT answered;
