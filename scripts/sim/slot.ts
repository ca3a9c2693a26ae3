import { createHash } from 'node:crypto';
import type { ModelSlotReport, ServingMetrics } from '../../proto/index.js';
import type { MetricsProfile, SimTiming, VersionBehaviour } from './scenario.js';

/**
 * One model slot of a simulated device: the same outward lifecycle as the agent's (agent/models/
 * lifecycle.ts), without files or runtimes. A new version downloads (the apply delay), serves on
 * probation, then commits or rolls back; a version held locally (stable history or the pinned
 * fallback) switches at once; a failed version is never tried again.
 *
 *   idle ─▶ downloading ─▶ probation ─┬─▶ idle (committed)
 *     ▲          │                    └─▶ idle (rolled back, version failed)
 *     └──────────┘ desired moved on (abandoned, not failed)
 */
export type SimSlotState = 'idle' | 'downloading' | 'probation';

/** Stable versions kept, newest first (the agent's models.keepStable default). */
const KEEP_STABLE = 3;
/** ModelSlotReport caps `failed` at 256 entries. */
const MAX_FAILED = 256;

export interface SlotHost {
  readonly timing: SimTiming;
  /** What this version does on this device. */
  behaviour(version: number): { behaviour: VersionBehaviour; metrics: MetricsProfile };
  /** Uniform in [0, 1), from the device's seeded PRNG for timings. */
  random(): number;
  /** The same, for the wobble of reported figures. */
  noise(): number;
  /** Something a report should show changed. */
  changed(): void;
  /** The device process dies now (a `crashing` version was activated). */
  crash(): void;
  verdict(version: number, ok: boolean): void;
}

/** A stand-in for the sha256 of a signed manifest the fleet did not name: fixed per model and version. */
export function fakeManifestSha256(model: string, version: number): string {
  return createHash('sha256').update(`edgefleet-sim:${model}@${version}`).digest('hex');
}

