import {
  EdgefleetError,
  Gates,
  worst,
  type AnalysisStep,
  type CohortFigures,
  type GateResult,
  type GateVerdict,
  type ModelSlot,
  type ModelStatus,
  type RolloutCommand,
  type RolloutPlan,
  type RolloutStatus,
  type RolloutStep,
  type ServingMetrics,
  type WaveCounts,
} from '../../proto/index.js';
import type { RolloutRow } from '../store/types.js';

/**
 * The rollout reconciler: a pure function of the rollout's spec, its last status and what the fleet
 * observes now, run on every relevant device report and on a timer. It never does anything itself;
 * it returns the next status and the actions that take the fleet there, which are only ever
 * desired-state changes, registry status changes and audit records. Being level-triggered, running
 * it twice on the same observations gives the same answer and no new action, and a restart (or a
 * lost action) is repaired by the next run.
 */

/** What the reconciler needs of a rollout: its stored row without status and authorship. */
export type RolloutSpecData = Pick<RolloutRow, 'id' | 'name' | 'version' | 'manifestSha256' | 'selector' | 'plan'>;

export interface Member {
  /** 1-based index of the wave that enlisted it. */
  wave: number;
  /** The slot desired state held before the rollout changed it (null: the model was not assigned). */
  previous: ModelSlot | null;
  /** The device's desired-state version right after it was enlisted: reports older than that say nothing of the target. */
  enlistedAt: number;
}

export interface ModelReport {
  active: number | null;
  activeSha256: string | null;
  history: readonly number[];
  failed: readonly number[];
  metrics: ServingMetrics | null;
}

export interface DeviceObservation {
  id: string;
  /** Stable position in the rollout's order (a hash of rollout id and device id): the sticky wave order. */
  rank: string;
  selected: boolean;
  safeMode: boolean;
  /** Connected now (its last presence message said online): waves take online devices first. */
  online: boolean;
  /** The fleet's desired-state version of the device, and the slot of the rollout's model in it. */
  desiredVersion: number;
  desired: ModelSlot | null;
  member: Member | null;
  /** The device's latest report: the desired version it reflects, and its slot of the rollout's model (null: it has none). */
  report: { desiredVersion: number; model: ModelReport | null } | null;
}

export interface Observations {
  now: number;
  /** Every selected device, and every member whether still selected or not. */
  devices: readonly DeviceObservation[];
  /**
   * Contradicting reports received so far, counted as they arrive (the fleet's service does, with
   * `contradicts`): a device's next honest report replaces a contradicting one before a reconcile
   * may see it. Without it, the devices whose latest report contradicts are counted.
   */
  contradictions?: number;
}

export type RolloutAction =
  | { kind: 'enlist'; deviceId: string; wave: number; slot: ModelSlot; previous: ModelSlot | null }
  | { kind: 'revert'; deviceId: string; slot: ModelSlot | null }
  | { kind: 'registry'; status: ModelStatus; reason: string }
  | { kind: 'audit'; action: string; detail: Record<string, unknown> };

export interface Decision {
  status: RolloutStatus;
  actions: RolloutAction[];
}

export function initialStatus(now: number): RolloutStatus {
  const zero = { members: 0, serving: 0, committed: 0, failed: 0, pending: 0 };
  return {
    state: 'running',
    step: 0,
    stepStartedAt: now,
    reason: null,
    selected: 0,
    wanted: 0,
    waves: [],
    total: zero,
    gates: [],
    verdict: null,
    candidate: null,
    stable: null,
    baseline: null,
    contradictions: 0,
    heldBy: null,
    revert: null,
    finishedAt: null,
    updatedAt: now,
  };
}

export function isFinal(s: RolloutStatus): boolean {
  return s.state === 'succeeded' || s.state === 'halted' || s.state === 'aborted';
}

/** Where one member stands with the target version, judged from its latest report. */
type Standing = 'serving' | 'committed' | 'failed' | 'pending';

/**
 * A report contradicts the fleet's state when it claims what the fleet never asked for: a desired
 * version from the future, or the target serving on a device whose desired state does not name it,
 * or serving bytes other than the signed target's. It is counted and then ignored.
 */
