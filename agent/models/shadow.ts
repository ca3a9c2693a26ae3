import { performance } from 'node:perf_hooks';
import type { SignedManifest } from '../../proto/index.js';
import { argmaxAt } from '../runtime/tensor.js';
import type { TensorMap } from '../runtime/types.js';
import type { SlotContext } from './context.js';
import { judge, type Verdict } from './health.js';
import { retire, type Slot } from './slot.js';
import { load } from './versions.js';

/**
 * Shadow scoring: the candidate runs beside the serving version on live requests, its answers
 * only compared, until it has seen the requests desired state asks for.
 */

/** Loads the candidate as the slot's shadow; resolves with its verdict, or null when aborted. */
export async function runShadow(ctx: SlotContext, slot: Slot, signed: SignedManifest, requests: number, signal: AbortSignal): Promise<Verdict | null> {
  const run = await load(ctx, signed);
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
export function shadowRun(ctx: SlotContext, slot: Slot, inputs: TensorMap, served: TensorMap): void {
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
      if (sh.left === 0 && sh.total === sh.run.stats.requests - sh.run.stats.errors) finishShadow(ctx, slot);
    },
    () => {
      finished();
      sh.run.stats.error();
      if (sh.left === 0) finishShadow(ctx, slot);
    },
  );
}

function finishShadow(ctx: SlotContext, slot: Slot): void {
  const sh = slot.shadow;
  if (!sh) return;
  // Shadow runs queue behind the answers the device returns, so their latency says nothing about
  // the candidate's; latency is judged on probation, where the candidate serves.
  const policy = { ...sh.run.signed.manifest.health, latencyP95Ms: undefined, latencyRatioMax: Infinity };
  const verdict = judge(policy, sh.run.stats, slot.serving?.stats ?? null, true);
  const agreement = sh.total > 0 ? sh.agree / sh.total : 0;
  ctx.opts.report('event', 'model.shadow', { model: slot.state.name, version: sh.run.version, agreement, requests: sh.total, verdict });
  sh.done(verdict);
}

/** Outputs agree when every row's winning class matches (a single value: within 1e-3). */
export function agrees(a: TensorMap, b: TensorMap): boolean {
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
