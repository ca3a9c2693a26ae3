import type { Db } from './db.js';
import { openDb } from './db.js';
import { flRepository } from './sqlite-fl.js';
import type {
  ArtifactUse,
  ModelTransferTotals,
  AuditRow,
  DesiredRow,
  DeviceRow,
  FleetStore,
  ModelVersionRow,
  ModelVersionSummaryRow,
  Presence,
  Principal,
  PrincipalKind,
  ReportedRow,
  RolloutMemberRow,
  RolloutRow,
  TelemetryStats,
} from './types.js';
import type { ModelRuntime, ModelSlot, ModelStatus, RecordClass, Role, RolloutPlan, RolloutStatus, SafeModeRecord, Selector } from '../../proto/index.js';

interface PrincipalSql {
  name: string;
  kind: PrincipalKind;
  role: Role | null;
  secret_hash: string;
  created_at: number;
}
interface DeviceSql {
  id: string;
  created_at: number;
  presence: Presence;
  last_seen: number | null;
  session: number;
  facts: string | null;
  rejected: number;
  tags: string;
}
interface DesiredSql {
  device_id: string;
  version: number;
  doc: string;
  digest: string;
  published_version: number;
  updated_at: number;
}
interface ReportedSql {
  device_id: string;
  desired_version: number;
  doc: string;
  drift: string;
  received_at: number;
}
interface TelemetrySql {
  device_id: string;
  seq: number;
  cls: RecordClass;
  type: string;
  ts: number;
  body: string;
  received_at: number;
}
interface TelemetryStatsSql {
  device_id: string;
  last_seq: number;
  received: number;
  duplicates: number;
  backlog_records: number;
  backlog_bytes: number;
  oldest_age_sec: number | null;
  dropped: string;
  reported_at: number;
}
interface AuditSql {
  seq: number;
  ts: number;
  actor: string;
  action: string;
  target: string | null;
  ok: number;
  detail: string | null;
}

interface ModelVersionSql {
  name: string;
  version: number;
  status: ModelStatus;
  manifest_json?: string;
  manifest_sha256: string;
  runtime: ModelRuntime;
  parent: number | null;
  expires_at: number | null;
  size_bytes: number;
  created_at: number;
  status_at: number;
}

const principal = (r: PrincipalSql): Principal => ({ name: r.name, kind: r.kind, role: r.role, secretHash: r.secret_hash, createdAt: r.created_at });
const device = (r: DeviceSql): DeviceRow => ({
  id: r.id,
  createdAt: r.created_at,
  presence: r.presence,
  lastSeen: r.last_seen,
  session: r.session,
  facts: r.facts === null ? null : (JSON.parse(r.facts) as DeviceRow['facts']),
  rejected: r.rejected,
  tags: JSON.parse(r.tags) as string[],
});
const desired = (r: DesiredSql): DesiredRow => ({
  deviceId: r.device_id,
  version: r.version,
  doc: JSON.parse(r.doc) as DesiredRow['doc'],
  digest: r.digest,
  publishedVersion: r.published_version,
  updatedAt: r.updated_at,
});
const modelSummary = (r: ModelVersionSql): ModelVersionSummaryRow => ({
  name: r.name,
  version: r.version,
  status: r.status,
  manifestSha256: r.manifest_sha256,
  runtime: r.runtime,
  parent: r.parent,
  expiresAt: r.expires_at,
  sizeBytes: r.size_bytes,
  createdAt: r.created_at,
  statusAt: r.status_at,
});
const modelVersion = (r: ModelVersionSql): ModelVersionRow => ({ ...modelSummary(r), manifestJson: r.manifest_json as string });

interface RolloutSql {
  id: number;
  name: string;
  version: number;
  manifest_sha256: string;
  selector: string;
  plan: string;
  status: string;
  created_by: string;
  created_at: number;
}
const rollout = (r: RolloutSql): RolloutRow => ({
  id: r.id,
  name: r.name,
  version: r.version,
  manifestSha256: r.manifest_sha256,
  selector: JSON.parse(r.selector) as Selector,
  plan: JSON.parse(r.plan) as RolloutPlan,
  status: JSON.parse(r.status) as RolloutStatus,
  createdBy: r.created_by,
  createdAt: r.created_at,
});
interface MemberSql {
  rollout_id: number;
  device_id: string;
  wave: number;
  previous: string | null;
  enlisted_at: number;
  assigned_at: number;
}
interface SafeModeSql {
  id: number;
  selector: string;
  since: number;
  actor: string;
  reason: string | null;
}

