import { performance } from 'node:perf_hooks';
import { isEdgefleetError, modelRef } from '../../proto/index.js';
import type { SlotContext } from './context.js';
import { judge, VersionStats, type Verdict } from './health.js';
import { retire, type Slot } from './slot.js';
import { collect, transition, update } from './steps.js';
import { loadVerified, serveVerified } from './versions.js';

/**
 * Every switch of what serves other than a candidate's activation: a rollback (local verdict,
 * operator, or a fleet revert), a local rollback to a version held here, and safe mode in and out.
 * Each switches first and writes after, and holds `slot.rollingBack` while it runs.
 */

/**
 * Back to the last stable version (or `target`, a version held here the fleet named): a pointer
 * swap when it is still loaded (probation), else a verified cold load. The version that failed is
 * marked so and never tried again here.
 */
export async function rollBack(ctx: SlotContext, slot: Slot, verdict: Verdict, reason: string, target?: number): Promise<number> {
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
      slot.serving = await loadVerified(ctx, s.name, back);
    } catch (err) {
      ctx.opts.log.error({ err, model: s.name, version: back }, 'stable version did not verify during rollback');
      slot.serving = null;
      await serveVerified(ctx, slot);
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
  const stable = now === null || now === failedVersion ? kept : [now, ...kept.filter((v) => v !== now)].slice(0, ctx.opts.keepStable);
  transition(ctx, slot, 'rolling_back', { lastVerdict, stable }, { reason });
  ctx.opts.report('event', 'model.verdict', { model: s.name, ...lastVerdict, rolledBackTo: slot.serving?.version ?? null });
  ctx.opts.log.error({ model: s.name, version: failedVersion, back, failures: verdict.failures }, `model ${modelRef(s.name, failedVersion ?? 0)} rolled back: ${reason}`);
  if (bad && bad !== slot.serving) retire(bad);
  const failed = failedVersion === null ? s.failed : [...s.failed, { version: failedVersion, reason: reason.slice(0, 64), at: Date.now() }].slice(-64);
  transition(ctx, slot, 'idle', {
    serving: slot.serving?.version ?? null,
    candidate: null,
    attempts: 0,
    failed,
  });
  slot.rollingBack = false;
  slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
  collect(ctx, slot);
  // A version assigned while this one was on probation waited for the verdict; safe mode may have come meanwhile.
  if (slot.desired && (slot.desired.version !== slot.serving?.version || ctx.inSafeMode())) ctx.kick(slot);
  return switchMs;
}

/** The fleet reverts the candidate on probation to a version held here: a rollback with that target, the candidate quarantined. */
export async function revert(ctx: SlotContext, slot: Slot, to: number): Promise<void> {
  const run = slot.serving;
  const figures = run ? judge(run.signed.manifest.health, run.stats, slot.previousLatency, false).figures : null;
  await rollBack(ctx, slot, { ok: false, failures: [], figures }, 'reverted by fleet', to);
}

/** Desired state names a version from this device's own stable history, or its pinned fallback: verify, load, switch. */
export async function localRollback(ctx: SlotContext, slot: Slot, version: number): Promise<void> {
  const run = await loadVerified(ctx, slot.state.name, version);
  transition(ctx, slot, 'activating', { candidate: version });
  const old = slot.serving;
  slot.serving = run;
  slot.watchStats = null;
  if (old) retire(old);
  transition(ctx, slot, 'probation', { serving: version });
  slot.probationStartedAt = Date.now();
  slot.previousLatency = old?.stats ?? null;
  slot.previous = null;
}

/** A version this device can serve without a download: a stable one, the pinned fallback, or the one kept warm on probation. */
export function holds(slot: Slot, version: number): boolean {
  const s = slot.state;
  return s.stable.includes(version) || s.fallback === version || slot.previous?.version === version;
}

/**
 * Serves `version` in place of what serves now: the warm previous version when it is the one (a
 * pointer swap), else a verified load, while the old one answers. Throws when it does not
 * verify, and the old one goes on serving. Retiring the old one is the caller's.
 */
async function switchTo(ctx: SlotContext, slot: Slot, version: number): Promise<void> {
  if (slot.previous?.version === version) {
    slot.serving = slot.previous;
    slot.previous = null;
    return;
  }
  slot.serving = await loadVerified(ctx, slot.state.name, version);
}

