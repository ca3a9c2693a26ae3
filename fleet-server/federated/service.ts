import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  EdgefleetError,
  FRAME_FL_UPDATE,
  FlUpMessage,
  MAX_PAYLOAD_BYTES,
  RoundConfig,
  decodeJson,
  encodeJson,
  modelRef,
  peekFlFrameMeta,
  summarizeIssues,
  topics,
  type FlDownMessage,
  type RoundConfigInput,
  type RoundView,
  type Selector,
  type SignedManifest,
  type UpdateRejection,
  type ErrorCode,
} from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';
import type { Logger } from '../../common/log.js';
import type { FleetStore, FlParticipantRow, FlRoundRow, FlScheduleRow } from '../store/types.js';
import type { Registry } from '../registry/registry.js';
import type { ArtifactStore } from '../registry/blobs.js';
import { checkUpdate } from './intake.js';
import { eligibleDevices, emptyStatus, inviteCount, quorumReason, roundView, type DeviceLook } from './rounds.js';
import { readModelWeights, sharedSpecs, type ModelWeights, type WeightSpec } from './weights.js';
import { RoundFinisher } from './finish.js';

/**
 * Federated rounds: start, invite, collect, then hand over to the finisher (aggregate, evaluate,
 * register). Every change of a round and its participants is one transaction, so a fleet that
 * restarts mid-round finds exactly the updates it had counted, and their files beside them.
 */

export interface RoundServiceDeps {
  store: FleetStore;
  registry: Registry;
  blobs: ArtifactStore;
  publish: (topic: string, payload: Buffer, opts: { qos: 0 | 1; retain: boolean }) => Promise<void>;
  startRollout: (p: { name: string; version: number; selector?: Selector | undefined; plan?: unknown }, by: string) => Promise<{ rollout: { id: number } | null }>;
  /** Counts a refused device message (the fleet's reject counter). */
  reject: (code: ErrorCode, deviceId: string, detail: Record<string, unknown>) => void;
  log: Logger;
  now: () => number;
  dataDir: string;
  intervalMs: number;
}

export interface RoundBase {
  signed: SignedManifest;
  sha256: string;
  weights: ModelWeights;
  shared: { specs: WeightSpec[]; offsets: number[] };
}

export class RoundService {
  private timer: NodeJS.Timeout | null = null;
  private readonly bases = new Map<number, RoundBase>();
  private readonly finisher: RoundFinisher;
  private ticking: Promise<void> | null = null;

  constructor(private readonly deps: RoundServiceDeps) {
    this.finisher = new RoundFinisher(deps, (id) => this.base(this.round(id)), (id) => this.cleanup(id));
  }

