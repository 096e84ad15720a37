CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('schema', '1');

CREATE TABLE accounts (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    plan             TEXT NOT NULL,
    credits_total    INTEGER NOT NULL CHECK (credits_total >= 0),
    credits_used     INTEGER NOT NULL DEFAULT 0 CHECK (credits_used >= 0),
    credits_reserved INTEGER NOT NULL DEFAULT 0 CHECK (credits_reserved >= 0),
    reset_day        INTEGER NOT NULL CHECK (reset_day BETWEEN 1 AND 28),
    resets_at        INTEGER NOT NULL,
    created_at       INTEGER NOT NULL
);

-- Every change of credits_used or credits_reserved, written in the same transaction:
-- SUM(used_delta) = credits_used and SUM(reserved_delta) = credits_reserved, per account.
CREATE TABLE ledger (
    id             INTEGER PRIMARY KEY,
    account_id     INTEGER NOT NULL REFERENCES accounts (id),
    at             INTEGER NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('reserve', 'charge', 'release', 'period_reset', 'allowance')),
    used_delta     INTEGER NOT NULL,
    reserved_delta INTEGER NOT NULL,
    job_id         TEXT,
    note           TEXT
);
CREATE INDEX ledger_account ON ledger (account_id);

CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY,
    account_id   INTEGER NOT NULL REFERENCES accounts (id),
    prefix       TEXT NOT NULL UNIQUE,
    hash         TEXT NOT NULL UNIQUE,
    scopes       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER,
    revoked_at   INTEGER
);

CREATE TABLE batches (
    id            TEXT PRIMARY KEY,
    account_id    INTEGER NOT NULL REFERENCES accounts (id),
    total         INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    finished_at   INTEGER
);

-- One row per image: a single request or one item of a batch. `reserved` is 1 while a credit
-- is held for it; SUM(reserved) per account = accounts.credits_reserved.
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    account_id    INTEGER NOT NULL REFERENCES accounts (id),
    batch_id      TEXT REFERENCES batches (id),
    position      INTEGER,
    client_ref    TEXT,
    source        TEXT NOT NULL,
    image_url     TEXT,
    output_format TEXT NOT NULL,
    output_size   TEXT NOT NULL,
    bg_color      TEXT,
    status        TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    reserved      INTEGER NOT NULL CHECK (reserved IN (0, 1)),
    width         INTEGER,
    height        INTEGER,
    result_file   TEXT,
    expires_at    INTEGER,
    error_code    TEXT,
    error_message TEXT,
    created_at    INTEGER NOT NULL,
    finished_at   INTEGER
);
CREATE INDEX jobs_queue ON jobs (status, created_at, position);
CREATE INDEX jobs_batch ON jobs (batch_id, position);

-- Result files on disk; the sweeper deletes file and row once expires_at has passed.
CREATE TABLE results (
    file         TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL,
    content_type TEXT NOT NULL,
    bytes        INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX results_expiry ON results (expires_at);
