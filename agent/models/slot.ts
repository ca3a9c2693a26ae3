import type { ModelSlot, ModelSlotReport, ServingMetrics, SignedManifest } from '../../proto/index.js';
import type { LoadedModel } from '../runtime/types.js';
import type { LatencyRecord, Verdict, VersionStats } from './health.js';
import type { SlotState } from './lifecycle.js';

/** A version loaded in memory, serving, kept warm, or run in shadow. */
export interface Running {
  version: number;
  signed: SignedManifest;
  model: LoadedModel;
  stats: VersionStats;
  /** Requests running on it now; a retired version is released when the last one ends. */
  inflight: number;
  retired: boolean;
  /** A personalized variant: the check that let it serve, and the global weights it covers, to put back. */
  personal?: { verdict: PersonalVerdict; original: { name: string; data: Float32Array }[] };
}

export type PersonalVerdict = NonNullable<ModelSlotReport['personalized']>;

/** What the manager holds for one model: its persisted lifecycle state and what is loaded for it. */
export interface Slot {
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

export function newSlot(state: SlotState): Slot {
  return { state, desired: null, serving: null, previous: null, previousLatency: null, shadow: null, probationStartedAt: 0, busy: null, again: false, abort: null, watchStats: null, retries: 0, rollingBack: false };
}

/** Releases a version no longer served, once nothing runs on it (and never in the middle of a switch). */
export function retire(run: Running): void {
  if (run.retired) return;
  run.retired = true;
  if (run.inflight === 0) setImmediate(() => void run.model.dispose().catch(() => undefined));
}

/**
 * What the serving version did since it began serving in this run (on probation: the candidate's
 * record), the figures fleet rollout gates compare between devices.
 */
export function servingMetrics(run: Running): ServingMetrics {
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
