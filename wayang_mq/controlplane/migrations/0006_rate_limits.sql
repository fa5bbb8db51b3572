-- Schema version 6: rates shared by a fleet of workers (issue 13, `wayang-mq worker
-- --limits-db URL --rate CAP=RATE`). One row per rate-limited capability: its theoretical
-- arrival time (GCRA), seconds since the epoch on the database's clock. A worker reserves the
-- next start with one INSERT ... ON CONFLICT DO UPDATE ... RETURNING (runtime/sharedrate.py);
-- a row is never deleted (it is tiny, and a stale time is the same as none).
-- See docs/executors.md "Limits".
CREATE TABLE rate_limits (
    key text PRIMARY KEY,
    tat double precision NOT NULL
);
