-- Schema version 5: usage for billing (issue 12). Each billed attempt's row gains what its
-- result's metrics say it used: CPU time of the executor's coroutine (plus what it reported
-- from threads), the task's message size as received, the packed output's size, and the
-- executor-reported units ({"tokens": 120, "api_calls": 1}); NULL where the result did not
-- say (a result made without running the task, an older worker). node_id is the workflow
-- node the task belongs to (Task.node_id), for `wayang-mq usage --by node`. wall_ms becomes
-- fractional: a sum of many sub-millisecond tasks must not round to zero.
-- Which results are billed: docs/control-plane.md "Usage".
ALTER TABLE usage ALTER COLUMN wall_ms TYPE double precision;
ALTER TABLE usage ADD COLUMN node_id   text NOT NULL DEFAULT '';
ALTER TABLE usage ADD COLUMN cpu_ms    double precision;
ALTER TABLE usage ADD COLUMN bytes_in  bigint;
ALTER TABLE usage ADD COLUMN bytes_out bigint;
ALTER TABLE usage ADD COLUMN units     jsonb NOT NULL DEFAULT '{}';
-- `wayang-mq usage --since T --until T` reads a window of finish times.
CREATE INDEX usage_finished ON usage (finished_at);
