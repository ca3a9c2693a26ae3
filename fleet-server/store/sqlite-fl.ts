import type { RoundConfig, RoundState } from '../../proto/index.js';
import type { Db } from './db.js';
import type { FleetStore, FlParticipantRow, FlParticipantState, FlRole, FlRoundRow, FlRoundStatus, FlScheduleRow } from './types.js';

/** The federated-learning repository (migration v6), apart from sqlite.ts to keep each file to one concern. */

interface RoundSql {
  id: number;
  model: string;
  base_version: number;
  base_sha256: string;
  config: string;
  state: RoundState;
  reason: string | null;
  status: string;
  eligible: string;
  schedule_id: number | null;
  created_by: string;
  created_at: number;
  deadline_at: number;
  eval_deadline_at: number | null;
  updated_at: number;
}
interface ParticipantSql {
  round_id: number;
  role: FlRole;
  device_id: string;
  state: FlParticipantState;
  detail: string | null;
  samples: number | null;
  metrics: string | null;
  at: number;
}
interface ScheduleSql {
  id: number;
  config: string;
  every_sec: number;
  next_at: number;
  created_by: string;
  created_at: number;
}

const round = (r: RoundSql): FlRoundRow => ({
  id: r.id,
  model: r.model,
  baseVersion: r.base_version,
  baseManifestSha256: r.base_sha256,
  config: JSON.parse(r.config) as RoundConfig,
  state: r.state,
  reason: r.reason,
  status: JSON.parse(r.status) as FlRoundStatus,
  eligible: JSON.parse(r.eligible) as string[],
  scheduleId: r.schedule_id,
  createdBy: r.created_by,
  createdAt: r.created_at,
  deadlineAt: r.deadline_at,
  evalDeadlineAt: r.eval_deadline_at,
  updatedAt: r.updated_at,
});

const participant = (r: ParticipantSql): FlParticipantRow => ({
  roundId: r.round_id,
  role: r.role,
  deviceId: r.device_id,
  state: r.state,
  detail: r.detail,
  samples: r.samples,
  metrics: r.metrics === null ? null : (JSON.parse(r.metrics) as unknown),
  at: r.at,
});

export function flRepository(db: Db): FleetStore['fl'] {
  const q = {
    insert: db.prepare(
      `INSERT INTO fl_rounds (model, base_version, base_sha256, config, state, reason, status, eligible, schedule_id, created_by, created_at, deadline_at, eval_deadline_at, updated_at)
       VALUES (@model, @baseVersion, @baseManifestSha256, @config, @state, @reason, @status, @eligible, @scheduleId, @createdBy, @createdAt, @deadlineAt, @evalDeadlineAt, @updatedAt)`,
    ),
    get: db.prepare<[number], RoundSql>('SELECT * FROM fl_rounds WHERE id = ?'),
    list: db.prepare<{ model: string | null; active: number; limit: number }, RoundSql>(
      `SELECT * FROM fl_rounds WHERE (@model IS NULL OR model = @model) AND (@active = 0 OR state IN ('collecting', 'evaluating')) ORDER BY id DESC LIMIT @limit`,
    ),
    update: db.prepare('UPDATE fl_rounds SET state = @state, reason = @reason, status = @status, eval_deadline_at = @evalDeadlineAt, updated_at = @updatedAt WHERE id = @id'),
    parts: db.prepare<[number, FlRole], ParticipantSql>('SELECT * FROM fl_participants WHERE round_id = ? AND role = ? ORDER BY at, device_id'),
    part: db.prepare<[number, FlRole, string], ParticipantSql>('SELECT * FROM fl_participants WHERE round_id = ? AND role = ? AND device_id = ?'),
    putPart: db.prepare(
      `INSERT OR REPLACE INTO fl_participants (round_id, role, device_id, state, detail, samples, metrics, at)
       VALUES (@roundId, @role, @deviceId, @state, @detail, @samples, @metrics, @at)`,
    ),
    state: db.prepare<[string], { state: Buffer }>('SELECT state FROM fl_server_state WHERE model = ?'),
    putState: db.prepare('INSERT OR REPLACE INTO fl_server_state (model, state, updated_at) VALUES (?, ?, ?)'),
    sInsert: db.prepare('INSERT INTO fl_schedules (config, every_sec, next_at, created_by, created_at) VALUES (?, ?, ?, ?, ?)'),
    sList: db.prepare<[], ScheduleSql>('SELECT * FROM fl_schedules ORDER BY id'),
    sNext: db.prepare('UPDATE fl_schedules SET next_at = ? WHERE id = ?'),
    sRemove: db.prepare('DELETE FROM fl_schedules WHERE id = ?'),
  };
  return {
    insertRound: (r) =>
      Number(
        q.insert.run({
          ...r,
          config: JSON.stringify(r.config),
          status: JSON.stringify(r.status),
          eligible: JSON.stringify(r.eligible),
        }).lastInsertRowid,
      ),
    getRound: (id) => {
      const r = q.get.get(id);
      return r ? round(r) : null;
    },
    listRounds: ({ model, active, limit }) => q.list.all({ model: model ?? null, active: active ? 1 : 0, limit }).map(round),
    updateRound: (id, u) => void q.update.run({ id, state: u.state, reason: u.reason, status: JSON.stringify(u.status), evalDeadlineAt: u.evalDeadlineAt, updatedAt: u.updatedAt }),
    participants: (roundId, role) => q.parts.all(roundId, role).map(participant),
    participant: (roundId, role, deviceId) => {
      const r = q.part.get(roundId, role, deviceId);
      return r ? participant(r) : null;
    },
    putParticipant: (p) => void q.putPart.run({ ...p, metrics: p.metrics === null || p.metrics === undefined ? null : JSON.stringify(p.metrics) }),
    serverState: (model) => {
      const r = q.state.get(model);
      return r ? new Uint8Array(r.state) : null;
    },
    putServerState: (model, state, at) => void q.putState.run(model, Buffer.from(state.buffer, state.byteOffset, state.byteLength), at),
    insertSchedule: (s) => Number(q.sInsert.run(JSON.stringify(s.config), s.everySec, s.nextAt, s.createdBy, s.createdAt).lastInsertRowid),
    listSchedules: () =>
      q.sList.all().map((r): FlScheduleRow => ({ id: r.id, config: JSON.parse(r.config) as RoundConfig, everySec: r.every_sec, nextAt: r.next_at, createdBy: r.created_by, createdAt: r.created_at })),
    setScheduleNext: (id, nextAt) => void q.sNext.run(nextAt, id),
    removeSchedule: (id) => q.sRemove.run(id).changes > 0,
  };
}