export class SimSlot {
  state: SimSlotState = 'idle';
  active: number | null = null;
  activeSha256: string | null = null;
  history: number[] = [];
  failed: number[] = [];
  fallback: number | null = null;
  lastVerdict: Record<string, unknown> | null = null;
  /** The version desired state names for this slot, and the one the device moves toward (safe mode: the fallback). */
  desired: number | null = null;
  private want: number | null = null;
  private candidate: number | null = null;
  /** What served before the candidate was activated: where a rollback goes back to. */
  private previous: number | null = null;
  /** Activations per version that have not ended in commit or failure: crashes count here. */
  private readonly attempts = new Map<number, number>();
  /** The manifest sha256 desired state named for a version, remembered so a local switch reports it. */
  private readonly shaOf = new Map<number, string>();
  private servingSince = Date.now();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    readonly model: string,
    private readonly host: SlotHost,
    initial?: number,
  ) {
    if (initial !== undefined) {
      this.history = [initial];
      this.fallback = initial;
      this.serve(initial);
    }
  }

  /** Held locally: a switch needs no download (the agent's local rollback path). */
  holds(version: number): boolean {
    return this.history.includes(version) || this.fallback === version;
  }

  /**
   * The real sha256 of a version's signed manifest, learned from the fleet: reported from now on
   * for that version instead of the stand-in, also when it serves already (a version the device
   * started out holding, which no desired state named yet).
   */
  learnSha256(version: number, manifestSha256: string): void {
    this.shaOf.set(version, manifestSha256);
    if (this.active === version) this.activeSha256 = manifestSha256;
  }

  /** Moves toward desired state. `safeMode`: serve the pinned fallback, whatever `version` says. */
  setDesired(version: number, manifestSha256: string | undefined, safeMode: boolean): void {
    this.desired = version;
    if (manifestSha256 !== undefined) this.shaOf.set(version, manifestSha256);
    this.want = safeMode ? (this.fallback ?? version) : version;
    this.reconcile();
  }

  /** Level-triggered: called on every desired change and after every step, it does at most one thing. */
  reconcile(): void {
    const want = this.want;
    if (want === null) return;
    if (this.state === 'downloading') {
      if (this.candidate === want) return;
      this.cancel();
      this.candidate = null;
      this.state = 'idle';
      this.host.changed();
    }
    if (this.state === 'probation') {
      if (this.active === want) return;
      // A fleet revert to a version held here is instant, probation or not; anything new waits
      // for this probation's outcome, which reconciles again.
      if (!this.holds(want)) return;
      this.cancel();
      this.candidate = this.previous = null;
    } else if (want === this.active || this.failed.includes(want)) return;
    if (this.holds(want)) {
      this.serve(want);
      this.state = 'idle';
      this.host.changed();
      return;
    }
    this.install(want);
  }

  /**
   * The device process restarted (after a crash): timers are gone, and a slot caught before its
   * verdict goes back to its last stable version, conservatively. A version that has now used its
   * attempts is marked failed; otherwise the next reconcile tries it again.
   */
  restart(): void {
    this.cancel();
    this.servingSince = Date.now();
    const v = this.candidate;
    if (this.state === 'idle' || v === null) return;
    const wasServing = this.state === 'probation';
    this.state = 'idle';
    this.candidate = null;
    // A download interrupted resumes on the next reconcile and counts no attempt: nothing of it ran.
    if (!wasServing) return;
    this.serveStable();
    const attempts = this.attempts.get(v) ?? 0;
    if (attempts >= this.host.timing.maxAttempts) {
      this.attempts.delete(v);
      this.markFailed(v);
      this.lastVerdict = { version: v, ok: false, reason: 'crash-loop', attempts };
      this.host.verdict(v, false);
    }
  }

  dispose(): void {
    this.cancel();
  }

  /** Figures of the serving version since it began serving in this run, computed at report time. */
  metrics(now = Date.now()): ServingMetrics | null {
    const v = this.active;
    if (v === null) return null;
    const p = this.host.behaviour(v).metrics;
    const requests = Math.max(0, Math.floor(((now - this.servingSince) / 1000) * p.requestsPerSec));
    if (requests === 0) return { version: v, requests: 0, errors: 0, nonFinite: 0, p95Ms: null, meanConfidence: null };
    const wobble = (this.host.noise() - 0.5) * 0.06;
    return {
      version: v,
      requests,
      errors: Math.floor(requests * p.errorRate),
      nonFinite: 0,
      p95Ms: round(p.p95Ms * (1 + wobble)),
      meanConfidence: Math.min(1, Math.max(0, round(p.meanConfidence + wobble / 3))),
    };
  }

  report(now = Date.now()): ModelSlotReport {
    return {
      state: this.state,
      active: this.active,
      activeSha256: this.activeSha256,
      desired: this.desired,
      history: [...this.history],
      failed: [...this.failed],
      fallback: this.fallback,
      lastVerdict: this.lastVerdict,
      metrics: this.metrics(now),
    };
  }

  private install(version: number): void {
    const { behaviour } = this.host.behaviour(version);
    const t = this.host.timing;
    const [min, max] = behaviour === 'slow' ? t.slowApplyMs : t.applyMs;
    this.candidate = version;
    this.state = 'downloading';
    this.host.changed();
    this.schedule(min + (max - min) * this.host.random(), () => this.activate(version));
  }

  private activate(version: number): void {
    this.previous = this.active;
    this.serve(version);
    this.state = 'probation';
    this.attempts.set(version, (this.attempts.get(version) ?? 0) + 1);
    if (this.host.behaviour(version).behaviour === 'crashing') {
      this.host.crash();
      return;
    }
    this.host.changed();
    this.schedule(this.host.timing.probationMs, () => this.finishProbation(version));
  }

  private finishProbation(version: number): void {
    const figures = this.figures();
    this.attempts.delete(version);
    this.candidate = null;
    this.state = 'idle';
    if (this.host.behaviour(version).behaviour === 'failing-probation') {
      this.markFailed(version);
      this.serveStable();
      const failures = [{ check: 'errors', value: figures?.errors ?? 0, limit: 0 }];
      this.lastVerdict = { version, ok: false, reason: 'errors', failures, figures };
      this.host.verdict(version, false);
    } else {
      this.previous = null;
      this.history = [version, ...this.history.filter((v) => v !== version)].slice(0, KEEP_STABLE);
      this.fallback ??= version;
      this.lastVerdict = { version, ok: true, figures };
      this.host.verdict(version, true);
    }
    this.host.changed();
    this.reconcile();
  }

  /** The verdict's figures, shaped as the agent's health check shapes them (agent/models/health.ts). */
  private figures(): Record<string, unknown> | null {
    const m = this.metrics();
    if (!m) return null;
    return { requests: m.requests, errors: m.errors, nonFinite: 0, p95Ms: m.p95Ms, previousP95Ms: null, memoryGrowthMb: 0, psi: {}, meanConfidence: m.meanConfidence };
  }

  private serve(version: number | null): void {
    this.active = version;
    this.activeSha256 = version === null ? null : (this.shaOf.get(version) ?? fakeManifestSha256(this.model, version));
    this.servingSince = Date.now();
  }

  /** Back to what served before the candidate when it is still held, else the newest stable version. */
  private serveStable(): void {
    const back = this.previous !== null && this.holds(this.previous) ? this.previous : (this.history[0] ?? this.fallback);
    this.previous = null;
    this.serve(back);
  }

  private markFailed(version: number): void {
    this.failed = [...this.failed.filter((v) => v !== version), version].slice(-MAX_FAILED);
  }

  private schedule(ms: number, fn: () => void): void {
    this.cancel();
    this.timer = setTimeout(() => {
      this.timer = null;
      fn();
    }, ms);
    this.timer.unref();
  }

  private cancel(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

function round(x: number): number {
  return Math.round(x * 1000) / 1000;
}