export function contradicts(spec: RolloutSpecData, d: DeviceObservation): boolean {
  const r = d.report;
  if (!r) return false;
  if (r.desiredVersion > d.desiredVersion) return true;
  const m = r.model;
  if (!m || m.active !== spec.version) return false;
  if (m.activeSha256 !== null && m.activeSha256 !== spec.manifestSha256) return true;
  // Serving the target without desired state ever naming it for this device.
  return d.member === null && d.desired?.version !== spec.version;
}

function standing(spec: RolloutSpecData, d: DeviceObservation): Standing {
  const r = d.report;
  const m = d.member;
  if (!r || !m || r.desiredVersion < m.enlistedAt || !r.model) return 'pending';
  if (r.model.failed.includes(spec.version)) return 'failed';
  if (r.model.active === spec.version) return r.model.history.includes(spec.version) ? 'committed' : 'serving';
  return 'pending';
}

function countOf(standings: readonly Standing[]): WaveCounts {
  const c = { members: standings.length, serving: 0, committed: 0, failed: 0, pending: 0 };
  for (const s of standings) {
    if (s === 'committed') {
      c.committed++;
      c.serving++;
    } else c[s]++;
  }
  return c;
}

/** Figures over devices whose metrics are of `version(d)` and count at least `minRequests`. */
function cohort(devices: readonly DeviceObservation[], version: (d: DeviceObservation) => number | null, minRequests: number): CohortFigures {
  let n = 0;
  let requests = 0;
  let errors = 0;
  const p95s: number[] = [];
  let confSum = 0;
  let confN = 0;
  for (const d of devices) {
    const m = d.report?.model?.metrics;
    const v = version(d);
    if (!m || v === null || m.version !== v || m.requests < minRequests) continue;
    n++;
    requests += m.requests;
    errors += m.errors;
    if (m.p95Ms !== null) p95s.push(m.p95Ms);
    if (m.meanConfidence !== null) {
      confSum += m.meanConfidence;
      confN++;
    }
  }
  p95s.sort((a, b) => a - b);
  return {
    devices: n,
    requests,
    errorRate: requests > 0 ? round(errors / requests) : null,
    p95Ms: p95s.length > 0 ? round(median(p95s)) : null,
    meanConfidence: confN > 0 ? round(confSum / confN) : null,
  };
}

