-- Schema version 4: dead-letter replays. An operator's `wayang-mq dead replay` sends a finished
-- task again (same id and token, a fresh deadline): its copy is marked `replay`, and the result
-- of that run is recorded with the verdict 'replayed' (the first terminal result still wins;
-- the replay's is kept beside it, not dropped as a duplicate).
ALTER TABLE task_copies ADD COLUMN replay boolean NOT NULL DEFAULT false;
ALTER TABLE tasks ADD COLUMN replayed_at timestamptz;
ALTER TABLE results DROP CONSTRAINT results_verdict_check;
ALTER TABLE results ADD CONSTRAINT results_verdict_check
    CHECK (verdict IN ('won', 'pending', 'retried', 'duplicate', 'fenced', 'replayed'));