  /**
   * Resumes the rounds a stopped fleet left running: invitations and candidates go out again to the
   * devices that have not answered (a device ignores a round it already works on), and deadlines
   * that passed meanwhile are acted on at the first tick.
   */
  async start(): Promise<void> {
    for (const row of this.deps.store.fl.listRounds({ active: true, limit: 1000 })) {
      const role = row.state === 'collecting' ? 'train' : 'eval';
      const waiting = this.deps.store.fl.participants(row.id, role).filter((p) => p.state === 'invited').map((p) => p.deviceId);
      if (row.state === 'collecting') await this.inviteAll(row, waiting);
      else {
        const frame = join(this.dir(row.id), 'candidate.frame');
        if (!existsSync(frame)) this.finisher.evaluate(row.id);
        else {
          const payload = readFileSync(frame);
          await Promise.all(waiting.map((d) => this.deps.publish(topics.down(d, 'candidate'), payload, { qos: 1, retain: false }).catch(() => undefined)));
        }
      }
      this.deps.log.info({ round: row.id, state: row.state, waiting: waiting.length }, 'federated round resumed');
    }
    this.timer = setInterval(() => void this.tick(), this.deps.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.ticking;
    await this.finisher.idle();
  }

  /** The round's directory: accepted updates and the candidate, until the round ends. */
  dir(id: number): string {
    return join(this.deps.dataDir, 'fl', `round-${id}`);
  }

  private round(id: number): FlRoundRow {
    const row = this.deps.store.fl.getRound(id);
    if (!row) throw new EdgefleetError('EF_UNKNOWN_ROUND', `no round ${id}`);
    return row;
  }

  /** The round's base (manifest, weights, the weights that travel), read once per round. */
  base(row: Pick<FlRoundRow, 'id' | 'model' | 'baseVersion'>): RoundBase {
    let b = this.bases.get(row.id);
    if (!b) {
      b = this.loadBase(row.model, row.baseVersion);
      this.bases.set(row.id, b);
    }
    return b;
  }

  private loadBase(model: string, baseVersion: number): RoundBase {
    const version = this.deps.registry.get(model, baseVersion);
    const signed = this.deps.registry.signed(version);
    const manifest = signed.manifest;
    if (!manifest.training) throw new EdgefleetError('EF_MODEL_INVALID', `${modelRef(model, baseVersion)} has no training section: devices cannot train it`);
    const weights = readModelWeights(manifest, (f) => this.deps.blobs.pathOf(f.sha256));
    return { signed, sha256: version.manifestSha256, weights, shared: sharedSpecs(weights.specs, manifest.training.personalLayers) };
  }

  view(id: number): RoundView {
    const row = this.round(id);
    return roundView(row, this.deps.store.fl.participants(id, 'train'));
  }

  list(opts: { model?: string | undefined; active?: boolean | undefined; limit: number }): RoundView[] {
    return this.deps.store.fl.listRounds(opts).map((r) => roundView(r, r.state === 'collecting' ? this.deps.store.fl.participants(r.id, 'train') : []));
  }

  /** Starts a round now. A round that cannot reach its quorum is recorded as failed, with the reason, and returned. */
  async startRound(input: unknown, by: string, scheduleId: number | null = null): Promise<RoundView> {
    const parsed = RoundConfig.safeParse(input);
    if (!parsed.success) throw new EdgefleetError('EF_BAD_PARAMS', summarizeIssues(parsed.error.issues), { details: parsed.error.issues });
    const cfg = parsed.data;
    const { store, registry, now } = this.deps;
    const baseVersion = cfg.baseVersion ?? registry.list(cfg.model).find((v) => v.status === 'production')?.version;
    if (baseVersion === undefined) throw new EdgefleetError('EF_UNKNOWN_MODEL', `${cfg.model} has no production version; give baseVersion`);
    const active = store.fl.listRounds({ model: cfg.model, active: true, limit: 1 })[0];
    if (active) throw new EdgefleetError('EF_ROUND_CONFLICT', `round ${active.id} of ${cfg.model} is still ${active.state}`);
    const t = now();
    const base = this.loadBase(cfg.model, baseVersion);
    const devices: DeviceLook[] = store.devices.list().map((d) => ({ id: d.id, tags: d.tags, online: d.presence === 'online', reported: store.reported.get(d.id)?.doc ?? null }));
    const eligible = eligibleDevices(devices, cfg, baseVersion, base.sha256, `${cfg.model}:${t}`);
    const k = inviteCount(eligible.length, cfg.selection);
    const short = eligible.length < cfg.selection.minParticipants;
    const status = emptyStatus(eligible.length, short ? 0 : k);
    const id = store.transaction(() => {
      const id = store.fl.insertRound({
        model: cfg.model,
        baseVersion,
        baseManifestSha256: base.sha256,
        config: cfg,
        state: short ? 'failed' : 'collecting',
        reason: short ? quorumReason(status, cfg.selection.minParticipants, 'start') : null,
        status,
        eligible,
        scheduleId,
        createdBy: by,
        createdAt: t,
        deadlineAt: t + cfg.deadlineSec * 1000,
        evalDeadlineAt: null,
        updatedAt: t,
      });
      if (!short) for (const deviceId of eligible.slice(0, k)) store.fl.putParticipant({ roundId: id, role: 'train', deviceId, state: 'invited', detail: null, samples: null, metrics: null, at: t });
      store.audit.append({ ts: t, actor: by, action: 'fl.round.started', target: `round-${id}`, ok: !short, detail: { model: cfg.model, baseVersion, eligible: eligible.length, invited: short ? 0 : k } });
      return id;
    });
    const row = this.round(id);
    this.deps.log.info({ round: id, model: cfg.model, baseVersion, eligible: eligible.length, invited: status.counts.invited }, short ? 'federated round failed at start' : 'federated round started');
    if (!short) {
      this.bases.set(id, base);
      mkdirSync(this.dir(id), { recursive: true });
      await this.inviteAll(row, eligible.slice(0, k));
    }
    return this.view(id);
  }

  private async inviteAll(row: FlRoundRow, ids: readonly string[]): Promise<void> {
    const msg: FlDownMessage = {
      kind: 'invite',
      roundId: row.id,
      model: row.model,
      baseVersion: row.baseVersion,
      baseManifestSha256: row.baseManifestSha256,
      train: row.config.train,
      minSamples: row.config.selection.minSamples,
      deadlineAt: row.deadlineAt,
    };
    const payload = encodeJson(msg);
    await Promise.all(ids.map((d) => this.deps.publish(topics.down(d, 'fl'), payload, { qos: 1, retain: false }).catch((err: unknown) => this.deps.log.warn({ err, deviceId: d }, 'invitation not sent'))));
  }

  private async cancelAll(row: FlRoundRow, role: 'train' | 'eval', states: readonly FlParticipantRow['state'][]): Promise<void> {
    const payload = encodeJson({ kind: 'cancel', roundId: row.id } satisfies FlDownMessage);
    const ids = this.deps.store.fl.participants(row.id, role).filter((p) => states.includes(p.state)).map((p) => p.deviceId);
    await Promise.all(ids.map((d) => this.deps.publish(topics.down(d, 'fl'), payload, { qos: 1, retain: false }).catch(() => undefined)));
  }

  async abort(id: number, by: string): Promise<RoundView> {
    const row = this.round(id);
    if (row.state !== 'collecting' && row.state !== 'evaluating') throw new EdgefleetError('EF_ROUND_CONFLICT', `round ${id} is already ${row.state}`);
    const t = this.deps.now();
    this.deps.store.transaction(() => {
      this.deps.store.fl.updateRound(id, { state: 'aborted', reason: `aborted by ${by}`, status: row.status, evalDeadlineAt: row.evalDeadlineAt, updatedAt: t });
      this.deps.store.audit.append({ ts: t, actor: by, action: 'fl.round.aborted', target: `round-${id}`, ok: true, detail: null });
    });
    await this.cancelAll(row, row.state === 'collecting' ? 'train' : 'eval', ['invited', 'joined']);
    this.cleanup(id);
    return this.view(id);
  }

  cleanup(id: number): void {
    this.bases.delete(id);
    rmSync(this.dir(id), { recursive: true, force: true });
  }

  // -------------------------------------------------------------------------------------------
  // Device traffic

  async handle(deviceId: string, kind: 'fl' | 'update', payload: Buffer): Promise<void> {
    if (kind === 'update') return this.update(deviceId, payload);
    const decoded = decodeJson(FlUpMessage, payload, MAX_PAYLOAD_BYTES.fl);
    if (!decoded.ok) {
      this.deps.reject(decoded.error.code, deviceId, { kind: 'fl', message: decoded.error.message.slice(0, 200) });
      this.deps.store.devices.addRejected(deviceId, 1);
      return;
    }
    const msg = decoded.value;
    const row = this.deps.store.fl.getRound(msg.roundId);
    if (!row) return;
    const t = this.deps.now();
    if (msg.kind === 'evaluation' || (msg.kind === 'decline' && row.state === 'evaluating')) {
      const p = this.deps.store.fl.participant(row.id, 'eval', deviceId);
      if (row.state !== 'evaluating' || !p || p.state !== 'invited') return;
      this.deps.store.transaction(() => {
        if (msg.kind === 'evaluation') {
          this.deps.store.fl.putParticipant({ ...p, state: 'evaluated', metrics: msg.metrics, at: t });
          row.status.counts.evaluations++;
        } else this.deps.store.fl.putParticipant({ ...p, state: 'declined', detail: `${msg.reason}${msg.detail ? `: ${msg.detail}` : ''}`, at: t });
        this.deps.store.fl.updateRound(row.id, { ...row, updatedAt: t });
      });
      const outstanding = this.deps.store.fl.participants(row.id, 'eval').some((x) => x.state === 'invited');
      if (!outstanding) this.finisher.evaluate(row.id);
      return;
    }
    const p = this.deps.store.fl.participant(row.id, 'train', deviceId);
    if (row.state !== 'collecting' || !p || (p.state !== 'invited' && p.state !== 'joined')) return;
    if (msg.kind === 'join') {
      if (p.state !== 'invited') return;
      this.deps.store.transaction(() => {
        this.deps.store.fl.putParticipant({ ...p, state: 'joined', samples: msg.sampleCount, at: t });
        row.status.counts.joined++;
        this.deps.store.fl.updateRound(row.id, { ...row, updatedAt: t });
      });
      return;
    }
    // A decline or a failure: the device is out; the next eligible device not yet asked takes its place.
    const replacement = t < row.deadlineAt ? this.nextEligible(row) : null;
    const detail = msg.kind === 'decline' ? `${msg.reason}${msg.detail ? `: ${msg.detail}` : ''}` : `${msg.code}: ${msg.message}`;
    this.deps.store.transaction(() => {
      this.deps.store.fl.putParticipant({ ...p, state: msg.kind === 'decline' ? 'declined' : 'failed', detail, at: t });
      if (msg.kind === 'decline') {
        row.status.counts.declined++;
        row.status.declines[msg.reason] = (row.status.declines[msg.reason] ?? 0) + 1;
      } else row.status.counts.failed++;
      if (replacement) {
        this.deps.store.fl.putParticipant({ roundId: row.id, role: 'train', deviceId: replacement, state: 'invited', detail: null, samples: null, metrics: null, at: t });
        row.status.counts.invited++;
      }
      this.deps.store.fl.updateRound(row.id, { ...row, updatedAt: t });
    });
    if (replacement) await this.inviteAll(row, [replacement]);
    this.maybeComplete(row.id);
  }

  private collectingFor(deviceId: string): FlRoundRow | null {
    return this.deps.store.fl.listRounds({ active: true, limit: 1000 }).find((r) => r.state === 'collecting' && this.deps.store.fl.participant(r.id, 'train', deviceId) !== null) ?? null;
  }

  private nextEligible(row: FlRoundRow): string | null {
    const asked = new Set(this.deps.store.fl.participants(row.id, 'train').map((p) => p.deviceId));
    return row.eligible.find((d) => !asked.has(d)) ?? null;
  }

  private update(deviceId: string, payload: Buffer): Promise<void> {
    const t = this.deps.now();
    // The round id is in the bundle's header. An update too broken to name one is laid at the
    // door of the round collecting from this device, if there is one.
    const roundId = peekRoundId(payload);
    const row = roundId !== null ? this.deps.store.fl.getRound(roundId) : this.collectingFor(deviceId);
    const reject = (reason: UpdateRejection, detail: string): Promise<void> => {
      this.deps.log.info({ deviceId, round: row?.id ?? roundId, reason, detail }, 'federated update rejected');
      this.deps.reject(reason === 'oversized' ? 'EF_PAYLOAD_TOO_LARGE' : 'EF_BAD_PAYLOAD', deviceId, { kind: 'update', reason, round: row?.id ?? roundId });
      this.deps.store.devices.addRejected(deviceId, 1);
      if (row) {
        this.deps.store.transaction(() => {
          const fresh = this.round(row.id);
          fresh.status.rejected[reason] = (fresh.status.rejected[reason] ?? 0) + 1;
          this.deps.store.fl.updateRound(fresh.id, { ...fresh, updatedAt: t });
        });
      }
      return Promise.resolve();
    };
    if (!row) return reject('unknown-round', roundId === null ? 'no round id, and no round collecting from this device' : `round ${roundId}`);
    if (row.state !== 'collecting') return reject('late', `round ${row.id} is ${row.state}`);
    // The fold runs in a worker while the round still says collecting: it has its list of updates.
    if (this.finisher.busy(row.id)) return reject('late', `round ${row.id} is aggregating`);
    let specs: WeightSpec[];
    try {
      specs = this.base(row).shared.specs;
    } catch (err) {
      this.deps.log.error({ err, round: row.id }, 'cannot read the round’s base');
      return Promise.resolve();
    }
    const participant = this.deps.store.fl.participant(row.id, 'train', deviceId);
    const verdict = checkUpdate(payload, { round: row, participant, specs, now: t, maxBytes: MAX_PAYLOAD_BYTES.update });
    if (!verdict.ok) return reject(verdict.reason, verdict.detail);
    const r = row;
    // The file first, then the row that counts it: a crash between leaves a file nobody counts, never a count without its file.
    writeFileAtomic(join(this.dir(r.id), `${deviceId}.eftb`), payload);
    this.deps.store.transaction(() => {
      const fresh = this.round(r.id);
      this.deps.store.fl.putParticipant({ ...participant!, state: 'updated', samples: verdict.meta.sampleCount, metrics: { ...verdict.meta.metrics, norm: verdict.norm, normBeforeClip: verdict.meta.normBeforeClip, stoppedBy: verdict.meta.stoppedBy }, at: t });
      fresh.status.counts.updates++;
      fresh.status.counts.samples += verdict.meta.sampleCount;
      this.deps.store.fl.updateRound(fresh.id, { ...fresh, updatedAt: t });
    });
    this.deps.log.info({ deviceId, round: r.id, samples: verdict.meta.sampleCount, norm: verdict.norm }, 'federated update accepted');
    this.maybeComplete(r.id);
    return Promise.resolve();
  }

  /** Every invited device has answered (an update, a decline or a failure): no reason to wait for the deadline. */
  private maybeComplete(id: number): void {
    const row = this.round(id);
    if (row.state !== 'collecting') return;
    const waiting = this.deps.store.fl.participants(id, 'train').some((p) => p.state === 'invited' || p.state === 'joined');
    if (!waiting) this.finisher.collect(id);
  }

  // -------------------------------------------------------------------------------------------
  // Time: deadlines and schedules

  tick(): Promise<void> {
    this.ticking ??= this.tickOnce().finally(() => (this.ticking = null));
    return this.ticking;
  }

  private async tickOnce(): Promise<void> {
    const t = this.deps.now();
    for (const row of this.deps.store.fl.listRounds({ active: true, limit: 1000 })) {
      if (row.state === 'collecting' && t >= row.deadlineAt) this.finisher.collect(row.id);
      else if (row.state === 'evaluating' && row.evalDeadlineAt !== null && t >= row.evalDeadlineAt) this.finisher.evaluate(row.id);
    }
    for (const s of this.deps.store.fl.listSchedules()) {
      if (t < s.nextAt) continue;
      this.deps.store.fl.setScheduleNext(s.id, t + s.everySec * 1000);
      try {
        const v = await this.startRound(s.config, `schedule-${s.id}`, s.id);
        this.deps.log.info({ schedule: s.id, round: v.id, state: v.state }, 'scheduled federated round');
      } catch (err) {
        this.deps.log.warn({ err, schedule: s.id }, 'scheduled federated round not started');
      }
    }
  }

  schedule(config: RoundConfigInput, everySec: number, by: string): FlScheduleRow {
    const parsed = RoundConfig.safeParse(config);
    if (!parsed.success) throw new EdgefleetError('EF_BAD_PARAMS', summarizeIssues(parsed.error.issues), { details: parsed.error.issues });
    if (!Number.isInteger(everySec) || everySec < 60) throw new EdgefleetError('EF_BAD_PARAMS', 'everySec must be a whole number of seconds, at least 60');
    const t = this.deps.now();
    const row = { config: parsed.data, everySec, nextAt: t, createdBy: by, createdAt: t };
    const id = this.deps.store.transaction(() => {
      const id = this.deps.store.fl.insertSchedule(row);
      this.deps.store.audit.append({ ts: t, actor: by, action: 'fl.schedule.added', target: `schedule-${id}`, ok: true, detail: { model: parsed.data.model, everySec } });
      return id;
    });
    return { id, ...row };
  }

  schedules(): FlScheduleRow[] {
    return this.deps.store.fl.listSchedules();
  }

  unschedule(id: number, by: string): boolean {
    const t = this.deps.now();
    return this.deps.store.transaction(() => {
      const ok = this.deps.store.fl.removeSchedule(id);
      this.deps.store.audit.append({ ts: t, actor: by, action: 'fl.schedule.removed', target: `schedule-${id}`, ok, detail: null });
      return ok;
    });
  }
}

/** The round id an update frame names, from its header alone; null if unreadable. */
function peekRoundId(payload: Uint8Array): number | null {
  const id = peekFlFrameMeta(FRAME_FL_UPDATE, payload)?.roundId;
  return typeof id === 'number' && Number.isSafeInteger(id) && id > 0 ? id : null;
}
