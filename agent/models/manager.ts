import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';
import {
  EdgefleetError,
  manifestSha256,
  modelRef,
  type Manifest,
  type ModelSlot,
  type ModelSlotReport,
} from '../../proto/index.js';
import { trainingInput } from '../learner/sample-store.js';
import { validateInputs } from '../runtime/tensor.js';
import type { TensorMap } from '../runtime/types.js';
import type { InferResult, ModelHost } from './host.js';
import { candidatePipeline } from './candidate.js';
import type { ModelManagerOptions, SlotContext } from './context.js';
import { SlotState, newSlotState } from './lifecycle.js';
import { afterRequest, checkProbation } from './probation.js';
import { shadowRun } from './shadow.js';
import { newSlot, retire, servingMetrics, type PersonalVerdict, type Slot } from './slot.js';
import { persist, recover } from './steps.js';
import { ModelStore } from './store.js';
import { enterSafeMode, holds, leaveSafeMode, localRollback, revert, rollBack } from './switch.js';
import { Trust } from './trust.js';
import { serveVerified } from './versions.js';

export type { ModelManagerOptions } from './context.js';

/**
 * Owns every model slot on the device: reconciles toward desired state through the lifecycle in
 * lifecycle.ts, serves inference (it is the ModelHost), watches health, rolls back locally.
 *
 * The steps themselves live beside it, as functions of a slot and a SlotContext: steps.ts
 * (transitions, restart, commit and failure state), versions.ts (verified loads), candidate.ts
 * (download, verify, stage), shadow.ts, probation.ts (activation, verdict, commit, watch) and
 * switch.ts (rollback, fleet revert, local rollback, safe mode).
 */
/** Sample counts reach the fleet at most this often. */
const SAMPLES_REPORT_MS = 5000;

export class ModelManager implements ModelHost {
  private readonly store: ModelStore;
  private readonly slots = new Map<string, Slot>();
  private readonly trust: Trust;
  private readonly ctx: SlotContext;
  private readonly prefix = randomBytes(4).toString('hex');
  private counter = 0;
  private checkTimer: NodeJS.Timeout | null = null;
  private verified = false;
  private closed = false;
  private samplesTimer: NodeJS.Timeout | null = null;
  /** Desired state says safe mode: slots serve their fallbacks and nothing new is fetched or tried. */
  private safeMode = false;

  constructor(private readonly opts: ModelManagerOptions) {
    this.store = new ModelStore(opts.stateDir);
    this.trust = new Trust(this.store.root, opts.trustedKeys, (keys) => opts.report('event', 'fleet.key.learned', { keys }));
    this.ctx = {
      opts,
      store: this.store,
      trust: this.trust,
      inSafeMode: () => this.safeMode,
      kick: (slot) => this.kick(slot),
      track: (p) => this.track(p),
    };
  }

  /** Restores every slot from disk, finishes or undoes interrupted steps, verifies and loads what serves. */
  async start(): Promise<void> {
    for (const name of this.store.slotNames()) {
      const state = this.store.loadSlot(name, SlotState) ?? newSlotState(name);
      const slot = newSlot(state);
      this.slots.set(name, slot);
      recover(this.ctx, slot);
      await serveVerified(this.ctx, slot);
    }
    this.verified = true;
    this.checkTimer = setInterval(() => this.periodic(), this.opts.checkIntervalMs);
    this.checkTimer.unref();
  }