function median(sorted: readonly number[]): number {
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

function round(x: number): number {
  return Math.round(x * 1e4) / 1e4;
}

/** The gates that judge the current step: its own for an analysis, else the next analysis step's (or the defaults). */
function gatesFor(plan: RolloutPlan, step: number): Gates {
  for (let i = step; i < plan.steps.length; i++) {
    const s = plan.steps[i] as RolloutStep;
    if (s.type === 'analysis') return s.gates;
  }
  return Gates.parse({});
}

/**
 * Judges the gates. Only the failed share is judged outside analysis steps (a canary that rolls
 * back halts the rollout at once); the runtime comparisons need an analysis window.
 */
export function judgeGates(
  gates: Gates,
  counts: WaveCounts,
  candidate: CohortFigures,
  stable: CohortFigures | null,
  minDevices: number,
): GateResult[] {
  const out: GateResult[] = [];
  const share = counts.members > 0 ? counts.failed / counts.members : null;
  out.push({
    gate: 'failed-share',
    verdict: share === null ? 'running' : share > gates.maxFailedShare ? 'failed' : 'successful',
    value: share === null ? null : round(share),
    limit: gates.maxFailedShare,
    detail: `${counts.failed} of ${counts.members} device(s) rolled back, failed probation or refused it`,
  });
  const enough = candidate.devices >= minDevices;
  // With no traffic at all, and an operator who asked for no minimum, there is nothing to judge.
  const idle = candidate.requests === 0 && gates.minRequests === 0 && candidate.devices >= minDevices;
  const waiting = (gate: GateResult['gate'], limit: number | null, detail: string): GateResult => ({
    gate,
    verdict: idle ? 'successful' : 'running',
    value: null,
    limit,
    detail: idle ? 'no requests served: nothing to judge' : detail,
  });
  const why = `${candidate.devices} of ${minDevices} device(s) with ${gates.minRequests}+ requests on the new version`;

  // Error rate: an absolute ceiling, and a rise over the stable version's.
  const errLimit = stable?.errorRate != null ? Math.min(gates.maxErrorRate, stable.errorRate + gates.maxErrorRateIncrease) : gates.maxErrorRate;
  if (!enough || candidate.errorRate === null) out.push(waiting('error-rate', round(errLimit), why));
  else out.push({ gate: 'error-rate', verdict: candidate.errorRate > errLimit ? 'failed' : 'successful', value: candidate.errorRate, limit: round(errLimit), detail: `stable ${stable?.errorRate ?? 'unknown'}` });

  // Latency: the median device p95 against the stable one's.
  if (!enough || candidate.p95Ms === null) out.push(waiting('latency', gates.maxLatencyRatio, why));
  else if (!stable || stable.p95Ms === null || stable.p95Ms <= 0) {
    out.push({ gate: 'latency', verdict: 'inconclusive', value: null, limit: gates.maxLatencyRatio, detail: `new p95 ${candidate.p95Ms} ms; no stable figures to compare` });
  } else {
    const ratio = round(candidate.p95Ms / stable.p95Ms);
    out.push({ gate: 'latency', verdict: ratio > gates.maxLatencyRatio ? 'failed' : 'successful', value: ratio, limit: gates.maxLatencyRatio, detail: `p95 ${candidate.p95Ms} ms against ${stable.p95Ms} ms` });
  }

  // Confidence: only where both sides report one (models without a probability output have none).
  if (!enough) out.push(waiting('confidence', gates.maxConfidenceDrop, why));
  else if (candidate.meanConfidence === null) out.push({ gate: 'confidence', verdict: 'successful', value: null, limit: gates.maxConfidenceDrop, detail: 'the model reports no confidence' });
  else if (!stable || stable.meanConfidence === null) {
    out.push({ gate: 'confidence', verdict: 'inconclusive', value: null, limit: gates.maxConfidenceDrop, detail: `new ${candidate.meanConfidence}; no stable figures to compare` });
  } else {
    const drop = round(stable.meanConfidence - candidate.meanConfidence);
    out.push({ gate: 'confidence', verdict: drop > gates.maxConfidenceDrop ? 'failed' : 'successful', value: drop, limit: gates.maxConfidenceDrop, detail: `mean ${candidate.meanConfidence} against ${stable.meanConfidence}` });
  }
  return out;
}

/** How many selected devices a wave wants on the version (cumulative). */
export function waveTarget(step: RolloutStep & { type: 'wave' }, selected: number): number {
  if (step.count !== undefined) return Math.min(step.count, selected);
  const pct = step.percent ?? 100;
  return Math.min(selected, Math.max(1, Math.ceil((selected * pct) / 100 - 1e-9)));
}

function waveNumber(plan: RolloutPlan, step: number): number {
  let n = 0;
  for (let i = 0; i <= step && i < plan.steps.length; i++) if ((plan.steps[i] as RolloutStep).type === 'wave') n++;
  return n;
}

/** The slot a rollout sets: its version and manifest. A shadow setting belonged to the version it was set for. */
function targetSlot(spec: RolloutSpecData): ModelSlot {
  return { version: spec.version, manifestSha256: spec.manifestSha256 };
}

export function reconcile(spec: RolloutSpecData, prev: RolloutStatus, obs: Observations): Decision {
  const now = obs.now;
  const actions: RolloutAction[] = [];
  const s: RolloutStatus = { ...prev, updatedAt: prev.updatedAt };
  const selected = obs.devices.filter((d) => d.selected);
  const members = obs.devices.filter((d) => d.member !== null);
  const standings = new Map<string, Standing>();
  for (const d of members) standings.set(d.id, standing(spec, d));
  const liars = new Set<string>();
  for (const d of obs.devices) if (contradicts(spec, d)) liars.add(d.id);
  s.contradictions = obs.contradictions ?? liars.size;
  const clean = (d: DeviceObservation): boolean => !liars.has(d.id);

  const waves = waveNumber(spec.plan, spec.plan.steps.length - 1);
  const perWave: Standing[][] = Array.from({ length: waves }, () => []);
  const all: Standing[] = [];
  for (const d of members) {
    if (!clean(d)) continue;
    const st = standings.get(d.id) as Standing;
    all.push(st);
    perWave[(d.member as Member).wave - 1]?.push(st);
  }
  s.waves = perWave.map(countOf);
  s.total = countOf(all);
  s.selected = selected.length;

  if (isFinal(s)) {
    trackRevert(spec, s, members, actions);
    return finish(prev, s, actions, now);
  }

  // Figures of the two cohorts the gates compare.
  const gates = gatesFor(spec.plan, s.step);
  const candidate = cohort(members.filter(clean), () => spec.version, gates.minRequests);
  const stableDevices = selected.filter((d) => d.member === null && clean(d));
  let stable: CohortFigures | null = cohort(stableDevices, (d) => (d.report?.model?.active === d.desired?.version ? (d.desired?.version ?? null) : null), gates.minRequests);
  if (stable.devices === 0) stable = s.baseline;
  else if (s.baseline === null) s.baseline = stable;
  s.candidate = candidate;
  s.stable = stable;

  // A safe mode over any selected device holds the rollout where it is: nothing is enlisted.
  const inSafeMode = selected.filter((d) => d.safeMode).length;
  s.heldBy = inSafeMode > 0 ? `safe mode on ${inSafeMode} selected device(s)` : null;

  // The failed share is judged at every step: a canary that rolls back halts the rollout now.
  const step = spec.plan.steps[s.step];
  const minDevices = step?.type === 'analysis' ? step.minDevices : 1;
  const results = judgeGates(gates, s.total, candidate, stable, minDevices);
  const failedShare = results[0] as GateResult;
  if (failedShare.verdict === 'failed') {
    s.gates = results;
    s.verdict = 'failed';
    halt(spec, s, members, actions, 'halted', `gate failed-share: ${failedShare.detail ?? ''}`, now);
    return finish(prev, s, actions, now);
  }

  if (s.state !== 'running' || s.heldBy !== null) return finish(prev, s, actions, now);

  // Walk the plan: several steps may complete in one run (a pause of 0 s, an empty wave).
  for (let guard = 0; guard <= spec.plan.steps.length; guard++) {
    const cur = spec.plan.steps[s.step];
    if (!cur) {
      s.state = 'succeeded';
      s.finishedAt = now;
      s.reason = `every step done: ${s.total.serving} device(s) on ${spec.name}@${spec.version}`;
      actions.push({ kind: 'registry', status: 'production', reason: `rollout ${spec.id} succeeded` });
      actions.push({ kind: 'audit', action: 'rollout.succeeded', detail: { devices: s.total.serving } });
      break;
    }
    const elapsed = (now - s.stepStartedAt) / 1000;
    const advance = (why: string): void => {
      actions.push({ kind: 'audit', action: 'rollout.step', detail: { step: s.step, type: cur.type, outcome: why } });
      s.step++;
      s.stepStartedAt = now;
      s.reason = null;
    };
    if (cur.type === 'wave') {
      const wave = waveNumber(spec.plan, s.step);
      const wanted = waveTarget(cur, selected.length);
      s.wanted = wanted;
      const enlistedNow = enlist(spec, s, selected, members.length, wanted, wave, actions);
      const done = s.total.serving + s.total.failed;
      const memberCount = members.length + enlistedNow;
      if (enlistedNow === 0 && memberCount >= wanted && done >= memberCount) {
        advance('applied');
        continue;
      }
      if (elapsed >= cur.timeoutSec) {
        const share = memberCount > 0 ? done / memberCount : 1;
        if (share >= cur.minAppliedShare) {
          advance(`timed out with ${memberCount - done} device(s) pending; they keep the version in desired state and catch up`);
          continue;
        }
        s.state = 'paused';
        s.verdict = 'inconclusive';
        const away = members.filter((d) => !d.online && standings.get(d.id) === 'pending').length;
        const offlineNote = away > 0 ? `, ${away} of those waiting offline` : '';
        s.reason = `inconclusive: after ${cur.timeoutSec} s only ${done} of ${memberCount} device(s) reported (${cur.minAppliedShare * 100} % needed${offlineNote}); approve to go on, resume to wait again, or abort`;
        actions.push({ kind: 'audit', action: 'rollout.inconclusive', detail: { step: s.step, done, members: memberCount, offline: away } });
      }
      break;
    }
    if (cur.type === 'pause') {
      if (cur.untilApproved) {
        s.state = 'awaiting-approval';
        s.reason = 'waiting for an operator to approve';
        break;
      }
      if (elapsed >= (cur.seconds ?? 0)) {
        advance('paused');
        continue;
      }
      break;
    }
    // Analysis.
    const a: AnalysisStep = cur;
    const r = judgeGates(a.gates, s.total, candidate, stable, a.minDevices);
    const verdict: GateVerdict = worst(...r.map((g) => g.verdict));
    s.gates = r;
    s.verdict = verdict;
    if (verdict === 'failed') {
      const failed = r.filter((g) => g.verdict === 'failed').map((g) => `${g.gate} ${g.value} > ${g.limit}`);
      halt(spec, s, members, actions, 'halted', `gate failed: ${failed.join('; ')}`, now);
      break;
    }
    if (elapsed < a.windowSec) break;
    if (verdict === 'successful') {
      advance('gates passed');
      continue;
    }
    if (verdict === 'inconclusive' || elapsed >= a.timeoutSec) {
      s.state = 'paused';
      s.verdict = 'inconclusive';
      const open = r.filter((g) => g.verdict !== 'successful').map((g) => `${g.gate}: ${g.detail ?? g.verdict}`);
      s.reason = `inconclusive: ${open.join('; ')}; approve to go on, resume to watch again, or abort`;
      actions.push({ kind: 'audit', action: 'rollout.inconclusive', detail: { step: s.step, gates: r } });
    }
    break;
  }
  return finish(prev, s, actions, now);
}

/**
 * Enlists devices up to `wanted`, in the rollout's stable order with the devices online now first;
 * returns how many. Online first: a canary of ten with one device that is switched off would wait
 * out its timeout and pause for nothing, and a wave's figures come only from devices that answer.
 * An offline device is taken once no online one is left, and catches up when it returns.
 */
function enlist(
  spec: RolloutSpecData,
  s: RolloutStatus,
  selected: readonly DeviceObservation[],
  memberCount: number,
  wanted: number,
  wave: number,
  actions: RolloutAction[],
): number {
  const need = wanted - memberCount;
  if (need <= 0) return 0;
  const candidates = selected
    .filter((d) => d.member === null && !d.safeMode)
    .sort((a, b) => (a.online !== b.online ? (a.online ? -1 : 1) : a.rank < b.rank ? -1 : a.rank > b.rank ? 1 : 0));
  let n = 0;
  for (const d of candidates.slice(0, need)) {
    // A device already told to run the version by hand keeps, as its way back, the last other version it committed.
    const previous = d.desired?.version === spec.version ? fromHistory(spec, d) : d.desired;
    actions.push({ kind: 'enlist', deviceId: d.id, wave, slot: targetSlot(spec), previous });
    n++;
  }
  s.wanted = wanted;
  return n;
}

function fromHistory(spec: RolloutSpecData, d: DeviceObservation): ModelSlot | null {
  const v = d.report?.model?.history.find((x) => x !== spec.version);
  return v === undefined ? null : { version: v };
}

/** Halts: every member whose desired state still names the version gets its previous slot back; the version is quarantined. */
function halt(spec: RolloutSpecData, s: RolloutStatus, members: readonly DeviceObservation[], actions: RolloutAction[], state: 'halted' | 'aborted', reason: string, now: number): void {
  s.state = state;
  s.reason = reason;
  s.finishedAt = now;
  s.revert = { devices: members.length, reverted: 0, startedAt: now };
  actions.push({ kind: 'registry', status: 'quarantined', reason: `rollout ${spec.id} ${state}: ${reason}`.slice(0, 500) });
  actions.push({ kind: 'audit', action: `rollout.${state}`, detail: { reason, members: members.length } });
  trackRevert(spec, s, members, actions);
}

/**
 * After a halt: level-triggered revert. A member whose desired state still names the version is
 * given its previous slot (again, if an earlier action was lost); one that reports serving its
 * previous version (or no longer holding the model, when it had none) counts as reverted.
 */
function trackRevert(spec: RolloutSpecData, s: RolloutStatus, members: readonly DeviceObservation[], actions: RolloutAction[]): void {
  if (!s.revert) return;
  let reverted = 0;
  for (const d of members) {
    const m = d.member as Member;
    if (d.desired?.version === spec.version) {
      actions.push({ kind: 'revert', deviceId: d.id, slot: m.previous });
      continue;
    }
    const r = d.report;
    if (!r || r.desiredVersion < d.desiredVersion) continue;
    const active = r.model?.active ?? null;
    if (m.previous === null ? active === null || active !== spec.version : active === m.previous.version) reverted++;
  }
  s.revert = { ...s.revert, devices: members.length, reverted };
}

/** Keeps `updatedAt` when nothing but the clock moved, so an unchanged rollout is not rewritten. */
function finish(prev: RolloutStatus, s: RolloutStatus, actions: RolloutAction[], now: number): Decision {
  if (actions.length > 0 || JSON.stringify({ ...s, updatedAt: 0 }) !== JSON.stringify({ ...prev, updatedAt: 0 })) s.updatedAt = now;
  return { status: s, actions };
}

/**
 * An operator's command against the rollout's state. Refused (EF_ROLLOUT_CONFLICT) where it makes
 * no sense; otherwise the next status and its actions (an abort reverts like a failed gate).
 */
export function command(spec: RolloutSpecData, prev: RolloutStatus, cmd: RolloutCommand, by: string, reason: string | undefined, obs: Observations): Decision {
  const now = obs.now;
  const s: RolloutStatus = { ...prev, updatedAt: now };
  const actions: RolloutAction[] = [];
  const refuse = (why: string): never => {
    throw new EdgefleetError('EF_ROLLOUT_CONFLICT', `rollout ${spec.id} is ${prev.state}: ${why}`);
  };
  if (isFinal(prev)) refuse(`it has ended; nothing to ${cmd}`);
  const note = reason ? `: ${reason}` : '';
  switch (cmd) {
    case 'pause':
      if (prev.state === 'paused') refuse('already paused');
      s.state = 'paused';
      s.reason = `paused by ${by}${note}`;
      break;
    case 'resume':
      if (prev.state !== 'paused') refuse('only a paused rollout resumes');
      // The step starts over: its window and its timeout count from now.
      s.state = 'running';
      s.stepStartedAt = now;
      s.reason = null;
      s.verdict = null;
      break;
    case 'approve':
      if (prev.state === 'awaiting-approval' || (prev.state === 'paused' && prev.verdict === 'inconclusive')) {
        // Approval accepts the step as it stands and moves past it.
        s.state = 'running';
        s.step = prev.step + 1;
        s.stepStartedAt = now;
        s.reason = null;
        s.verdict = null;
      } else refuse('nothing waits for approval');
      break;
    case 'abort': {
      const members = obs.devices.filter((d) => d.member !== null);
      halt(spec, s, members, actions, 'aborted', `aborted by ${by}${note}`, now);
      break;
    }
  }
  actions.push({ kind: 'audit', action: `rollout.${cmd}`, detail: { by, ...(reason ? { reason } : {}) } });
  if (cmd === 'abort') return { status: s, actions };
  // Let the plan move on at once where it can (an approval past a pause, say).
  const next = reconcile(spec, s, obs);
  return { status: next.status, actions: [...actions, ...next.actions] };
}

