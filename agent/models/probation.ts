import type { SignedManifest } from '../../proto/index.js';
import { runGolden } from '../runtime/load.js';
import type { SlotContext } from './context.js';
import { judge, latencyRecord, VersionStats, type LatencyRecord, type Verdict } from './health.js';
import { retire, type Running, type Slot } from './slot.js';
import { collect, committed, transition } from './steps.js';
import { rollBack } from './switch.js';
import { load } from './versions.js';

/**
 * A candidate in service: activation (load, golden check, the switch), the probation verdict
 * and commit, and the watch window that keeps judging the committed version.
 */

export async function activate(ctx: SlotContext, slot: Slot, signed: SignedManifest): Promise<void> {
  const name = slot.state.name;
  const v = signed.manifest.version;
  transition(ctx, slot, 'activating');
  let run: Running;
  try {
    run = await load(ctx, signed);
    const golden = await runGolden(run.model, signed.manifest);
    if (!golden.ok) {
      await run.model.dispose().catch(() => undefined);
      const verdict: Verdict = { ok: false, failures: [{ check: 'golden', value: golden.failures.length, limit: 0, detail: golden.failures[0]?.message.slice(0, 200) }], figures: null };
      await rollBack(ctx, slot, verdict, 'golden');
      return;
    }
  } catch (err) {
    await rollBack(ctx, slot, { ok: false, failures: [], figures: null }, `load: ${(err as Error).message.slice(0, 200)}`);
    return;
  }
  // The switch: the previous version stays loaded until commit, so a rollback is a pointer swap.
  slot.previous = slot.serving;
  slot.previousLatency = latencyOf(slot);
  slot.serving = run;
  // On probation the candidate's own record is what is judged; the watch resumes after commit.
  slot.watchStats = null;
  slot.probationStartedAt = Date.now();
  transition(ctx, slot, 'probation', { serving: v });
  ctx.opts.log.info({ model: name, version: v, policy: { requests: signed.manifest.health.probationRequests, seconds: signed.manifest.health.probationSec } }, 'model on probation');
}

/** After every request: error and NaN budgets are judged at once while on probation. */
export function afterRequest(ctx: SlotContext, slot: Slot, run: Running): void {
  if (slot.state.state === 'probation' && run === slot.serving) {
    const policy = run.signed.manifest.health;
    if ((run.stats.errors > 0 && policy.errorRateMax === 0) || (run.stats.nonFinite > 0 && policy.nanRateMax === 0)) checkProbation(ctx, slot);
  } else if (slot.state.state === 'idle' && slot.watchStats && slot.watchStats.requests >= (slot.serving?.signed.manifest.health.watchWindowRequests ?? Infinity)) {
    checkWatch(ctx, slot);
  }
}

export function checkProbation(ctx: SlotContext, slot: Slot): void {
  const run = slot.serving;
  if (!run || slot.state.state !== 'probation' || slot.rollingBack) return;
  const policy = run.signed.manifest.health;
  const elapsed = (Date.now() - slot.probationStartedAt) / 1000;
  // The window closes when both its requests and its seconds have passed; with too little
  // traffic it closes at ten times its seconds and judges what it saw.
  const windowDone = (run.stats.requests >= policy.probationRequests && elapsed >= policy.probationSec) || elapsed >= Math.max(policy.probationSec * 10, policy.probationSec + 1);
  const verdict = judge(policy, run.stats, slot.previousLatency, windowDone);
  if (!verdict.ok) {
    ctx.track(rollBack(ctx, slot, verdict, verdict.failures.map((f) => f.check).join(',')));
    return;
  }
  if (windowDone) commit(ctx, slot, verdict);
}

/**
 * The serving version's latency to compare a candidate against: what it did since the agent
 * started, if that is enough samples, else what it did on its own probation here.
 */
function latencyOf(slot: Slot): LatencyRecord | null {
  const run = slot.serving;
  if (!run) return slot.previousLatency;
  if (run.stats.p95() !== null) return run.stats;
  const kept = slot.state.latency.find((l) => l.version === run.version);
  return kept ? latencyRecord(kept) : null;
}

function commit(ctx: SlotContext, slot: Slot, verdict: Verdict): void {
  const run = slot.serving as Running;
  const lastVerdict = { version: run.version, ok: true, figures: verdict.figures };
  transition(ctx, slot, 'committing', { lastVerdict });
  ctx.opts.report('event', 'model.verdict', { model: slot.state.name, ...lastVerdict });
  const prev = slot.previous;
  slot.previous = null;
  if (prev) retire(prev);
  const next = committed(ctx, slot.state);
  const p50 = run.stats.p50();
  const p95 = run.stats.p95();
  const latency = next.latency.filter((l) => l.version !== run.version && next.stable.includes(l.version));
  if (p50 !== null && p95 !== null) latency.push({ version: run.version, p50Ms: p50, p95Ms: p95 });
  transition(ctx, slot, 'idle', { ...next, latency });
  slot.watchStats = new VersionStats(run.signed.manifest);
  collect(ctx, slot);
  if (slot.desired?.version !== run.version || ctx.inSafeMode()) ctx.kick(slot);
}

function checkWatch(ctx: SlotContext, slot: Slot): void {
  const run = slot.serving;
  const stats = slot.watchStats;
  if (!run || !stats || slot.rollingBack) return;
  slot.watchStats = new VersionStats(run.signed.manifest);
  let verdict = judge(run.signed.manifest.health, stats, slot.previousLatency, true);
  if (run.personal) {
    // A personalized variant's outputs are meant to differ from the published version's: output
    // drift against its baseline and mean confidence say nothing about it (the holdout check that
    // let it serve does). Any other failure is the variant's, not the version's: the global
    // weights go back and the next window judges the version as published.
    const failures = verdict.failures.filter((f) => f.check !== 'psi' && f.check !== 'confidence');
    verdict = { ...verdict, ok: failures.length === 0, failures };
    if (verdict.ok) return;
    ctx.opts.report('event', 'model.regression', { model: slot.state.name, version: run.version, failures: verdict.failures, figures: verdict.figures, action: 'unpersonalize' });
    ctx.opts.log.warn({ model: slot.state.name, version: run.version, failures: verdict.failures }, 'the personalized variant regressed after commit; the global weights serve again');
    run.model.weights?.write(run.personal.original);
    delete run.personal;
    ctx.opts.onChange();
    return;
  }
  if (verdict.ok) return;
  // In safe mode the fallback serves whatever it shows: the operator chose it over every other version.
  const action = slot.state.safeMode ? 'report' : run.signed.manifest.health.afterCommit;
  ctx.opts.report('event', 'model.regression', { model: slot.state.name, version: run.version, failures: verdict.failures, figures: verdict.figures, action });
  if (action === 'rollback' && slot.state.stable.length > 1) ctx.track(rollBack(ctx, slot, verdict, 'regression after commit'));
}
