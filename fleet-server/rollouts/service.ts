import { createHash } from 'node:crypto';
import {
  EdgefleetError,
  MODEL_STATUSES,
  RolloutPlan,
  canonicalJson,
  defaultDesiredDoc,
  defaultPlan,
  modelRef,
  type DesiredDoc,
  type ModelSlot,
  type ModelSlotReport,
  type ModelStatus,
  type ReportedMessage,
  type RolloutCommand,
  type RolloutStatus,
  type RolloutView,
  type SafeModeRecord,
  type Selector,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { Registry } from '../registry/registry.js';
import type { DesiredRow, FleetStore, RolloutRow } from '../store/types.js';
import type { DesiredStateService } from '../sync/desired.js';
import { command, contradicts, initialStatus, isFinal, reconcile, type Decision, type DeviceObservation, type Member, type Observations, type RolloutSpecData } from './reconcile.js';

/** What the fleet knows of one device, kept in memory so a reconcile over ten thousand devices costs milliseconds. */
interface DeviceView {
  id: string;
  /** Raised on every change, so a rollout's observation of the device is rebuilt only when it moved. */
  rev: number;
  tags: string[];
  /** Connected now, as its presence messages say. */
  online: boolean;
  desiredVersion: number;
  doc: DesiredDoc;
  report: Pick<ReportedMessage, 'desiredVersion' | 'models'> | null;
}

interface Tracked {
  spec: RolloutSpecData;
  status: RolloutStatus;
  members: Map<string, Member>;
  /** The sticky order: sha256 of rollout id and device id, computed once per device. */
  ranks: Map<string, string>;
  /** Observations as last built, per device, with what they were built from. */
  seen: Map<string, { rev: number; member: Member | null; obs: DeviceObservation }>;
  /** Contradicting reports received (persisted in the status). */
  contradictions: number;
  /** The selector as a predicate, built once. */
  match: (d: { id: string; tags: readonly string[] }) => boolean;
  createdBy: string;
  createdAt: number;
}

export interface RolloutServiceOptions {
  store: FleetStore;
  desired: DesiredStateService;
  registry: Registry;
  log: Logger;
  now?: () => number;
  /** The timer that moves time-based steps (pauses, windows, timeouts). */
  intervalMs?: number;
  /** Reports arriving together are reconciled together, this long after the first. */
  debounceMs?: number;
}

/** Devices whose desired state is written and published per step of a large change. */
const CHUNK = 500;

/** A selector as a fast predicate (a list of ten thousand ids is a set, not a scan). */
function matcher(selector: Selector): (d: { id: string; tags: readonly string[] }) => boolean {
  switch (selector.kind) {
    case 'all':
      return () => true;
    case 'tags':
      return (d) => selector.tags.every((t) => d.tags.includes(t));
    case 'devices': {
      const ids = new Set(selector.deviceIds);
      return (d) => ids.has(d.id);
    }
  }
}

function sameSelector(a: Selector, b: Selector): boolean {
  return canonicalJson(a) === canonicalJson(b);
}

/**
 * Runs staged rollouts and safe mode: keeps the in-memory view the reconciler reads, calls it on
 * reports (debounced) and on a timer, and carries out what it decides. Everything it decides is
 * stored before it is published, so a restart resumes from the database and the retained messages.
 */
export class RolloutService {
  private readonly store: FleetStore;
  private readonly desired: DesiredStateService;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly devices = new Map<string, DeviceView>();
  private readonly tracked = new Map<number, Tracked>();
  private timer: NodeJS.Timeout | null = null;
  private pending: NodeJS.Timeout | null = null;
  private queue: Promise<void> = Promise.resolve();
  private stopped = false;
  /** How long the last reconcile of every rollout took: the debounce grows with it under load. */
  private lastRunMs = 0;
  private readonly listeners = new Set<(view: RolloutView) => void>();
  private readonly inflight = new Set<Promise<void>>();

  constructor(private readonly opts: RolloutServiceOptions) {
    this.store = opts.store;
    this.desired = opts.desired;
    this.log = opts.log;
    this.now = opts.now ?? Date.now;
    this.desired.observe((row) => this.onDesired(row));
  }

  /** Loads the view and every rollout still moving (or still reverting), then reconciles them. */
  async start(): Promise<void> {
    for (const d of this.store.devices.list()) {
      const desired = this.store.desired.get(d.id);
      const reported = this.store.reported.get(d.id);
      this.devices.set(d.id, {
        id: d.id,
        rev: 0,
        tags: d.tags,
        online: d.presence === 'online',
        desiredVersion: desired?.version ?? 0,
        doc: desired?.doc ?? defaultDesiredDoc(),
        report: reported ? { desiredVersion: reported.doc.desiredVersion, models: reported.doc.models } : null,
      });
    }
    for (const row of this.store.rollouts.list({ limit: 1000 })) {
      const s = row.status;
      const reverting = s.revert !== null && s.revert.reverted < s.revert.devices;
      if (!isFinal(s) || reverting) this.track(row);
    }
    if (this.tracked.size > 0) this.log.info({ rollouts: [...this.tracked.keys()] }, 'resuming rollouts');
    this.timer = setInterval(() => this.kick(), this.opts.intervalMs ?? 1000);
    this.timer.unref();
    await this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.pending) clearTimeout(this.pending);
    this.timer = this.pending = null;
    await this.queue;
    await Promise.allSettled([...this.inflight]);
  }

  /** Called with a rollout's view whenever its status changes (the benchmark and tests watch it). */
  onStatus(fn: (view: RolloutView) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  // ---------------------------------------------------------------------------------------------
  // What the rest of the fleet tells it

  deviceAdded(id: string, tags: readonly string[], row: DesiredRow): void {
    this.devices.set(id, { id, rev: 0, tags: [...tags], online: false, desiredVersion: row.version, doc: row.doc, report: null });
  }

  deviceRemoved(id: string): void {
    this.devices.delete(id);
  }

  tagsChanged(id: string, tags: readonly string[]): void {
    const d = this.devices.get(id);
    if (d) {
      d.tags = [...tags];
      d.rev++;
    }
    this.schedule();
  }

  presence(deviceId: string, online: boolean): void {
    const d = this.devices.get(deviceId);
    if (!d || d.online === online) return;
    d.online = online;
    d.rev++;
    this.schedule();
  }

  reported(deviceId: string, msg: ReportedMessage): void {
    const d = this.devices.get(deviceId);
    if (!d) return;
    d.report = { desiredVersion: msg.desiredVersion, models: msg.models };
    d.rev++;
    if (this.tracked.size === 0) return;
    // Judged as it arrives: the device's next report may replace it before a reconcile runs.
    for (const t of this.tracked.values()) {
      if (isFinal(t.status)) continue;
      const member = t.members.get(d.id) ?? null;
      const selected = t.match(d);
      if ((selected || member) && contradicts(t.spec, this.observation(t, d, member, selected))) {
        t.contradictions++;
        this.log.warn({ rollout: t.spec.id, deviceId }, 'a report contradicts the fleet state; counted and ignored');
      }
    }
    this.schedule();
  }

  private onDesired(row: DesiredRow): void {
    const d = this.devices.get(row.deviceId);
    if (!d) return;
    d.desiredVersion = row.version;
    d.doc = row.doc;
    d.rev++;
  }

  /** The document a new device starts with: in safe mode when a safe-mode record selects it. */
  initialDoc(id: string, tags: readonly string[], base: DesiredDoc): DesiredDoc {
    const on = this.store.safeMode.list().some((r) => matcher(r.selector)({ id, tags }));
    return on ? { ...base, safeMode: true } : base;
  }

  // ---------------------------------------------------------------------------------------------
  // Operator methods

  async startRollout(p: { name: string; version: number; selector?: Selector | undefined; plan?: unknown }, by: string): Promise<{ rollout: RolloutView | null; noop: string | null }> {
    return this.serial(async () => {
      const parsed = RolloutPlan.safeParse(p.plan ?? defaultPlan());
      if (!parsed.success) {
        const errors = parsed.error.issues.map((i) => `${i.path.length > 0 ? i.path.join('.') : '(plan)'}: ${i.message}`);
        throw new EdgefleetError('EF_PLAN_INVALID', `the plan has ${errors.length} error(s):\n  ${errors.join('\n  ')}`, { details: errors });
      }
      const row = this.opts.registry.assignable(p.name, p.version);
      const selector = p.selector ?? { kind: 'all' };
      for (const t of this.tracked.values()) {
        if (t.spec.name === p.name && !isFinal(t.status)) {
          throw new EdgefleetError('EF_ROLLOUT_CONFLICT', `rollout ${t.spec.id} of ${modelRef(t.spec.name, t.spec.version)} is ${t.status.state}; finish or abort it first`);
        }
      }
      const match = matcher(selector);
      const selected = [...this.devices.values()].filter(match);
      if (selected.length === 0) throw new EdgefleetError('EF_BAD_PARAMS', 'the selector matches no device');
      const safe = selected.filter((d) => d.doc.safeMode === true).length;
      if (safe > 0) throw new EdgefleetError('EF_SAFE_MODE', `${safe} selected device(s) are in safe mode; turn it off (edgefleet safe-mode off) before a rollout`);
      if (selected.every((d) => d.doc.models[p.name]?.version === p.version)) {
        return { rollout: null, noop: `every selected device (${selected.length}) already has ${modelRef(p.name, p.version)} in desired state: nothing to roll out` };
      }
      const now = this.now();
      const status = initialStatus(now);
      const base = { name: p.name, version: p.version, manifestSha256: row.manifestSha256, selector, plan: parsed.data, status, createdBy: by, createdAt: now };
      const id = this.store.transaction(() => {
        const id = this.store.rollouts.insert(base);
        this.store.audit.append({ ts: now, actor: by, action: 'rollout.started', target: modelRef(p.name, p.version), ok: true, detail: { rollout: id, selector, steps: parsed.data.steps.length, selected: selected.length } });
        return id;
      });
      const t = this.track({ id, ...base });
      this.log.info({ rollout: id, model: modelRef(p.name, p.version), selected: selected.length }, 'rollout started');
      await this.reconcileOne(t);
      return { rollout: this.view(t), noop: null };
    });
  }

  async command(id: number, cmd: RolloutCommand, by: string, reason?: string): Promise<RolloutView> {
    return this.serial(async () => {
      const t = this.tracked.get(id) ?? this.loadEnded(id);
      const decision = command(t.spec, t.status, cmd, by, reason, this.observe(t));
      await this.execute(t, decision);
      return this.view(t);
    });
  }

  show(id: number): RolloutView {
    const t = this.tracked.get(id);
    if (t) return this.view(t);
    const row = this.store.rollouts.get(id);
    if (!row) throw new EdgefleetError('EF_UNKNOWN_ROLLOUT', `no rollout ${id}`);
    return viewOf(row);
  }

  list(opts: { name?: string | undefined; active?: boolean | undefined; limit: number }): RolloutView[] {
    return this.store.rollouts.list(opts).map((r) => (this.tracked.has(r.id) ? this.view(this.tracked.get(r.id) as Tracked) : viewOf(r)));
  }

  async safeModeOn(selector: Selector, reason: string | undefined, by: string): Promise<{ record: SafeModeRecord; devices: number }> {
    return this.serial(async () => {
      const match = matcher(selector);
      const ids = [...this.devices.values()].filter(match).map((d) => d.id);
      const since = this.now();
      const { record, changes } = this.store.transaction(() => {
        const record: SafeModeRecord = { id: 0, selector, since, by, reason: reason ?? null };
        record.id = this.store.safeMode.insert(record);
        const changes = this.desired.changeMany(ids, (doc) => (doc.safeMode ? doc : { ...doc, safeMode: true }));
        this.store.audit.append({ ts: since, actor: by, action: 'safe-mode.on', target: null, ok: true, detail: { record: record.id, selector, devices: ids.length, ...(reason ? { reason } : {}) } });
        return { record, changes };
      });
      this.log.warn({ selector, devices: ids.length, by }, 'safe mode on');
      await this.publish(changes);
      this.schedule();
      return { record, devices: ids.length };
    });
  }

  async safeModeOff(selector: Selector | undefined, by: string): Promise<{ ended: SafeModeRecord[]; devices: number }> {
    return this.serial(async () => {
      const records = this.store.safeMode.list();
      const ended = selector ? records.filter((r) => sameSelector(r.selector, selector)) : records;
      if (selector && ended.length === 0) throw new EdgefleetError('EF_BAD_PARAMS', 'no safe mode was turned on with that selector (safe-mode status lists them)');
      const left = records.filter((r) => !ended.includes(r)).map((r) => matcher(r.selector));
      const ids = [...this.devices.values()].filter((d) => d.doc.safeMode === true && !left.some((m) => m(d))).map((d) => d.id);
      const at = this.now();
      const changes = this.store.transaction(() => {
        for (const r of ended) this.store.safeMode.remove(r.id);
        const changes = this.desired.changeMany(ids, (doc) => {
          if (!doc.safeMode) return doc;
          const { safeMode: _off, ...rest } = doc;
          return rest;
        });
        this.store.audit.append({ ts: at, actor: by, action: 'safe-mode.off', target: null, ok: true, detail: { records: ended.map((r) => r.id), devices: ids.length } });
        return changes;
      });
      this.log.warn({ devices: ids.length, by }, 'safe mode off');
      await this.publish(changes);
      this.schedule();
      return { ended, devices: ids.length };
    });
  }

  safeModeStatus(): { records: SafeModeRecord[]; devices: number; converged: number } {
    let devices = 0;
    let converged = 0;
    for (const d of this.devices.values()) {
      if (d.doc.safeMode !== true) continue;
      devices++;
      const r = d.report;
      if (r && r.desiredVersion >= d.desiredVersion && Object.values(r.models).every((m: ModelSlotReport) => m.fallback === null || m.active === m.fallback)) converged++;
    }
    return { records: this.store.safeMode.list(), devices, converged };
  }

  // ---------------------------------------------------------------------------------------------
  // The loop

  private track(row: RolloutRow): Tracked {
    const members = new Map<string, Member>();
    for (const m of this.store.rollouts.members(row.id)) members.set(m.deviceId, { wave: m.wave, previous: m.previous, enlistedAt: m.enlistedAt });
    const t: Tracked = {
      spec: { id: row.id, name: row.name, version: row.version, manifestSha256: row.manifestSha256, selector: row.selector, plan: row.plan },
      status: row.status,
      members,
      ranks: new Map(),
      seen: new Map(),
      contradictions: row.status.contradictions,
      match: matcher(row.selector),
      createdBy: row.createdBy,
      createdAt: row.createdAt,
    };
    this.tracked.set(row.id, t);
    return t;
  }

  private loadEnded(id: number): Tracked {
    const row = this.store.rollouts.get(id);
    if (!row) throw new EdgefleetError('EF_UNKNOWN_ROLLOUT', `no rollout ${id}`);
    const members = new Map<string, Member>();
    for (const m of this.store.rollouts.members(row.id)) members.set(m.deviceId, { wave: m.wave, previous: m.previous, enlistedAt: m.enlistedAt });
    return { spec: { id: row.id, name: row.name, version: row.version, manifestSha256: row.manifestSha256, selector: row.selector, plan: row.plan }, status: row.status, members, ranks: new Map(), seen: new Map(), contradictions: row.status.contradictions, match: matcher(row.selector), createdBy: row.createdBy, createdAt: row.createdAt };
  }

  private schedule(): void {
    if (this.pending || this.stopped) return;
    this.pending = setTimeout(() => {
      this.pending = null;
      this.kick();
    }, Math.min(250, Math.max(this.opts.debounceMs ?? 20, 2 * this.lastRunMs)));
  }

  private kick(): void {
    if (this.stopped || this.tracked.size === 0) return;
    void this.run().catch((err: unknown) => this.log.error({ err }, 'rollout reconcile failed'));
  }

  /** Runs `fn` after everything queued before it: one reconcile or command at a time. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.queue.then(fn);
    this.queue = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }

  private run(): Promise<void> {
    return this.serial(async () => {
      const t0 = performance.now();
      for (const t of [...this.tracked.values()]) await this.reconcileOne(t);
      this.lastRunMs = performance.now() - t0;
    });
  }

  private async reconcileOne(t: Tracked): Promise<void> {
    const decision = reconcile(t.spec, t.status, this.observe(t));
    await this.execute(t, decision);
    const s = t.status;
    if (isFinal(s) && (s.revert === null || s.revert.reverted >= s.revert.devices)) this.tracked.delete(t.spec.id);
  }

  private observe(t: Tracked): Observations {
    const match = t.match;
    const devices: DeviceObservation[] = [];
    for (const d of this.devices.values()) {
      const member = t.members.get(d.id) ?? null;
      const selected = match(d);
      if (!selected && !member) continue;
      devices.push(this.observation(t, d, member, selected));
    }
    return { now: this.now(), devices, contradictions: t.contradictions };
  }

  /** One device as the reconciler sees it, rebuilt only when the device or its membership changed. */
  private observation(t: Tracked, d: DeviceView, member: Member | null, selected: boolean): DeviceObservation {
    const cached = t.seen.get(d.id);
    if (cached && cached.rev === d.rev && cached.member === member && cached.obs.selected === selected) return cached.obs;
    let rank = t.ranks.get(d.id);
    if (rank === undefined) {
      rank = createHash('sha256').update(`${t.spec.id}:${d.id}`).digest('hex').slice(0, 16);
      t.ranks.set(d.id, rank);
    }
    const m = d.report?.models[t.spec.name];
    const obs: DeviceObservation = {
      id: d.id,
      rank,
      selected,
      safeMode: d.doc.safeMode === true,
      online: d.online,
      desiredVersion: d.desiredVersion,
      desired: d.doc.models[t.spec.name] ?? null,
      member,
      report: d.report
        ? { desiredVersion: d.report.desiredVersion, model: m ? { active: m.active, activeSha256: m.activeSha256, history: m.history, failed: m.failed, metrics: m.metrics ?? null } : null }
        : null,
    };
    t.seen.set(d.id, { rev: d.rev, member, obs });
    return obs;
  }

  /** Carries out a decision: desired-state changes, members and status in one transaction, then publication. */
  private async execute(t: Tracked, d: Decision): Promise<void> {
    const { spec } = t;
    const slots = new Map<string, ModelSlot | null>();
    const enlist = new Map<string, { wave: number; previous: ModelSlot | null }>();
    for (const a of d.actions) {
      if (a.kind === 'enlist') {
        slots.set(a.deviceId, a.slot);
        enlist.set(a.deviceId, { wave: a.wave, previous: a.previous });
      } else if (a.kind === 'revert') slots.set(a.deviceId, a.slot);
    }
    const statusChanged = d.status.updatedAt !== t.status.updatedAt || d.actions.length > 0;
    const at = this.now();
    // Desired-state changes go out in chunks, each committed then published while the next is
    // written, so the first devices act while the fleet still writes to the last. The status (a
    // halt, a new step) is stored with the first chunk: a crash part-way leaves a status whose next
    // reconcile issues what is missing again (level-triggered), never changes without their status.
    const ids = [...slots.keys()];
    const chunk = (part: readonly string[]): { row: DesiredRow; previous: DesiredRow }[] => {
      const changes = this.desired.changeMany(part, (doc, id) => {
        const slot = slots.get(id);
        const models = { ...doc.models };
        if (slot) models[spec.name] = slot;
        else delete models[spec.name];
        return { ...doc, models };
      });
      const versions = new Map(changes.map((c) => [c.row.deviceId, c.row.version]));
      for (const deviceId of part) {
        const e = enlist.get(deviceId);
        if (!e) continue;
        const enlistedAt = versions.get(deviceId) ?? this.devices.get(deviceId)?.desiredVersion ?? 0;
        this.store.rollouts.addMember({ rolloutId: spec.id, deviceId, wave: e.wave, previous: e.previous, enlistedAt, assignedAt: at });
        t.members.set(deviceId, { wave: e.wave, previous: e.previous, enlistedAt });
      }
      return changes;
    };
    const first = this.store.transaction(() => {
      for (const a of d.actions) {
        if (a.kind === 'registry') this.setRegistryStatus(spec, a.status, a.reason);
        else if (a.kind === 'audit') this.store.audit.append({ ts: at, actor: `rollout:${spec.id}`, action: a.action, target: modelRef(spec.name, spec.version), ok: true, detail: { rollout: spec.id, ...a.detail } });
      }
      if (statusChanged) this.store.rollouts.setStatus(spec.id, d.status, at);
      return chunk(ids.slice(0, CHUNK));
    });
    const before = t.status;
    t.status = d.status;
    if (before.state !== d.status.state) {
      this.log.info({ rollout: spec.id, model: modelRef(spec.name, spec.version), from: before.state, to: d.status.state, reason: d.status.reason }, `rollout ${spec.id}: ${before.state} → ${d.status.state}`);
    }
    if (enlist.size > 0) this.log.info({ rollout: spec.id, devices: enlist.size, step: d.status.step }, 'devices enlisted');
    if (statusChanged) for (const fn of this.listeners) fn(this.view(t));
    // Publications are not awaited: the next reconcile need not wait for ten thousand
    // acknowledgements. What is stored is the truth; a publication that fails is retried by the
    // fleet's pending loop.
    this.publishing(this.publish(first));
    for (let i = CHUNK; i < ids.length; i += CHUNK) {
      await new Promise((r) => setImmediate(r));
      const part = ids.slice(i, i + CHUNK);
      this.publishing(this.publish(this.store.transaction(() => chunk(part))));
    }
  }

  private publishing(p: Promise<void>): void {
    this.inflight.add(p);
    void p.finally(() => this.inflight.delete(p));
  }

  /** Walks the registry to `to` through the transitions it allows; a version already past it is left alone. */
  private setRegistryStatus(spec: RolloutSpecData, to: ModelStatus, reason: string): void {
    const actor = `rollout:${spec.id}`;
    const path: ModelStatus[] = to === 'production' ? ['approved', 'production'] : [to];
    for (const status of path) {
      const current = this.store.models.get(spec.name, spec.version)?.status;
      if (current === undefined || current === status) continue;
      if (MODEL_STATUSES.indexOf(current) > MODEL_STATUSES.indexOf(status) && status !== 'quarantined') continue;
      try {
        this.opts.registry.setStatus(spec.name, spec.version, status, actor, reason);
      } catch (err) {
        this.log.warn({ err, model: modelRef(spec.name, spec.version), to: status }, 'registry status left as it was');
      }
    }
  }

  private async publish(changes: readonly { row: DesiredRow; previous: DesiredRow }[]): Promise<void> {
    if (changes.length === 0) return;
    // Stored already: a publication that fails is retried by the fleet's publishPending loop.
    const results = await Promise.allSettled(changes.map((c) => this.desired.publish(c.row, c.previous)));
    const failed = results.filter((r) => r.status === 'rejected').length;
    if (failed > 0) this.log.warn({ failed, of: changes.length }, 'desired state not published yet; the pending loop retries');
  }

  private view(t: Tracked): RolloutView {
    return { id: t.spec.id, name: t.spec.name, version: t.spec.version, manifestSha256: t.spec.manifestSha256, selector: t.spec.selector, plan: t.spec.plan, createdBy: t.createdBy, createdAt: t.createdAt, status: t.status };
  }
}

function viewOf(r: RolloutRow): RolloutView {
  return { id: r.id, name: r.name, version: r.version, manifestSha256: r.manifestSha256, selector: r.selector, plan: r.plan, createdBy: r.createdBy, createdAt: r.createdAt, status: r.status };
}
