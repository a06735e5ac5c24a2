-- Dead-letter bookkeeping: set when the relay published a row to the
-- dead-letter topic (failures.policy = "dead_letter"); such rows are not
-- claimed again until `outbox-relay replay --dead-lettered` re-drives them.
ALTER TABLE outbox.events ADD COLUMN IF NOT EXISTS dead_lettered_at timestamptz;