  async stop(): Promise<void> {
    this.closed = true;
    if (this.samplesTimer) clearTimeout(this.samplesTimer);
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
      afterRequest(this.ctx, slot, run);
      throw new EdgefleetError('EF_RUNTIME_FAILED', `${modelRef(name, run.version)}: ${(err as Error).message}`, { cause: err });
    } finally {
      if (--run.inflight === 0 && run.retired) void run.model.dispose().catch(() => undefined);
    }
    const ms = performance.now() - t0;
    // After commit the watch window scans the outputs (once); the version's own record counts what
    // the scan found, so its serving metrics stay whole without a second pass.
    if (slot.watchStats && run === slot.serving) run.stats.observeScanned(ms, slot.watchStats.observe(ms, outputs));
    else run.stats.observe(ms, outputs);
    if (slot.shadow && run === slot.serving) shadowRun(this.ctx, slot, inputs, outputs);
    afterRequest(this.ctx, slot, run);
    this.opts.feedback?.record(requestId, name, run.version, trainingInput(run.signed.manifest, inputs));
    return { requestId, model: name, version: run.version, outputs };
  }

  feedback(name: string, requestId: string, label: unknown): boolean {
    const ok = this.opts.feedback?.label(name, requestId, label) ?? false;
    if (ok) this.samplesChanged();
    return ok;
  }

  addSample(name: string, input: Float32Array, featureShape: number[], label: unknown): number {
    if (!this.slots.has(name)) throw new EdgefleetError('EF_UNKNOWN_MODEL', `no model named ${name} on this device`);
    if (!this.opts.feedback) throw new EdgefleetError('EF_INTERNAL', 'this agent keeps no samples');
    const seq = this.opts.feedback.addSample(name, input, featureShape, label);
    this.samplesChanged();
    return seq;
  }

  /**
   * The fleet picks round participants by their sample counts, which change with every label: one
   * report at most every SAMPLES_REPORT_MS carries them, not one per label.
   */
  private samplesChanged(): void {
    if (this.samplesTimer || this.closed) return;
    this.samplesTimer = setTimeout(() => {
      this.samplesTimer = null;
      this.opts.onChange?.();
    }, SAMPLES_REPORT_MS);
    this.samplesTimer.unref();
  }

  /** The version serving `name` as local training needs it: manifest, its signed sha256, its files. */
  trainingBase(name: string): { manifest: Manifest; manifestSha256: string; dir: string; committed: boolean; personalized: boolean } | null {
    const slot = this.slots.get(name);
    const run = slot?.serving;
    if (!slot || !run) return null;
    return {
      manifest: run.signed.manifest,
      manifestSha256: manifestSha256(run.signed),
      dir: this.store.viewDir(name, run.version),
      committed: slot.state.state === 'idle' && slot.state.serving === run.version,
      personalized: run.personal !== undefined,
    };
  }

  /**
   * Serves the device's personalized variant of `name@version`: its personal layers' weights over
   * the global ones, with the verdict of the check that chose it. `null` puts the global weights
   * back. Only the committed version serving is personalized (a version on probation is judged as
   * published); false when that is not `version`, or its runtime cannot take weights.
   */
  personalize(name: string, version: number, p: { weights: { name: string; data: Float32Array }[]; verdict: PersonalVerdict } | null): boolean {
    const slot = this.slots.get(name);
    const run = slot?.serving;
    if (!slot || !run || run.version !== version || !run.model.weights) return false;
    if (p === null) {
      if (!run.personal) return true;
      run.model.weights.write(run.personal.original);
      delete run.personal;
    } else {
      if (slot.state.state !== 'idle' || slot.state.serving !== version) return false;
      const original = run.personal?.original ?? run.model.weights.read(p.weights.map((w) => w.name));
      run.model.weights.write(p.weights);
      run.personal = { verdict: p.verdict, original };
    }
    this.opts.onChange?.();
    return true;
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
        slot = newSlot(newSlotState(name));
        this.slots.set(name, slot);
        persist(this.ctx, slot);
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
        ...(slot.serving?.personal ? { personalized: slot.serving.personal.verdict } : {}),
        // Without a learner the device takes part in no round: no count, so the fleet never picks it.
        ...(this.opts.feedback && this.opts.reportSamples !== false ? { samples: this.opts.feedback.sampleCount(name) } : {}),
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
    return rollBack(this.ctx, slot, { ok: false, failures: [], figures: null }, reason);
  }

  // ---------------------------------------------------------------------------------------------
  // Lifecycle passes

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
    if (this.safeMode) return enterSafeMode(this.ctx, slot);
    if (slot.state.safeMode && !(await leaveSafeMode(this.ctx, slot, want))) return;
    const s = slot.state;
    const failed = s.failed.some((f) => f.version === want);
    if (s.state === 'probation') {
      // Desired state names a version held here while another is on probation: the fleet is
      // reverting a version that misbehaves somewhere, so the switch is now, not at the verdict.
      // A version that must be downloaded waits for the window.
      if (slot.serving?.version !== want && !failed && holds(slot, want)) await revert(this.ctx, slot, want);
      return;
    }
    if (slot.serving?.version === want && s.state === 'idle') return;
    if (failed) return; // failed here: only a new version moves the slot
    if ((s.stable.includes(want) || s.fallback === want) && s.state === 'idle') {
      await localRollback(this.ctx, slot, want);
      return;
    }
    const abort = new AbortController();
    slot.abort = abort;
    try {
      await candidatePipeline(this.ctx, slot, want, abort.signal);
    } finally {
      slot.abort = null;
    }
  }

  private periodic(): void {
    for (const slot of this.slots.values()) if (slot.state.state === 'probation') checkProbation(this.ctx, slot);
  }
}
