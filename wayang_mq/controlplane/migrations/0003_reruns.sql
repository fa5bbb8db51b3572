-- Schema version 3: a result says whether the run behind it came from a broker redelivery
-- (its worker died, or gave it back, before acking): such a second run is what at-least-once
-- execution allows, and `wayang-mq audit` counts it apart from a task run twice without one.
ALTER TABLE results ADD COLUMN redelivered boolean NOT NULL DEFAULT false;
