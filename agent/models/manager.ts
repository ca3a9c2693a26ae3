import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';
import {
  EdgefleetError,
  isEdgefleetError,
  manifestSha256,
  modelRef,
  type Manifest,
  type ModelFile,
  type ModelSlot,
  type ModelSlotReport,
  type RecordClass,
  type ServingMetrics,
  type SignedManifest,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import { loadModel, runGolden } from '../runtime/load.js';
import { checkInChild } from '../runtime/child-check.js';
import { argmaxAt, validateInputs } from '../runtime/tensor.js';
import type { LoadedModel, TensorMap } from '../runtime/types.js';
import type { InferResult, ModelHost } from './host.js';
import { fetchFile, fetchFileDelta, fetchManifest, newFetchStats, type FetchAuth } from './fetch.js';
import { judge, latencyRecord, VersionStats, type LatencyRecord, type Verdict } from './health.js';
import { canTransition, ON_RESTART, SlotState, newSlotState, type SlotStateName } from './lifecycle.js';
import { ModelStore } from './store.js';
import { Trust } from './trust.js';

export interface ModelManagerOptions {
  stateDir: string;
  /** Raw Ed25519 fleet public keys (base64) this device trusts. */
  trustedKeys: string[];
  fetch: FetchAuth | null;
  keepStable: number;
  maxModelBytes: number;
  maxAttempts: number;
  childCheckTimeoutMs: number;
  /** Seconds between health checks while on probation. */
  checkIntervalMs: number;
  /** Delta downloads (patches against files held, or compressed images); null: whole files only. */
  delta?: { offerTimeoutMs: number } | null;
  report: (cls: RecordClass, type: string, body: unknown) => void;
  onChange: () => void;
  log: Logger;
  feedback?: { record(requestId: string, model: string, version: number): void; label(model: string, requestId: string, label: unknown): boolean };
}

interface Running {
  version: number;
  signed: SignedManifest;
  model: LoadedModel;
  stats: VersionStats;
  /** Requests running on it now; a retired version is released when the last one ends. */
  inflight: number;
  retired: boolean;
}

/** Releases a version no longer served, once nothing runs on it (and never in the middle of a switch). */
function retire(run: Running): void {
  if (run.retired) return;
  run.retired = true;
  if (run.inflight === 0) setImmediate(() => void run.model.dispose().catch(() => undefined));
}

interface Slot {
  state: SlotState;
  desired: ModelSlot | null;
  serving: Running | null;
  /** While on probation: the previous stable version, loaded and warm, for an instant rollback. */
  previous: Running | null;
  /** The latency a candidate is compared against: the serving stable version's, live or kept from its probation. */
  previousLatency: LatencyRecord | null;
  shadow: { run: Running; left: number; agree: number; total: number; done: (v: Verdict | null) => void } | null;
  probationStartedAt: number;
  busy: Promise<void> | null;
  again: boolean;
  abort: AbortController | null;
  watchStats: VersionStats | null;
  /** Transient download failures in a row, for the backoff; not persisted. */
  retries: number;
  /**
   * A switch is under way: a rollback, a fleet revert, safe mode in or out. Its cold load happens
   * before the state says so; meanwhile no verdict, commit or second switch may start.
   */
  rollingBack: boolean;
}

const RETRY_BASE_MS = 1000;
const RETRY_CAP_MS = 5 * 60_000;

/**
 * Owns every model slot on the device: reconciles toward desired state through the lifecycle in
 * lifecycle.ts, serves inference (it is the ModelHost), watches health, rolls back locally.
 */
export class ModelManager implements ModelHost {
  private readonly store: ModelStore;
  private readonly slots = new Map<string, Slot>();
  private readonly trust: Trust;
  private readonly prefix = randomBytes(4).toString('hex');
  private counter = 0;
  private checkTimer: NodeJS.Timeout | null = null;
  private verified = false;
  private closed = false;
  /** Desired state says safe mode: slots serve their fallbacks and nothing new is fetched or tried. */
  private safeMode = false;

  constructor(private readonly opts: ModelManagerOptions) {
    this.store = new ModelStore(opts.stateDir);
    this.trust = new Trust(this.store.root, opts.trustedKeys, (keys) => opts.report('event', 'fleet.key.learned', { keys }));
  }

  /** Restores every slot from disk, finishes or undoes interrupted steps, verifies and loads what serves. */
  async start(): Promise<void> {
    for (const name of this.store.slotNames()) {
      const state = this.store.loadSlot(name, SlotState) ?? newSlotState(name);
      const slot = this.newSlot(state);
      this.slots.set(name, slot);
      this.recover(slot);
      await this.serveVerified(slot);
    }
    this.verified = true;
    this.checkTimer = setInterval(() => this.periodic(), this.opts.checkIntervalMs);
    this.checkTimer.unref();
  }

  async stop(): Promise<void> {
    this.closed = true;
    if (this.checkTimer) clearInterval(this.checkTimer);
    for (const slot of this.slots.values()) slot.abort?.abort();
    await Promise.allSettled([...this.slots.values()].map((s) => s.busy ?? Promise.resolve()));
    for (const slot of this.slots.values()) {
      for (const r of [slot.serving, slot.previous, slot.shadow?.run]) if (r) await r.model.dispose().catch(() => undefined);
      slot.serving = slot.previous = null;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // ModelHost

  models(): string[] {
    return [...this.slots.keys()];
  }

  active(name: string): Manifest | null {
    return this.slots.get(name)?.serving?.signed.manifest ?? null;
  }

  ready(): boolean {
    if (!this.verified) return false;
    for (const slot of this.slots.values()) if (!slot.serving) return false;
    return true;
  }

  async infer(name: string, inputs: TensorMap, opts?: { requestId?: string; version?: number }): Promise<InferResult> {
    const slot = this.slots.get(name);
    if (!slot) throw new EdgefleetError('EF_UNKNOWN_MODEL', `no model named ${name} on this device`);
    let run = slot.serving;
    if (opts?.version !== undefined && run?.version !== opts.version) {
      run = slot.previous?.version === opts.version ? slot.previous : null;
      if (!run) throw new EdgefleetError('EF_UNKNOWN_MODEL', `${modelRef(name, opts.version)} is not loaded`);
    }
    if (!run) throw new EdgefleetError('EF_MODEL_NOT_READY', `no verified version of ${name} is serving`);
    validateInputs(run.signed.manifest.inputs, inputs);
    const requestId = opts?.requestId ?? `${this.prefix}-${(++this.counter).toString(36)}`;
    const t0 = performance.now();
    let outputs: TensorMap;
    run.inflight++;
    try {
      outputs = await run.model.run(inputs);
    } catch (err) {
      run.stats.error();
      slot.watchStats?.error();
      this.afterRequest(slot, run);
      throw new EdgefleetError('EF_RUNTIME_FAILED', `${modelRef(name, run.version)}: ${(err as Error).message}`, { cause: err });
    } finally {
      if (--run.inflight === 0 && run.retired) void run.model.dispose().catch(() => undefined);
    }
    const ms = performance.now() - t0;
    // After commit the watch window scans the outputs (once); the version's own record counts what
    // the scan found, so its serving metrics stay whole without a second pass.
    if (slot.watchStats && run === slot.serving) run.stats.observeScanned(ms, slot.watchStats.observe(ms, outputs));
    else run.stats.observe(ms, outputs);
    if (slot.shadow && run === slot.serving) this.shadowRun(slot, inputs, outputs);
    this.afterRequest(slot, run);
    this.opts.feedback?.record(requestId, name, run.version);
    return { requestId, model: name, version: run.version, outputs };
  }

  feedback(name: string, requestId: string, label: unknown): boolean {
    return this.opts.feedback?.label(name, requestId, label) ?? false;
  }

  // ---------------------------------------------------------------------------------------------
  // Desired state

  /**
   * Points every slot at what desired state names; slots no longer named stop serving. In safe
   * mode every slot serves its pinned fallback instead, and `models` waits until safe mode ends.
   */
  reconcile(models: Record<string, ModelSlot>, opts: { safeMode?: boolean } = {}): void {
    if (this.closed) return;
    const safeMode = opts.safeMode === true;
    const entering = safeMode && !this.safeMode;
    if (safeMode !== this.safeMode) this.opts.log.warn({ safeMode }, safeMode ? 'safe mode: every model serves its pinned fallback' : 'safe mode ended: models return to desired state');
    this.safeMode = safeMode;
    for (const [name, desired] of Object.entries(models)) {
      let slot = this.slots.get(name);
      const created = !slot;
      if (!slot) {
        slot = this.newSlot(newSlotState(name));
        this.slots.set(name, slot);
        this.persist(slot);
      }
      const changed = slot.desired?.version !== desired.version;
      slot.desired = desired;
      // Safe mode stops whatever a candidate was doing before it activates: download, staging, shadow.
      if (changed || entering) slot.abort?.abort();
      if (safeMode && (entering || created) && slot.state.fallback === null) {
        this.opts.log.warn({ model: name, serving: slot.serving?.version ?? null }, 'safe mode: no fallback version is pinned for this model; it keeps serving what it serves, and fetches nothing');
      }
      this.kick(slot);
    }
    // No report here: the agent reports after every applied desired state, and every transition
    // that follows reports itself.
    for (const name of [...this.slots.keys()]) if (!(name in models)) this.track(this.remove(name));
  }

  /**
   * A model no longer in desired state stops serving and its files go; its slot file is removed
   * last, so a crash part-way leaves a slot that the next reconcile removes again.
   */
  private async remove(name: string): Promise<void> {
    const slot = this.slots.get(name);
    if (!slot) return;
    this.slots.delete(name);
    slot.desired = null;
    slot.abort?.abort();
    slot.shadow?.done(null);
    await slot.busy;
    for (const r of [slot.serving, slot.previous]) if (r) retire(r);
    slot.serving = slot.previous = null;
    this.store.collect(name, new Set());
    this.store.removeSlot(name);
    this.opts.log.info({ model: name }, 'model removed from desired state; no longer served');
    this.opts.report('event', 'model.removed', { model: name });
    this.opts.onChange();
  }

  private track(p: Promise<unknown>): void {
    p.catch((err: unknown) => this.opts.log.error({ err }, 'model task failed'));
  }

  report(): Record<string, ModelSlotReport> {
    const out: Record<string, ModelSlotReport> = {};
    for (const [name, slot] of this.slots) {
      const s = slot.state;
      out[name] = {
        state: s.state,
        active: slot.serving?.version ?? null,
        activeSha256: slot.serving ? manifestSha256(slot.serving.signed) : null,
        desired: slot.desired?.version ?? null,
        history: s.stable,
        failed: s.failed.map((f) => f.version),
        fallback: s.fallback,
        lastVerdict: s.lastVerdict,
        transfer: s.transfer,
        metrics: slot.serving ? servingMetrics(slot.serving) : null,
      };
    }
    return out;
  }

  /** For tests and the benchmark: the slot's persisted state. */
  slotState(name: string): SlotState | null {
    return this.slots.get(name)?.state ?? null;
  }

  /**
   * Rolls back to the previous stable version at once: warm (a pointer swap) while it is still
   * loaded, else a verified cold load. Returns the milliseconds until the stable version answered.
   */
  async rollbackNow(name: string, reason: string): Promise<number> {
    const slot = this.slots.get(name);
    if (!slot) throw new EdgefleetError('EF_UNKNOWN_MODEL', `no model named ${name} on this device`);
    return this.rollBack(slot, { ok: false, failures: [], figures: null }, reason);
  }

  private newSlot(state: SlotState): Slot {
    return { state, desired: null, serving: null, previous: null, previousLatency: null, shadow: null, probationStartedAt: 0, busy: null, again: false, abort: null, watchStats: null, retries: 0, rollingBack: false };
  }

  private transition(slot: Slot, to: SlotStateName, patch: Partial<SlotState> = {}, why?: Record<string, unknown>): void {
    const from = slot.state.state;
    if (from !== to && !canTransition(from, to)) throw new Error(`slot ${slot.state.name}: no transition ${from} → ${to}`);
    slot.state = { ...slot.state, ...patch, state: to, transitions: slot.state.transitions + 1, updatedAt: Date.now() };
    this.persist(slot);
    this.opts.log.info({ model: slot.state.name, from, to, candidate: slot.state.candidate, ...why }, `model ${slot.state.name}: ${from} → ${to}`);
    this.opts.report('event', 'model.transition', { model: slot.state.name, from, to, candidate: slot.state.candidate, serving: slot.state.serving, ...why });
    this.opts.onChange();
  }

  private persist(slot: Slot): void {
    this.store.saveSlot(slot.state.name, slot.state);
  }

  /** Applies ON_RESTART to a slot read from disk (synchronously: nothing is loaded yet). */
  private recover(slot: Slot): void {
    const s = slot.state;
    const action = ON_RESTART[s.state];
    if (action === 'nothing') return;
    this.opts.log.warn({ model: s.name, state: s.state, candidate: s.candidate, action }, 'resuming a model slot interrupted by a restart');
    this.opts.report('event', 'model.recovered', { model: s.name, state: s.state, candidate: s.candidate, action });
    const cand = s.candidate;
    const stableServing = s.stable[0] ?? null;
    switch (action) {
      case 'resume':
        // Nothing of the candidate ran yet: a power cut mid-download is not its fault.
        slot.state = { ...s, state: 'idle', serving: stableServing, updatedAt: Date.now() };
        break;
      case 'retry':
      case 'roll-back': {
        const attempts = s.attempts + 1;
        const exhausted = attempts >= this.opts.maxAttempts;
        const failed = exhausted && cand !== null ? [...s.failed, { version: cand, reason: 'crash-loop', at: Date.now() }] : s.failed;
        slot.state = { ...s, state: 'idle', serving: stableServing, candidate: exhausted ? null : cand, attempts: exhausted ? 0 : attempts, failed: failed.slice(-64), updatedAt: Date.now() };
        break;
      }
      case 'finish-commit':
        slot.state = this.committed(s);
        break;
      case 'finish-rollback':
      case 'finish-fail':
        slot.state = { ...s, state: 'idle', serving: stableServing, candidate: null, attempts: 0, failed: cand !== null && !s.failed.some((f) => f.version === cand) ? [...s.failed, { version: cand, reason: 'interrupted', at: Date.now() }] : s.failed };
        break;
    }
    this.persist(slot);
  }

  private committed(s: SlotState): SlotState {
    const v = s.candidate ?? s.serving;
    if (v === null) return { ...s, state: 'idle' };
    const stable = [v, ...s.stable.filter((x) => x !== v)].slice(0, this.opts.keepStable);
    return { ...s, state: 'idle', stable, serving: v, candidate: null, attempts: 0, floor: Math.max(s.floor, v), fallback: s.fallback ?? v, updatedAt: Date.now() };
  }

  /**
   * Loads what should serve, verifying it first: the serving version, else the newest stable
   * version that verifies, else the pinned fallback. Reports when it had to fall back.
   */
  private async serveVerified(slot: Slot): Promise<void> {
    const s = slot.state;
    const order = [...new Set([s.serving, ...s.stable, s.fallback].filter((v): v is number => v !== null))];
    for (const v of order) {
      try {
        const run = await this.loadVerified(s.name, v);
        slot.serving = run;
        if (v !== s.serving) {
          this.opts.log.error({ model: s.name, wanted: s.serving, serving: v }, 'the active model version did not verify; serving an older stable one');
          this.opts.report('event', 'model.fallback', { model: s.name, wanted: s.serving, serving: v });
          slot.state = { ...s, serving: v, stable: s.stable.filter((x) => x === v || order.indexOf(x) > order.indexOf(v)) };
          this.persist(slot);
        }
        return;
      } catch (err) {
        this.opts.log.error({ model: s.name, version: v, err }, 'model version failed verification at start-up');
        this.opts.report('event', 'model.unverified', { model: s.name, version: v, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
      }
    }
  }

  /** Re-verifies a stored version (signature, every file's size and sha256) and loads it. */
  private async loadVerified(name: string, version: number): Promise<Running> {
    const signed = this.store.loadManifest(name, version);
    if (!signed) throw new EdgefleetError('EF_ARTIFACT_MISSING', `${modelRef(name, version)}: no stored manifest`);
    this.trust.verify(signed);
    this.store.buildView(signed.manifest);
    // The runtime opens the files while they are re-hashed here: session creation runs off the
    // main thread, so the two overlap. The files came into the store verified; this pass catches
    // a disk that changed them since, and nothing is served unless it passes.
    const loading = this.load(signed);
    try {
      this.store.verifyVersion(signed.manifest);
    } catch (err) {
      loading.then(retire, () => undefined);
      throw err;
    }
    return loading;
  }

  private async load(signed: SignedManifest): Promise<Running> {
    const m = signed.manifest;
    const model = await loadModel(m, this.store.viewDir(m.name, m.version));
    return { version: m.version, signed, model, stats: new VersionStats(m), inflight: 0, retired: false };
  }

  private kick(slot: Slot): void {
    if (slot.busy) {
      slot.again = true;
      return;
    }
    slot.busy = this.drive(slot)
      .catch((err: unknown) => this.opts.log.error({ err, model: slot.state.name }, 'model lifecycle step failed unexpectedly'))
      .finally(() => {
        slot.busy = null;
        if (slot.again && !this.closed) {
          slot.again = false;
          this.kick(slot);
        }
      });
  }

  /** One pass toward the desired version. */
  private async drive(slot: Slot): Promise<void> {
    const want = slot.desired?.version;
    if (want === undefined || this.closed || slot.rollingBack) return; // a rollback kicks again when it ends
    if (this.safeMode) return this.enterSafeMode(slot);
    if (slot.state.safeMode && !(await this.leaveSafeMode(slot, want))) return;
    const s = slot.state;
    const failed = s.failed.some((f) => f.version === want);
    if (s.state === 'probation') {
      // Desired state names a version held here while another is on probation: the fleet is
      // reverting a version that misbehaves somewhere, so the switch is now, not at the verdict.
      // A version that must be downloaded waits for the window.
      if (slot.serving?.version !== want && !failed && this.holds(slot, want)) await this.revert(slot, want);
      return;
    }
    if (slot.serving?.version === want && s.state === 'idle') return;
    if (failed) return; // failed here: only a new version moves the slot
    if ((s.stable.includes(want) || s.fallback === want) && s.state === 'idle') {
      await this.localRollback(slot, want);
      return;
    }
    const abort = new AbortController();
    slot.abort = abort;
    try {
      await this.candidatePipeline(slot, want, abort.signal);
    } finally {
      slot.abort = null;
    }
  }

  private async candidatePipeline(slot: Slot, want: number, signal: AbortSignal): Promise<void> {
    const name = slot.state.name;
    const attempts = slot.state.candidate === want ? slot.state.attempts : 0;
    this.transition(slot, 'downloading', { candidate: want, attempts });
    let signed: SignedManifest;
    try {
      if (!this.opts.fetch) throw new EdgefleetError('EF_ARTIFACT_MISSING', 'no artifact server configured (models.artifactsUrl)');
      const held = this.heldManifests(slot);
      signed = await fetchManifest(this.opts.fetch, name, want, signal, held[0]);
      const st = slot.state;
      this.trust.admit(signed, { name, version: want, manifestSha256: slot.desired?.manifestSha256, floor: st.floor, stable: st.stable, maxModelBytes: this.opts.maxModelBytes, now: Date.now() });
      this.store.saveManifest(signed);
      const stats = newFetchStats();
      for (const f of signed.manifest.files) {
        if (this.opts.delta) {
          const onFallback = (err: unknown): void => this.opts.log.warn({ model: name, version: want, file: f.path, err }, 'delta download failed; downloading the whole file');
          await fetchFileDelta(this.store, this.opts.fetch, f, stats, { base: this.deltaBase(held, f), offerTimeoutMs: this.opts.delta.offerTimeoutMs, onFallback }, signal);
        } else {
          await fetchFile(this.store, this.opts.fetch, f, stats, signal);
        }
      }
      if (signal.aborted) return this.abandon(slot);
      // Bytes resumed came over the link on an earlier attempt at this version: they count too.
      const transfer = { version: want, downloadedBytes: stats.bytesDownloaded + stats.bytesResumed, savedBytes: stats.savedBytes, reusedBytes: stats.reusedBytes, patchedFiles: stats.patchedFiles, fullFiles: stats.fullFiles, fallbacks: stats.fallbacks };
      this.transition(slot, 'verifying', { transfer });
      this.store.buildView(signed.manifest);
      this.store.verifyVersion(signed.manifest);
      this.transition(slot, 'staging');
      const check = await checkInChild(signed.manifest, this.store.viewDir(name, want), { timeoutMs: this.opts.childCheckTimeoutMs });
      if (!check.ok) throw new EdgefleetError(check.reason === 'golden' ? 'EF_GOLDEN_MISMATCH' : 'EF_RUNTIME_FAILED', `staging ${modelRef(name, want)} in a child process: ${check.reason}${check.detail ? ` (${String(check.detail).slice(0, 300)})` : ''}`);
      if (signal.aborted) return this.abandon(slot);
    } catch (err) {
      if (signal.aborted) return this.abandon(slot);
      const code = isEdgefleetError(err) ? err.code : 'EF_INTERNAL';
      // A network failure (or a server error) is not the version's fault: on a flaky link it can
      // last for days, so it is retried with backoff for as long as desired state names the
      // version, and never marks it failed. Partial downloads resume where they stopped.
      const transient = !isEdgefleetError(err) || (code === 'EF_ARTIFACT_MISSING' && this.opts.fetch !== null);
      if (transient) {
        slot.retries++;
        const delay = Math.min(RETRY_CAP_MS, RETRY_BASE_MS * 2 ** Math.min(slot.retries, 20)) * (0.5 + Math.random() / 2);
        this.opts.log.warn({ model: name, version: want, err, retryInSec: Math.round(delay / 1000) }, 'model download failed; will retry');
        this.transition(slot, 'idle', {}, { reason: 'retry', code, message: (err as Error).message.slice(0, 300) });
        const t = setTimeout(() => this.kick(slot), delay);
        t.unref();
        return;
      }
      return this.fail(slot, want, code, (err as Error).message);
    }
    if (slot.desired?.shadow) {
      this.transition(slot, 'shadow');
      const verdict = await this.runShadow(slot, signed, slot.desired.shadow.requests, signal);
      if (signal.aborted) return this.abandon(slot);
      if (verdict && !verdict.ok) return this.fail(slot, want, 'EF_HEALTH_FAILED', 'shadow', verdict);
    }
    if (signal.aborted) return this.abandon(slot);
    slot.retries = 0;
    await this.activate(slot, signed);
  }

  /** The manifests of versions of this model held here, newest served first: what patches start from. */
  private heldManifests(slot: Slot): SignedManifest[] {
    const versions = [slot.serving?.version, ...slot.state.stable].filter((v): v is number => v !== undefined);
    const out: SignedManifest[] = [];
    for (const v of new Set(versions)) {
      const m = this.store.loadManifest(slot.state.name, v);
      if (m) out.push(m);
    }
    return out;
  }

  /** The blob to patch `file` from: the file at the same path in the newest held version that has it. */
  private deltaBase(held: readonly SignedManifest[], file: ModelFile): string | null {
    for (const m of held) {
      const f = m.manifest.files.find((x) => x.path === file.path);
      if (f && f.sha256 !== file.sha256 && this.store.hasBlob(f.sha256, f.size)) return f.sha256;
    }
    return null;
  }

  /** A version this device can serve without a download: a stable one, the pinned fallback, or the one kept warm on probation. */
  private holds(slot: Slot, version: number): boolean {
    const s = slot.state;
    return s.stable.includes(version) || s.fallback === version || slot.previous?.version === version;
  }

  /**
   * Serves `version` in place of what serves now: the warm previous version when it is the one (a
   * pointer swap), else a verified load, while the old one answers. Throws when it does not
   * verify, and the old one goes on serving. Retiring the old one is the caller's.
   */
  private async switchTo(slot: Slot, version: number): Promise<void> {
    if (slot.previous?.version === version) {
      slot.serving = slot.previous;
      slot.previous = null;
      return;
    }
    slot.serving = await this.loadVerified(slot.state.name, version);
  }

  /** Writes a change of an idle slot that is not a lifecycle step (safe mode's switches). */
  private update(slot: Slot, patch: Partial<SlotState>): void {
    slot.state = { ...slot.state, ...patch, updatedAt: Date.now() };
    this.persist(slot);
    this.opts.onChange();
  }

  /** The fleet reverts the candidate on probation to a version held here: a rollback with that target, the candidate quarantined. */
  private async revert(slot: Slot, to: number): Promise<void> {
    const run = slot.serving;
    const figures = run ? judge(run.signed.manifest.health, run.stats, slot.previousLatency, false).figures : null;
    await this.rollBack(slot, { ok: false, failures: [], figures }, 'reverted by fleet', to);
  }

  /**
   * Safe mode: the slot serves its pinned fallback, switched at once (a pointer swap when it is the
   * warm previous version, else a verified load) and without judging anything: a candidate on
   * probation is abandoned, not failed. Nothing is fetched or tried while safe mode holds; the
   * lifecycle resumes when it ends (leaveSafeMode).
   */
  private async enterSafeMode(slot: Slot): Promise<void> {
    const s = slot.state;
    const fallback = s.fallback;
    if (fallback === null) return; // reconcile said why
    if (s.state !== 'idle' && s.state !== 'probation') return; // not reached: drive runs every other step to its end
    if (s.safeMode && s.state === 'idle' && slot.serving?.version === fallback) return;
    const old = slot.serving;
    const prev = slot.previous;
    slot.rollingBack = true;
    try {
      if (old?.version !== fallback) await this.switchTo(slot, fallback);
    } catch (err) {
      slot.rollingBack = false;
      this.opts.log.error({ err, model: s.name, fallback }, 'safe mode: the fallback version did not verify; the model keeps serving what it serves');
      this.opts.report('event', 'model.unverified', { model: s.name, version: fallback, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
      return;
    }
    // The switch came first; then one write. From probation the way out is `rolling_back`, written
    // with no candidate, so that a restart in between marks nothing failed (ON_RESTART).
    if (s.state === 'probation') {
      this.transition(slot, 'rolling_back', { serving: fallback, candidate: null, attempts: 0, safeMode: true }, { reason: 'safe mode' });
      this.transition(slot, 'idle');
    } else {
      this.update(slot, { serving: fallback, safeMode: true });
    }
    slot.rollingBack = false;
    slot.previous = null;
    for (const r of [old, prev]) if (r && r !== slot.serving) retire(r);
    // From probation there is no watch yet (the candidate's own record was judged): it starts now.
    if (old !== slot.serving || !slot.watchStats) slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
    this.opts.log.warn({ model: s.name, from: old?.version ?? null, serving: fallback }, `safe mode: ${modelRef(s.name, fallback)} (the pinned fallback) serves`);
    this.opts.report('event', 'model.safe-mode', { model: s.name, on: true, serving: fallback });
  }

  /**
   * Safe mode ended: the slot switches at once to what desired state names when it holds that
   * version (it served here before: no probation), else back to its last stable version, from
   * which the normal lifecycle goes on. Returns false when the switch failed: the slot stays on
   * its fallback, still marked, and the next reconcile tries again.
   */
  private async leaveSafeMode(slot: Slot, want: number): Promise<boolean> {
    const s = slot.state;
    if (s.state !== 'idle') {
      // Not reached (safe mode starts nothing); never leave the mark behind.
      this.update(slot, { safeMode: false });
      return true;
    }
    const held = this.holds(slot, want) && !s.failed.some((f) => f.version === want);
    const target = held ? want : (s.stable[0] ?? slot.serving?.version ?? null);
    const old = slot.serving;
    if (target !== null && old?.version !== target) {
      slot.rollingBack = true;
      try {
        await this.switchTo(slot, target);
      } catch (err) {
        this.opts.log.error({ err, model: s.name, version: target }, 'leaving safe mode: the version to serve did not verify; the fallback serves on');
        this.opts.report('event', 'model.unverified', { model: s.name, version: target, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
        return false;
      } finally {
        slot.rollingBack = false;
      }
    }
    const serving = slot.serving?.version ?? null;
    // What serves outside safe mode is stable[0] (lifecycle.ts): a held version desired state names comes first again.
    const stable = serving === null ? s.stable : [serving, ...s.stable.filter((v) => v !== serving)].slice(0, this.opts.keepStable);
    this.update(slot, { serving, stable, safeMode: false });
    if (old && old !== slot.serving) {
      retire(old);
      slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
    }
    this.opts.log.info({ model: s.name, from: old?.version ?? null, serving, desired: want }, 'safe mode ended for this model');
    this.opts.report('event', 'model.safe-mode', { model: s.name, on: false, serving });
    return true;
  }

  private abandon(slot: Slot): void {
    if (slot.state.state !== 'idle') this.transition(slot, 'idle', { candidate: null, attempts: 0 }, { reason: 'desired state moved on' });
  }

  private fail(slot: Slot, version: number, code: string, message: string, verdict?: Verdict): void {
    const lastVerdict = { version, ok: false, code, message: message.slice(0, 500), ...(verdict ? { failures: verdict.failures, figures: verdict.figures } : {}) };
    this.opts.log.error({ model: slot.state.name, version, code, message }, `model ${modelRef(slot.state.name, version)} refused`);
    this.opts.report('event', 'model.verdict', { model: slot.state.name, ...lastVerdict });
    this.transition(slot, 'failed', { lastVerdict }, { code });
    this.transition(slot, 'idle', { candidate: null, attempts: 0, failed: [...slot.state.failed, { version, reason: code, at: Date.now() }].slice(-64) });
    // Nothing of a refused version stays: its manifest, its files, its partial downloads.
    this.collect(slot);
  }

  private async runShadow(slot: Slot, signed: SignedManifest, requests: number, signal: AbortSignal): Promise<Verdict | null> {
    const run = await this.load(signed);
    return new Promise<Verdict | null>((resolve) => {
      const done = (v: Verdict | null): void => {
        slot.shadow = null;
        retire(run);
        resolve(v);
      };
      slot.shadow = { run, left: requests, agree: 0, total: 0, done };
      signal.addEventListener('abort', () => done(null), { once: true });
    });
  }

  /** Runs the shadow candidate on a live request; its answer only counts towards agreement. */
  private shadowRun(slot: Slot, inputs: TensorMap, served: TensorMap): void {
    const sh = slot.shadow;
    if (!sh || sh.left <= 0) return;
    sh.left--;
    const t0 = performance.now();
    const run = sh.run;
    run.inflight++;
    const finished = (): void => {
      if (--run.inflight === 0 && run.retired) void run.model.dispose().catch(() => undefined);
    };
    run.model.run(inputs).then(
      (out) => {
        finished();
        sh.run.stats.observe(performance.now() - t0, out);
        sh.total++;
        if (agrees(served, out)) sh.agree++;
        if (sh.left === 0 && sh.total === sh.run.stats.requests - sh.run.stats.errors) this.finishShadow(slot);
      },
      () => {
        finished();
        sh.run.stats.error();
        if (sh.left === 0) this.finishShadow(slot);
      },
    );
  }

  private finishShadow(slot: Slot): void {
    const sh = slot.shadow;
    if (!sh) return;
    // Shadow runs queue behind the answers the device returns, so their latency says nothing about
    // the candidate's; latency is judged on probation, where the candidate serves.
    const policy = { ...sh.run.signed.manifest.health, latencyP95Ms: undefined, latencyRatioMax: Infinity };
    const verdict = judge(policy, sh.run.stats, slot.serving?.stats ?? null, true);
    const agreement = sh.total > 0 ? sh.agree / sh.total : 0;
    this.opts.report('event', 'model.shadow', { model: slot.state.name, version: sh.run.version, agreement, requests: sh.total, verdict });
    sh.done(verdict);
  }

  private async activate(slot: Slot, signed: SignedManifest): Promise<void> {
    const name = slot.state.name;
    const v = signed.manifest.version;
    this.transition(slot, 'activating');
    let run: Running;
    try {
      run = await this.load(signed);
      const golden = await runGolden(run.model, signed.manifest);
      if (!golden.ok) {
        await run.model.dispose().catch(() => undefined);
        const verdict: Verdict = { ok: false, failures: [{ check: 'golden', value: golden.failures.length, limit: 0, detail: golden.failures[0]?.message.slice(0, 200) }], figures: null };
        await this.rollBack(slot, verdict, 'golden');
        return;
      }
    } catch (err) {
      await this.rollBack(slot, { ok: false, failures: [], figures: null }, `load: ${(err as Error).message.slice(0, 200)}`);
      return;
    }
    // The switch: the previous version stays loaded until commit, so a rollback is a pointer swap.
    slot.previous = slot.serving;
    slot.previousLatency = this.latencyOf(slot);
    slot.serving = run;
    // On probation the candidate's own record is what is judged; the watch resumes after commit.
    slot.watchStats = null;
    slot.probationStartedAt = Date.now();
    this.transition(slot, 'probation', { serving: v });
    this.opts.log.info({ model: name, version: v, policy: { requests: signed.manifest.health.probationRequests, seconds: signed.manifest.health.probationSec } }, 'model on probation');
  }

  /** After every request: error and NaN budgets are judged at once while on probation. */
  private afterRequest(slot: Slot, run: Running): void {
    if (slot.state.state === 'probation' && run === slot.serving) {
      const policy = run.signed.manifest.health;
      if ((run.stats.errors > 0 && policy.errorRateMax === 0) || (run.stats.nonFinite > 0 && policy.nanRateMax === 0)) this.checkProbation(slot);
    } else if (slot.state.state === 'idle' && slot.watchStats && slot.watchStats.requests >= (slot.serving?.signed.manifest.health.watchWindowRequests ?? Infinity)) {
      this.checkWatch(slot);
    }
  }

  private periodic(): void {
    for (const slot of this.slots.values()) if (slot.state.state === 'probation') this.checkProbation(slot);
  }

  private checkProbation(slot: Slot): void {
    const run = slot.serving;
    if (!run || slot.state.state !== 'probation' || slot.rollingBack) return;
    const policy = run.signed.manifest.health;
    const elapsed = (Date.now() - slot.probationStartedAt) / 1000;
    // The window closes when both its requests and its seconds have passed; with too little
    // traffic it closes at ten times its seconds and judges what it saw.
    const windowDone = (run.stats.requests >= policy.probationRequests && elapsed >= policy.probationSec) || elapsed >= Math.max(policy.probationSec * 10, policy.probationSec + 1);
    const verdict = judge(policy, run.stats, slot.previousLatency, windowDone);
    if (!verdict.ok) {
      this.track(this.rollBack(slot, verdict, verdict.failures.map((f) => f.check).join(',')));
      return;
    }
    if (windowDone) this.commit(slot, verdict);
  }

  /**
   * The serving version's latency to compare a candidate against: what it did since the agent
   * started, if that is enough samples, else what it did on its own probation here.
   */
  private latencyOf(slot: Slot): LatencyRecord | null {
    const run = slot.serving;
    if (!run) return slot.previousLatency;
    if (run.stats.p95() !== null) return run.stats;
    const kept = slot.state.latency.find((l) => l.version === run.version);
    return kept ? latencyRecord(kept) : null;
  }

  private commit(slot: Slot, verdict: Verdict): void {
    const run = slot.serving as Running;
    const lastVerdict = { version: run.version, ok: true, figures: verdict.figures };
    this.transition(slot, 'committing', { lastVerdict });
    this.opts.report('event', 'model.verdict', { model: slot.state.name, ...lastVerdict });
    const prev = slot.previous;
    slot.previous = null;
    if (prev) retire(prev);
    const next = this.committed(slot.state);
    const p50 = run.stats.p50();
    const p95 = run.stats.p95();
    const latency = next.latency.filter((l) => l.version !== run.version && next.stable.includes(l.version));
    if (p50 !== null && p95 !== null) latency.push({ version: run.version, p50Ms: p50, p95Ms: p95 });
    this.transition(slot, 'idle', { ...next, latency });
    slot.watchStats = new VersionStats(run.signed.manifest);
    this.collect(slot);
    if (slot.desired?.version !== run.version || this.safeMode) this.kick(slot);
  }

  private checkWatch(slot: Slot): void {
    const run = slot.serving;
    const stats = slot.watchStats;
    if (!run || !stats || slot.rollingBack) return;
    slot.watchStats = new VersionStats(run.signed.manifest);
    const verdict = judge(run.signed.manifest.health, stats, slot.previousLatency, true);
    if (verdict.ok) return;
    // In safe mode the fallback serves whatever it shows: the operator chose it over every other version.
    const action = slot.state.safeMode ? 'report' : run.signed.manifest.health.afterCommit;
    this.opts.report('event', 'model.regression', { model: slot.state.name, version: run.version, failures: verdict.failures, figures: verdict.figures, action });
    if (action === 'rollback' && slot.state.stable.length > 1) this.track(this.rollBack(slot, verdict, 'regression after commit'));
  }

  /**
   * Back to the last stable version (or `target`, a version held here the fleet named): a pointer
   * swap when it is still loaded (probation), else a verified cold load. The version that failed is
   * marked so and never tried again here.
   */
  private async rollBack(slot: Slot, verdict: Verdict, reason: string, target?: number): Promise<number> {
    const s = slot.state;
    if (s.state === 'rolling_back' || slot.rollingBack) return 0;
    slot.rollingBack = true;
    const t0 = performance.now();
    const failedVersion = s.state === 'probation' || s.state === 'activating' ? (s.candidate ?? slot.serving?.version ?? null) : (slot.serving?.version ?? null);
    const back = target ?? s.stable.find((v) => v !== failedVersion) ?? null;
    const bad = slot.serving?.version === failedVersion ? slot.serving : null;
    // The switch comes first, before anything is written: a pointer swap when the stable version is
    // still loaded (warm), else a verified load from disk (cold) while the bad version answers. A
    // crash before the state below is persisted finds `probation` on disk, which a restart also
    // rolls back (ON_RESTART), or, after commit, the regressed version, which the watch catches again.
    if (slot.previous && slot.previous.version === back) {
      slot.serving = slot.previous;
      slot.previous = null;
    } else if (back !== null && slot.serving === bad) {
      try {
        slot.serving = await this.loadVerified(s.name, back);
      } catch (err) {
        this.opts.log.error({ err, model: s.name, version: back }, 'stable version did not verify during rollback');
        slot.serving = null;
        await this.serveVerified(slot);
      }
    } else if (back === null) {
      slot.serving = null;
    }
    // A fleet revert may go past the warm previous version (to one it loaded instead): nothing is
    // on probation any more, so nothing is kept loaded behind what serves.
    if (slot.previous) {
      if (slot.previous !== slot.serving) retire(slot.previous);
      slot.previous = null;
    }
    const switchMs = performance.now() - t0;
    const lastVerdict = { version: failedVersion, ok: false, reason, failures: verdict.failures, figures: verdict.figures ?? null };
    // What serves now leads `stable` (what serves outside probation is stable[0]), written with
    // `rolling_back` so that a restart before `idle` serves it too (ON_RESTART finish-rollback).
    const kept = s.stable.filter((v) => v !== failedVersion);
    const now = slot.serving?.version ?? null;
    const stable = now === null || now === failedVersion ? kept : [now, ...kept.filter((v) => v !== now)].slice(0, this.opts.keepStable);
    this.transition(slot, 'rolling_back', { lastVerdict, stable }, { reason });
    this.opts.report('event', 'model.verdict', { model: s.name, ...lastVerdict, rolledBackTo: slot.serving?.version ?? null });
    this.opts.log.error({ model: s.name, version: failedVersion, back, failures: verdict.failures }, `model ${modelRef(s.name, failedVersion ?? 0)} rolled back: ${reason}`);
    if (bad && bad !== slot.serving) retire(bad);
    const failed = failedVersion === null ? s.failed : [...s.failed, { version: failedVersion, reason: reason.slice(0, 64), at: Date.now() }].slice(-64);
    this.transition(slot, 'idle', {
      serving: slot.serving?.version ?? null,
      candidate: null,
      attempts: 0,
      failed,
    });
    slot.rollingBack = false;
    slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
    this.collect(slot);
    // A version assigned while this one was on probation waited for the verdict; safe mode may have come meanwhile.
    if (slot.desired && (slot.desired.version !== slot.serving?.version || this.safeMode)) this.kick(slot);
    return switchMs;
  }

  /** Desired state names a version from this device's own stable history, or its pinned fallback: verify, load, switch. */
  private async localRollback(slot: Slot, version: number): Promise<void> {
    const run = await this.loadVerified(slot.state.name, version);
    this.transition(slot, 'activating', { candidate: version });
    const old = slot.serving;
    slot.serving = run;
    slot.watchStats = null;
    if (old) retire(old);
    this.transition(slot, 'probation', { serving: version });
    slot.probationStartedAt = Date.now();
    slot.previousLatency = old?.stats ?? null;
    slot.previous = null;
  }

  private collect(slot: Slot): void {
    const s = slot.state;
    const keep = new Set<number>([...s.stable, ...(s.fallback !== null ? [s.fallback] : []), ...(s.serving !== null ? [s.serving] : [])]);
    try {
      this.store.collect(s.name, keep);
    } catch (err) {
      this.opts.log.warn({ err, model: s.name }, 'could not collect old model versions');
    }
  }
}

/**
 * What the serving version did since it began serving in this run (on probation: the candidate's
 * record), the figures fleet rollout gates compare between devices.
 */
function servingMetrics(run: Running): ServingMetrics {
  const st = run.stats;
  const p95 = st.p95();
  const conf = st.meanConfidence();
  return {
    version: run.version,
    requests: st.requests,
    errors: st.errors,
    nonFinite: st.nonFinite,
    p95Ms: p95 === null ? null : round3(p95),
    // A confidence output that is not a probability (a manifest naming logits) has no mean to report.
    meanConfidence: conf === null || !(conf >= 0 && conf <= 1) ? null : round3(conf),
  };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** Outputs agree when every row's winning class matches (a single value: within 1e-3). */
function agrees(a: TensorMap, b: TensorMap): boolean {
  for (const name in a) {
    const x = a[name];
    const y = b[name];
    if (!x || !y || x.data.length !== y.data.length) return false;
    if (x.data instanceof BigInt64Array || y.data instanceof BigInt64Array) continue;
    if (x.data.length === 1) {
      if (Math.abs((x.data[0] as number) - (y.data[0] as number)) > 1e-3) return false;
      continue;
    }
    const k = x.shape[x.shape.length - 1] ?? x.data.length;
    if (k < 1 || x.data.length % k !== 0) return false;
    for (let r = 0; r < x.data.length; r += k) if (argmaxAt(x.data, r, k) !== argmaxAt(y.data, r, k)) return false;
  }
  return true;
}
