import { EdgefleetError, isEdgefleetError, modelRef, type SignedManifest } from '../../proto/index.js';
import { loadModel } from '../runtime/load.js';
import type { SlotContext } from './context.js';
import { VersionStats } from './health.js';
import { retire, type Running, type Slot } from './slot.js';
import { persist } from './steps.js';

/** Brings stored versions into memory: a plain load, a re-verified load, and what serves at start-up. */

export async function load(ctx: SlotContext, signed: SignedManifest): Promise<Running> {
  const m = signed.manifest;
  const model = await loadModel(m, ctx.store.viewDir(m.name, m.version));
  return { version: m.version, signed, model, stats: new VersionStats(m), inflight: 0, retired: false };
}

/** Re-verifies a stored version (signature, every file's size and sha256) and loads it. */
export async function loadVerified(ctx: SlotContext, name: string, version: number): Promise<Running> {
  const signed = ctx.store.loadManifest(name, version);
  if (!signed) throw new EdgefleetError('EF_ARTIFACT_MISSING', `${modelRef(name, version)}: no stored manifest`);
  ctx.trust.verify(signed);
  ctx.store.buildView(signed.manifest);
  // The runtime opens the files while they are re-hashed here: session creation runs off the
  // main thread, so the two overlap. The files came into the store verified; this pass catches
  // a disk that changed them since, and nothing is served unless it passes.
  const loading = load(ctx, signed);
  try {
    ctx.store.verifyVersion(signed.manifest);
  } catch (err) {
    loading.then(retire, () => undefined);
    throw err;
  }
  return loading;
}

/**
 * Loads what should serve, verifying it first: the serving version, else the newest stable
 * version that verifies, else the pinned fallback. Reports when it had to fall back.
 */
export async function serveVerified(ctx: SlotContext, slot: Slot): Promise<void> {
  const s = slot.state;
  const order = [...new Set([s.serving, ...s.stable, s.fallback].filter((v): v is number => v !== null))];
  for (const v of order) {
    try {
      const run = await loadVerified(ctx, s.name, v);
      slot.serving = run;
      if (v !== s.serving) {
        ctx.opts.log.error({ model: s.name, wanted: s.serving, serving: v }, 'the active model version did not verify; serving an older stable one');
        ctx.opts.report('event', 'model.fallback', { model: s.name, wanted: s.serving, serving: v });
        slot.state = { ...s, serving: v, stable: s.stable.filter((x) => x === v || order.indexOf(x) > order.indexOf(v)) };
        persist(ctx, slot);
      }
      return;
    } catch (err) {
      ctx.opts.log.error({ model: s.name, version: v, err }, 'model version failed verification at start-up');
      ctx.opts.report('event', 'model.unverified', { model: s.name, version: v, code: isEdgefleetError(err) ? err.code : 'EF_INTERNAL', message: (err as Error).message });
    }
  }
}
