-- MQTT-submitted jobs: queued durably before the message is acknowledged, run by the queue
-- runner like batch items, answered on the submitter's reply topic.
ALTER TABLE jobs ADD COLUMN dedupe_key TEXT;
ALTER TABLE jobs ADD COLUMN reply_topic TEXT;
ALTER TABLE jobs ADD COLUMN correlation BLOB;
-- Inline (base64) input kept under <data>/inbox until the job has run.
ALTER TABLE jobs ADD COLUMN input_file TEXT;
CREATE UNIQUE INDEX jobs_dedupe ON jobs (dedupe_key) WHERE dedupe_key IS NOT NULL;
UPDATE meta SET value = '2' WHERE key = 'schema';
