/**
 * Schema migrations, applied in order; entry i takes the schema from version i to i + 1
 * (PRAGMA user_version). Never edit a released entry: append a new one.
 */
export const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE principals (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('device', 'operator', 'fleet')),
    role        TEXT CHECK (role IS NULL OR role IN ('viewer', 'operator', 'admin')),
    secret_hash TEXT NOT NULL,
    created_at  INTEGER NOT NULL
  );
  CREATE TABLE devices (
    id         TEXT PRIMARY KEY REFERENCES principals(name) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    presence   TEXT NOT NULL DEFAULT 'never' CHECK (presence IN ('never', 'online', 'offline')),
    last_seen  INTEGER,
    session    INTEGER NOT NULL DEFAULT 0,
    facts      TEXT,
    rejected   INTEGER NOT NULL DEFAULT 0
  );
  CREATE TABLE desired_state (
    device_id         TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    version           INTEGER NOT NULL,
    doc               TEXT NOT NULL,
    digest            TEXT NOT NULL,
    published_version INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL
  );
  CREATE INDEX desired_unpublished ON desired_state (device_id) WHERE published_version < version;
  CREATE TABLE reported_state (
    device_id       TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    desired_version INTEGER NOT NULL,
    doc             TEXT NOT NULL,
    drift           TEXT NOT NULL,
    received_at     INTEGER NOT NULL
  );
  CREATE TABLE audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    ts     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    ok     INTEGER NOT NULL,
    detail TEXT
  );
  CREATE INDEX audit_target ON audit (target, seq);
  `,
  `
  CREATE TABLE telemetry (
    device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    cls         TEXT NOT NULL,
    type        TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    body        TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
  ) WITHOUT ROWID;
  CREATE INDEX telemetry_received ON telemetry (received_at);
  CREATE TABLE telemetry_stats (
    device_id       TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    last_seq        INTEGER NOT NULL DEFAULT 0,
    received        INTEGER NOT NULL DEFAULT 0,
    duplicates      INTEGER NOT NULL DEFAULT 0,
    backlog_records INTEGER NOT NULL DEFAULT 0,
    backlog_bytes   INTEGER NOT NULL DEFAULT 0,
    oldest_age_sec  REAL,
    dropped         TEXT NOT NULL DEFAULT '{}',
    reported_at     INTEGER NOT NULL
  );
  `,
  `
  -- The model registry. A version is immutable once published: only its status (and when that
  -- changed) may move, and nothing is deleted; the triggers hold every writer to that.
  CREATE TABLE model_versions (
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    status          TEXT NOT NULL CHECK (status IN ('candidate', 'approved', 'production', 'quarantined', 'deprecated')),
    manifest_json   TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    runtime         TEXT NOT NULL,
    parent          INTEGER,
    expires_at      INTEGER,
    size_bytes      INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    status_at       INTEGER NOT NULL,
    PRIMARY KEY (name, version)
  ) WITHOUT ROWID;
  CREATE TABLE model_files (
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    path    TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    size    INTEGER NOT NULL,
    PRIMARY KEY (name, version, path),
    FOREIGN KEY (name, version) REFERENCES model_versions (name, version)
  ) WITHOUT ROWID;
  CREATE INDEX model_files_sha256 ON model_files (sha256);
  CREATE TRIGGER model_versions_immutable
    BEFORE UPDATE OF name, version, manifest_json, manifest_sha256, runtime, parent, expires_at, size_bytes, created_at ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END;
  CREATE TRIGGER model_versions_kept BEFORE DELETE ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are never deleted'); END;
  CREATE TRIGGER model_files_immutable BEFORE UPDATE ON model_files
    BEGIN SELECT RAISE(ABORT, 'model files are immutable'); END;
  CREATE TRIGGER model_files_kept BEFORE DELETE ON model_files
    BEGIN SELECT RAISE(ABORT, 'model files are never deleted'); END;
  `,
  // v4: what devices downloaded to install each model version, and what delta patches saved.
  `
  CREATE TABLE model_transfers (
    device_id        TEXT NOT NULL,
    name             TEXT NOT NULL,
    version          INTEGER NOT NULL,
    downloaded_bytes INTEGER NOT NULL,
    saved_bytes      INTEGER NOT NULL,
    reused_bytes     INTEGER NOT NULL,
    patched_files    INTEGER NOT NULL,
    full_files       INTEGER NOT NULL,
    fallbacks        INTEGER NOT NULL,
    at               INTEGER NOT NULL,
    PRIMARY KEY (name, version, device_id)
  ) WITHOUT ROWID;
  `,
  // v5: device tags, staged rollouts and their members, safe mode.
  `
  ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
  CREATE TABLE rollouts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    selector        TEXT NOT NULL,
    plan            TEXT NOT NULL,
    status          TEXT NOT NULL,
    state           TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
  );
  CREATE INDEX rollouts_name ON rollouts (name, id);
  -- A member is a device the rollout put on its version, with the slot it had before (its way back).
  CREATE TABLE rollout_members (
    rollout_id  INTEGER NOT NULL REFERENCES rollouts (id),
    device_id   TEXT NOT NULL,
    wave        INTEGER NOT NULL,
    previous    TEXT,
    enlisted_at INTEGER NOT NULL,
    assigned_at INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
  ) WITHOUT ROWID;
  CREATE TABLE safe_mode (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    selector TEXT NOT NULL,
    since    INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT
  );
  `,
  // v6: federated learning rounds, their participants, schedules, and the server optimizer's state per model.
  `
  CREATE TABLE fl_rounds (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    model              TEXT NOT NULL,
    base_version       INTEGER NOT NULL,
    base_sha256        TEXT NOT NULL,
    config             TEXT NOT NULL,
    state              TEXT NOT NULL,
    reason             TEXT,
    status             TEXT NOT NULL,
    eligible           TEXT NOT NULL,
    schedule_id        INTEGER,
    created_by         TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    deadline_at        INTEGER NOT NULL,
    eval_deadline_at   INTEGER,
    updated_at         INTEGER NOT NULL
  );
  CREATE INDEX fl_rounds_model ON fl_rounds (model, id);
  -- role: train (invited to train) or eval (asked to evaluate the candidate); one row per device and role.
  CREATE TABLE fl_participants (
    round_id   INTEGER NOT NULL REFERENCES fl_rounds (id),
    role       TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT,
    samples    INTEGER,
    metrics    TEXT,
    at         INTEGER NOT NULL,
    PRIMARY KEY (round_id, role, device_id)
  ) WITHOUT ROWID;
  CREATE TABLE fl_schedules (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    config      TEXT NOT NULL,
    every_sec   INTEGER NOT NULL,
    next_at     INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
  );
  CREATE TABLE fl_server_state (
    model       TEXT PRIMARY KEY,
    state       BLOB NOT NULL,
    updated_at  INTEGER NOT NULL
  ) WITHOUT ROWID;
  `,
];