/**
 * Safe mode: the slot serves its pinned fallback, switched at once (a pointer swap when it is the
 * warm previous version, else a verified load) and without judging anything: a candidate on
 * probation is abandoned, not failed. Nothing is fetched or tried while safe mode holds; the
 * lifecycle resumes when it ends (leaveSafeMode).
 */
export async function enterSafeMode(ctx: SlotContext, slot: Slot): Promise<void> {
  const s = slot.state;
  const fallback = s.fallback;
  if (fallback === null) return; // reconcile said why
  if (s.state !== 'idle' && s.state !== 'probation') return; // not reached: drive runs every other step to its end
  if (s.safeMode && s.state === 'idle' && slot.serving?.version === fallback) return;
  const old = slot.serving;
  const prev = slot.previous;
  slot.rollingBack = true;
  try {
    if (old?.version !== fallback) await switchTo(ctx, slot, fallback);
  } catch (err) {
    slot.rollingBack = false;
    ctx.opts.log.error({ err, model: s.name, fallback }, 'safe mode: the fallback version did not verify; the model keeps serving what it serves');
    ctx.opts.report('event', 'model.unverified', { model: s.name, version: fallback, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
    return;
  }
  // The switch came first; then one write. From probation the way out is `rolling_back`, written
  // with no candidate, so that a restart in between marks nothing failed (ON_RESTART).
  if (s.state === 'probation') {
    transition(ctx, slot, 'rolling_back', { serving: fallback, candidate: null, attempts: 0, safeMode: true }, { reason: 'safe mode' });
    transition(ctx, slot, 'idle');
  } else {
    update(ctx, slot, { serving: fallback, safeMode: true });
  }
  slot.rollingBack = false;
  slot.previous = null;
  for (const r of [old, prev]) if (r && r !== slot.serving) retire(r);
  // From probation there is no watch yet (the candidate's own record was judged): it starts now.
  if (old !== slot.serving || !slot.watchStats) slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
  ctx.opts.log.warn({ model: s.name, from: old?.version ?? null, serving: fallback }, `safe mode: ${modelRef(s.name, fallback)} (the pinned fallback) serves`);
  ctx.opts.report('event', 'model.safe-mode', { model: s.name, on: true, serving: fallback });
}

/**
 * Safe mode ended: the slot switches at once to what desired state names when it holds that
 * version (it served here before: no probation), else back to its last stable version, from
 * which the normal lifecycle goes on. Returns false when the switch failed: the slot stays on
 * its fallback, still marked, and the next reconcile tries again.
 */
export async function leaveSafeMode(ctx: SlotContext, slot: Slot, want: number): Promise<boolean> {
  const s = slot.state;
  if (s.state !== 'idle') {
    // Not reached (safe mode starts nothing); never leave the mark behind.
    update(ctx, slot, { safeMode: false });
    return true;
  }
  const held = holds(slot, want) && !s.failed.some((f) => f.version === want);
  const target = held ? want : (s.stable[0] ?? slot.serving?.version ?? null);
  const old = slot.serving;
  if (target !== null && old?.version !== target) {
    slot.rollingBack = true;
    try {
      await switchTo(ctx, slot, target);
    } catch (err) {
      ctx.opts.log.error({ err, model: s.name, version: target }, 'leaving safe mode: the version to serve did not verify; the fallback serves on');
      ctx.opts.report('event', 'model.unverified', { model: s.name, version: target, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
      return false;
    } finally {
      slot.rollingBack = false;
    }
  }
  const serving = slot.serving?.version ?? null;
  // What serves outside safe mode is stable[0] (lifecycle.ts): a held version desired state names comes first again.
  const stable = serving === null ? s.stable : [serving, ...s.stable.filter((v) => v !== serving)].slice(0, ctx.opts.keepStable);
  update(ctx, slot, { serving, stable, safeMode: false });
  if (old && old !== slot.serving) {
    retire(old);
    slot.watchStats = slot.serving ? new VersionStats(slot.serving.signed.manifest) : null;
  }
  ctx.opts.log.info({ model: s.name, from: old?.version ?? null, serving, desired: want }, 'safe mode ended for this model');
  ctx.opts.report('event', 'model.safe-mode', { model: s.name, on: false, serving });
  return true;
}
