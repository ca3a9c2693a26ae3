import { modelRef } from '../../proto/index.js';
import type { SlotContext } from './context.js';
import type { Verdict } from './health.js';
import { canTransition, ON_RESTART, type SlotState, type SlotStateName } from './lifecycle.js';
import type { Slot } from './slot.js';

/**
 * Writes to a slot's persisted state: lifecycle transitions (checked against lifecycle.ts, saved,
 * logged and reported), what a restart resumes, commit and failure, and the collection of
 * versions no longer kept.
 */

export function persist(ctx: SlotContext, slot: Slot): void {
  ctx.store.saveSlot(slot.state.name, slot.state);
}

export function transition(ctx: SlotContext, slot: Slot, to: SlotStateName, patch: Partial<SlotState> = {}, why?: Record<string, unknown>): void {
  const from = slot.state.state;
  if (from !== to && !canTransition(from, to)) throw new Error(`slot ${slot.state.name}: no transition ${from} → ${to}`);
  slot.state = { ...slot.state, ...patch, state: to, transitions: slot.state.transitions + 1, updatedAt: Date.now() };
  persist(ctx, slot);
  ctx.opts.log.info({ model: slot.state.name, from, to, candidate: slot.state.candidate, ...why }, `model ${slot.state.name}: ${from} → ${to}`);
  ctx.opts.report('event', 'model.transition', { model: slot.state.name, from, to, candidate: slot.state.candidate, serving: slot.state.serving, ...why });
  ctx.opts.onChange();
}

/** Writes a change of an idle slot that is not a lifecycle step (safe mode's switches). */
export function update(ctx: SlotContext, slot: Slot, patch: Partial<SlotState>): void {
  slot.state = { ...slot.state, ...patch, updatedAt: Date.now() };
  persist(ctx, slot);
  ctx.opts.onChange();
}

/** Applies ON_RESTART to a slot read from disk (synchronously: nothing is loaded yet). */
export function recover(ctx: SlotContext, slot: Slot): void {
  const s = slot.state;
  const action = ON_RESTART[s.state];
  if (action === 'nothing') return;
  ctx.opts.log.warn({ model: s.name, state: s.state, candidate: s.candidate, action }, 'resuming a model slot interrupted by a restart');
  ctx.opts.report('event', 'model.recovered', { model: s.name, state: s.state, candidate: s.candidate, action });
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
      const exhausted = attempts >= ctx.opts.maxAttempts;
      const failed = exhausted && cand !== null ? [...s.failed, { version: cand, reason: 'crash-loop', at: Date.now() }] : s.failed;
      slot.state = { ...s, state: 'idle', serving: stableServing, candidate: exhausted ? null : cand, attempts: exhausted ? 0 : attempts, failed: failed.slice(-64), updatedAt: Date.now() };
      break;
    }
    case 'finish-commit':
      slot.state = committed(ctx, s);
      break;
    case 'finish-rollback':
    case 'finish-fail':
      slot.state = { ...s, state: 'idle', serving: stableServing, candidate: null, attempts: 0, failed: cand !== null && !s.failed.some((f) => f.version === cand) ? [...s.failed, { version: cand, reason: 'interrupted', at: Date.now() }] : s.failed };
      break;
  }
  persist(ctx, slot);
}

/** The state after the candidate (or what serves) is committed: it leads `stable` and raises the floor. */
export function committed(ctx: SlotContext, s: SlotState): SlotState {
  const v = s.candidate ?? s.serving;
  if (v === null) return { ...s, state: 'idle' };
  const stable = [v, ...s.stable.filter((x) => x !== v)].slice(0, ctx.opts.keepStable);
  return { ...s, state: 'idle', stable, serving: v, candidate: null, attempts: 0, floor: Math.max(s.floor, v), fallback: s.fallback ?? v, updatedAt: Date.now() };
}

/** Removes from the store every version of the model that the slot no longer keeps. */
export function collect(ctx: SlotContext, slot: Slot): void {
  const s = slot.state;
  const keep = new Set<number>([...s.stable, ...(s.fallback !== null ? [s.fallback] : []), ...(s.serving !== null ? [s.serving] : [])]);
  try {
    ctx.store.collect(s.name, keep);
  } catch (err) {
    ctx.opts.log.warn({ err, model: s.name }, 'could not collect old model versions');
  }
}

export function abandon(ctx: SlotContext, slot: Slot): void {
  if (slot.state.state !== 'idle') transition(ctx, slot, 'idle', { candidate: null, attempts: 0 }, { reason: 'desired state moved on' });
}

export function fail(ctx: SlotContext, slot: Slot, version: number, code: string, message: string, verdict?: Verdict): void {
  const lastVerdict = { version, ok: false, code, message: message.slice(0, 500), ...(verdict ? { failures: verdict.failures, figures: verdict.figures } : {}) };
  ctx.opts.log.error({ model: slot.state.name, version, code, message }, `model ${modelRef(slot.state.name, version)} refused`);
  ctx.opts.report('event', 'model.verdict', { model: slot.state.name, ...lastVerdict });
  transition(ctx, slot, 'failed', { lastVerdict }, { code });
  transition(ctx, slot, 'idle', { candidate: null, attempts: 0, failed: [...slot.state.failed, { version, reason: code, at: Date.now() }].slice(-64) });
  // Nothing of a refused version stays: its manifest, its files, its partial downloads.
  collect(ctx, slot);
}