const MODEL_SUMMARY_COLUMNS = 'name, version, status, manifest_sha256, runtime, parent, expires_at, size_bytes, created_at, status_at';

/** The fleet's state in one SQLite file (better-sqlite3, WAL). */
export function openSqliteStore(path: string): FleetStore {
  const db: Db = openDb(path);
  const q = {
    pGet: db.prepare<[string], PrincipalSql>('SELECT * FROM principals WHERE name = ?'),
    pList: db.prepare<[], PrincipalSql>('SELECT * FROM principals ORDER BY name'),
    pListKind: db.prepare<[string], PrincipalSql>('SELECT * FROM principals WHERE kind = ? ORDER BY name'),
    pInsert: db.prepare('INSERT INTO principals (name, kind, role, secret_hash, created_at) VALUES (?, ?, ?, ?, ?)'),
    pRemove: db.prepare('DELETE FROM principals WHERE name = ?'),
    pSecret: db.prepare('UPDATE principals SET secret_hash = ? WHERE name = ?'),
    dGet: db.prepare<[string], DeviceSql>('SELECT * FROM devices WHERE id = ?'),
    dList: db.prepare<[], DeviceSql>('SELECT * FROM devices ORDER BY id'),
    dInsert: db.prepare('INSERT INTO devices (id, created_at) VALUES (?, ?)'),
    dPresence: db.prepare('UPDATE devices SET presence = ?, session = ?, last_seen = ? WHERE id = ?'),
    dSession: db.prepare<[string], { session: number }>('SELECT session FROM devices WHERE id = ?'),
    dTouch: db.prepare('UPDATE devices SET last_seen = ? WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)'),
    dFacts: db.prepare('UPDATE devices SET facts = ?, last_seen = ? WHERE id = ?'),
    dRejected: db.prepare('UPDATE devices SET rejected = rejected + ? WHERE id = ?'),
    dTags: db.prepare('UPDATE devices SET tags = ? WHERE id = ?'),
    roInsert: db.prepare(
      `INSERT INTO rollouts (name, version, manifest_sha256, selector, plan, status, state, created_by, created_at, updated_at)
       VALUES (@name, @version, @manifestSha256, @selector, @plan, @status, @state, @createdBy, @createdAt, @createdAt)`,
    ),
    roGet: db.prepare<[number], RolloutSql>('SELECT * FROM rollouts WHERE id = ?'),
    roList: db.prepare<[{ name: string | null; active: number; limit: number }], RolloutSql>(
      `SELECT * FROM rollouts WHERE (@name IS NULL OR name = @name) AND (@active = 0 OR state NOT IN ('succeeded', 'halted', 'aborted')) ORDER BY id DESC LIMIT @limit`,
    ),
    roStatus: db.prepare('UPDATE rollouts SET status = ?, state = ?, updated_at = ? WHERE id = ?'),
    roMembers: db.prepare<[number], MemberSql>('SELECT * FROM rollout_members WHERE rollout_id = ?'),
    roAddMember: db.prepare(
      `INSERT INTO rollout_members (rollout_id, device_id, wave, previous, enlisted_at, assigned_at) VALUES (@rolloutId, @deviceId, @wave, @previous, @enlistedAt, @assignedAt)
       ON CONFLICT (rollout_id, device_id) DO NOTHING`,
    ),
    smInsert: db.prepare('INSERT INTO safe_mode (selector, since, actor, reason) VALUES (?, ?, ?, ?)'),
    smList: db.prepare<[], SafeModeSql>('SELECT * FROM safe_mode ORDER BY id'),
    smRemove: db.prepare('DELETE FROM safe_mode WHERE id = ?'),
    sGet: db.prepare<[string], DesiredSql>('SELECT * FROM desired_state WHERE device_id = ?'),
    sPut: db.prepare(
      `INSERT INTO desired_state (device_id, version, doc, digest, updated_at) VALUES (@deviceId, @version, @doc, @digest, @updatedAt)
       ON CONFLICT (device_id) DO UPDATE SET version = excluded.version, doc = excluded.doc, digest = excluded.digest, updated_at = excluded.updated_at`,
    ),
    sPublished: db.prepare('UPDATE desired_state SET published_version = ? WHERE device_id = ? AND published_version < ?'),
    sUnpublished: db.prepare<[number], DesiredSql>('SELECT * FROM desired_state WHERE published_version < version LIMIT ?'),
    rGet: db.prepare<[string], ReportedSql>('SELECT * FROM reported_state WHERE device_id = ?'),
    rPut: db.prepare(
      `INSERT INTO reported_state (device_id, desired_version, doc, drift, received_at) VALUES (@deviceId, @desiredVersion, @doc, @drift, @receivedAt)
       ON CONFLICT (device_id) DO UPDATE SET desired_version = excluded.desired_version, doc = excluded.doc, drift = excluded.drift, received_at = excluded.received_at`,
    ),
    tInsert: db.prepare('INSERT OR IGNORE INTO telemetry (device_id, seq, cls, type, ts, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)'),
    tStats: db.prepare(
      `INSERT INTO telemetry_stats (device_id, last_seq, received, duplicates, backlog_records, backlog_bytes, oldest_age_sec, dropped, reported_at)
       VALUES (@deviceId, @lastSeq, @inserted, @duplicates, @records, @bytes, @oldestAgeSec, @dropped, @at)
       ON CONFLICT (device_id) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq), received = received + excluded.received,
         duplicates = duplicates + excluded.duplicates, backlog_records = excluded.backlog_records, backlog_bytes = excluded.backlog_bytes,
         oldest_age_sec = excluded.oldest_age_sec, dropped = excluded.dropped, reported_at = excluded.reported_at`,
    ),
    tGetStats: db.prepare<[string], TelemetryStatsSql>('SELECT * FROM telemetry_stats WHERE device_id = ?'),
    tList: db.prepare<[string, number, number], TelemetrySql>('SELECT * FROM telemetry WHERE device_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?'),
    tListCls: db.prepare<[string, number, string, number], TelemetrySql>(
      'SELECT * FROM telemetry WHERE device_id = ? AND seq < ? AND cls = ? ORDER BY seq DESC LIMIT ?',
    ),
    tPruneAge: db.prepare('DELETE FROM telemetry WHERE received_at < ?'),
    // Walks the (device_id, seq) primary key of one device from its newest record: no table scan.
    tPruneCount: db.prepare(
      `DELETE FROM telemetry WHERE device_id = @id AND seq <= (
         SELECT seq FROM telemetry WHERE device_id = @id ORDER BY seq DESC LIMIT 1 OFFSET @keep)`,
    ),
    mGet: db.prepare<[string, number], ModelVersionSql>('SELECT * FROM model_versions WHERE name = ? AND version = ?'),
    mLatest: db.prepare<[string], ModelVersionSql>('SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1'),
    mList: db.prepare<[number], ModelVersionSql>(`SELECT ${MODEL_SUMMARY_COLUMNS} FROM model_versions ORDER BY name, version DESC LIMIT ?`),
    mListName: db.prepare<[string, number], ModelVersionSql>(`SELECT ${MODEL_SUMMARY_COLUMNS} FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT ?`),
    mInsert: db.prepare(
      `INSERT INTO model_versions (name, version, status, manifest_json, manifest_sha256, runtime, parent, expires_at, size_bytes, created_at, status_at)
       VALUES (@name, @version, @status, @manifestJson, @manifestSha256, @runtime, @parent, @expiresAt, @sizeBytes, @createdAt, @statusAt)`,
    ),
    mInsertFile: db.prepare('INSERT INTO model_files (name, version, path, sha256, size) VALUES (?, ?, ?, ?, ?)'),
    mStatus: db.prepare('UPDATE model_versions SET status = ?, status_at = ? WHERE name = ? AND version = ?'),
    mArtifact: db.prepare<[string], { status: ModelStatus }>(
      'SELECT DISTINCT v.status AS status FROM model_files f JOIN model_versions v ON v.name = f.name AND v.version = f.version WHERE f.sha256 = ?',
    ),
    mUse: db.prepare<[string], ArtifactUse>(
      `SELECT f.name AS name, f.version AS version, f.path AS path, v.runtime AS runtime, v.manifest_json AS manifestJson
       FROM model_files f JOIN model_versions v ON v.name = f.name AND v.version = f.version WHERE f.sha256 = ? ORDER BY v.created_at DESC LIMIT 1`,
    ),
    tPut: db.prepare(
      `INSERT OR REPLACE INTO model_transfers (device_id, name, version, downloaded_bytes, saved_bytes, reused_bytes, patched_files, full_files, fallbacks, at)
       VALUES (@deviceId, @name, @version, @downloadedBytes, @savedBytes, @reusedBytes, @patchedFiles, @fullFiles, @fallbacks, @at)`,
    ),
    tTotals: db.prepare<[string, number], ModelTransferTotals>(
      `SELECT COUNT(*) AS devices, COALESCE(SUM(downloaded_bytes), 0) AS downloadedBytes, COALESCE(SUM(saved_bytes), 0) AS savedBytes,
              COALESCE(SUM(reused_bytes), 0) AS reusedBytes, COALESCE(SUM(patched_files), 0) AS patchedFiles,
              COALESCE(SUM(full_files), 0) AS fullFiles, COALESCE(SUM(fallbacks), 0) AS fallbacks
       FROM model_transfers WHERE name = ? AND version = ?`,
    ),
    aAppend: db.prepare('INSERT INTO audit (ts, actor, action, target, ok, detail) VALUES (?, ?, ?, ?, ?, ?)'),
    aList: db.prepare<[number], AuditSql>('SELECT * FROM audit ORDER BY seq DESC LIMIT ?'),
    aListTarget: db.prepare<[string, number], AuditSql>('SELECT * FROM audit WHERE target = ? ORDER BY seq DESC LIMIT ?'),
  };

  /** Devices that received telemetry since the last count-based prune. */
  const grown = new Set<string>();

  /** Work to run once the outermost transaction commits (dropped if it rolls back). */
  let depth = 0;
  let committed: (() => void)[] = [];
  const transaction = <T>(fn: () => T): T => {
    depth++;
    const mark = committed.length;
    let result: T;
    try {
      result = db.transaction(fn)();
    } catch (e) {
      // A savepoint rolled back: so does the work it queued.
      depth--;
      committed.length = mark;
      throw e;
    }
    depth--;
    if (depth === 0 && committed.length > 0) {
      const run = committed;
      committed = [];
      for (const f of run) f();
    }
    return result;
  };

  return {
    transaction,
    afterCommit: (fn) => {
      if (depth === 0) fn();
      else committed.push(fn);
    },
    principals: {
      get: (name) => {
        const r = q.pGet.get(name);
        return r ? principal(r) : null;
      },
      list: (kind) => (kind ? q.pListKind.all(kind) : q.pList.all()).map(principal),
      insert: (p) => void q.pInsert.run(p.name, p.kind, p.role, p.secretHash, p.createdAt),
      remove: (name) => q.pRemove.run(name).changes > 0,
      setSecret: (name, hash) => void q.pSecret.run(hash, name),
    },
    devices: {
      get: (id) => {
        const r = q.dGet.get(id);
        return r ? device(r) : null;
      },
      list: () => q.dList.all().map(device),
      insert: (id, at) => void q.dInsert.run(id, at),
      setPresence: (id, presence, session, at) => void q.dPresence.run(presence, session, at, id),
      session: (id) => q.dSession.get(id)?.session ?? 0,
      touch: (id, at) => void q.dTouch.run(at, id, at),
      setFacts: (id, facts, at) => void q.dFacts.run(JSON.stringify(facts), at, id),
      addRejected: (id, n) => void q.dRejected.run(n, id),
      setTags: (id, tags) => void q.dTags.run(JSON.stringify(tags), id),
    },
    desired: {
      get: (id) => {
        const r = q.sGet.get(id);
        return r ? desired(r) : null;
      },
      put: (row) => void q.sPut.run({ ...row, doc: JSON.stringify(row.doc) }),
      markPublished: (id, version) => void q.sPublished.run(version, id, version),
      unpublished: (limit) => q.sUnpublished.all(limit).map(desired),
    },
    reported: {
      get: (id) => {
        const r = q.rGet.get(id);
        return r
          ? {
              deviceId: r.device_id,
              desiredVersion: r.desired_version,
              doc: JSON.parse(r.doc) as ReportedRow['doc'],
              drift: JSON.parse(r.drift) as ReportedRow['drift'],
              receivedAt: r.received_at,
            }
          : null;
      },
      put: (row) => void q.rPut.run({ ...row, doc: JSON.stringify(row.doc), drift: JSON.stringify(row.drift) }),
    },
    telemetry: {
      ingest: (deviceId, records, backlog, at) => {
        grown.add(deviceId);
        let inserted = 0;
        for (const r of records) inserted += q.tInsert.run(deviceId, r.seq, r.cls, r.type, r.ts, JSON.stringify(r.body ?? null), at).changes;
        const duplicates = records.length - inserted;
        const lastSeq = records.reduce((m, r) => Math.max(m, r.seq), 0);
        q.tStats.run({ deviceId, lastSeq, inserted, duplicates, ...backlog, dropped: JSON.stringify(backlog.dropped), at });
        return { inserted, duplicates };
      },
      list: (deviceId, { limit, cls, beforeSeq }) => {
        const before = beforeSeq ?? Number.MAX_SAFE_INTEGER;
        const rows = cls === undefined ? q.tList.all(deviceId, before, limit) : q.tListCls.all(deviceId, before, cls, limit);
        return rows.map((r) => ({ seq: r.seq, cls: r.cls, type: r.type, ts: r.ts, body: JSON.parse(r.body) as unknown, receivedAt: r.received_at }));
      },
      stats: (deviceId) => {
        const r = q.tGetStats.get(deviceId);
        if (!r) return null;
        return {
          lastSeq: r.last_seq,
          received: r.received,
          duplicates: r.duplicates,
          backlog: { records: r.backlog_records, bytes: r.backlog_bytes, oldestAgeSec: r.oldest_age_sec, dropped: JSON.parse(r.dropped) as TelemetryStats['backlog']['dropped'] },
          reportedAt: r.reported_at,
        };
      },
      prune: (receivedBefore, keepPerDevice) => {
        let n = q.tPruneAge.run(receivedBefore).changes;
        // Only a device that sent telemetry since the last run can have grown past the count.
        for (const id of grown) n += q.tPruneCount.run({ id, keep: keepPerDevice }).changes;
        grown.clear();
        return n;
      },
    },
    models: {
      get: (name, version) => {
        const r = q.mGet.get(name, version);
        return r ? modelVersion(r) : null;
      },
      latest: (name) => {
        const r = q.mLatest.get(name);
        return r ? modelVersion(r) : null;
      },
      list: ({ name, limit }) => (name === undefined ? q.mList.all(limit) : q.mListName.all(name, limit)).map(modelSummary),
      insert: (row, files) =>
        db.transaction(() => {
          q.mInsert.run(row);
          for (const f of files) q.mInsertFile.run(row.name, row.version, f.path, f.sha256, f.size);
        })(),
      setStatus: (name, version, status, at) => void q.mStatus.run(status, at, name, version),
      artifactStatuses: (sha256) => q.mArtifact.all(sha256).map((r) => r.status),
      artifactUse: (sha256) => q.mUse.get(sha256) ?? null,
    },
    transfers: {
      put: (row) => void q.tPut.run(row),
      totals: (name, version) => q.tTotals.get(name, version)!,
    },
    rollouts: {
      insert: (r) =>
        Number(
          q.roInsert.run({
            name: r.name,
            version: r.version,
            manifestSha256: r.manifestSha256,
            selector: JSON.stringify(r.selector),
            plan: JSON.stringify(r.plan),
            status: JSON.stringify(r.status),
            state: r.status.state,
            createdBy: r.createdBy,
            createdAt: r.createdAt,
          }).lastInsertRowid,
        ),
      get: (id) => {
        const r = q.roGet.get(id);
        return r ? rollout(r) : null;
      },
      list: ({ name, active, limit }) => q.roList.all({ name: name ?? null, active: active ? 1 : 0, limit }).map(rollout),
      setStatus: (id, status, at) => void q.roStatus.run(JSON.stringify(status), status.state, at, id),
      members: (id) =>
        q.roMembers.all(id).map(
          (r): RolloutMemberRow => ({
            rolloutId: r.rollout_id,
            deviceId: r.device_id,
            wave: r.wave,
            previous: r.previous === null ? null : (JSON.parse(r.previous) as ModelSlot),
            enlistedAt: r.enlisted_at,
            assignedAt: r.assigned_at,
          }),
        ),
      addMember: (m) => void q.roAddMember.run({ ...m, previous: m.previous === null ? null : JSON.stringify(m.previous) }),
    },
    safeMode: {
      insert: (r) => Number(q.smInsert.run(JSON.stringify(r.selector), r.since, r.by, r.reason).lastInsertRowid),
      list: () => q.smList.all().map((r): SafeModeRecord => ({ id: r.id, selector: JSON.parse(r.selector) as Selector, since: r.since, by: r.actor, reason: r.reason })),
      remove: (id) => void q.smRemove.run(id),
    },
    fl: flRepository(db),
    audit: {
      append: (e) => Number(q.aAppend.run(e.ts, e.actor, e.action, e.target, e.ok ? 1 : 0, e.detail === undefined ? null : JSON.stringify(e.detail)).lastInsertRowid),
      list: ({ limit, target }) =>
        (target === undefined ? q.aList.all(limit) : q.aListTarget.all(target, limit)).map(
          (r): AuditRow => ({ ...r, ok: r.ok === 1, detail: r.detail === null ? null : (JSON.parse(r.detail) as unknown) }),
        ),
    },
    close: () => db.close(),
  };
}
