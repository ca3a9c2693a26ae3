import { FRAME_FL_UPDATE, UpdateMeta, decodeFlFrame, isEdgefleetError, tensorsL2Norm, type Bundle, type UpdateRejection } from '../../proto/index.js';
import type { FlParticipantRow, FlRoundRow } from '../store/types.js';
import type { WeightSpec } from './weights.js';

/**
 * The checks an update passes before it counts, cheapest first. Pure: the round, the sender's
 * participation and the payload in, a verdict out. Everything refused is counted on the round by
 * its reason, and nothing of it is kept.
 */

/** Quantization moves an update's norm a little; more than this over the bound is refused. */
export const NORM_SLACK = 0.01;

export type Intake = { ok: true; meta: UpdateMeta; bundle: Bundle; norm: number } | { ok: false; reason: UpdateRejection; detail: string };

export interface IntakeContext {
  round: FlRoundRow | null;
  participant: FlParticipantRow | null;
  /** The weights that travel, in order. */
  specs: readonly WeightSpec[];
  now: number;
  maxBytes: number;
}

const no = (reason: UpdateRejection, detail: string): Intake => ({ ok: false, reason, detail });

export function checkUpdate(payload: Uint8Array, ctx: IntakeContext): Intake {
  const expected = ctx.specs.reduce((a, s) => a + s.size, 0);
  if (payload.length > ctx.maxBytes) return no('oversized', `${payload.length} bytes, at most ${ctx.maxBytes}`);
  let bundle: Bundle;
  try {
    bundle = decodeFlFrame(FRAME_FL_UPDATE, payload, { maxTensors: ctx.specs.length, maxElements: expected, maxBytes: ctx.maxBytes });
  } catch (err) {
    if (!isEdgefleetError(err)) throw err;
    const reason = (err.details as { reason?: string } | undefined)?.reason;
    if (reason === 'non-finite') return no('non-finite', err.message);
    if (err.code === 'EF_BUNDLE_TOO_LARGE') return no('wrong-tensors', err.message);
    return no('malformed', err.message);
  }
  const meta = UpdateMeta.safeParse(bundle.meta);
  if (!meta.success) return no('malformed', `meta: ${meta.error.issues[0]?.message ?? 'invalid'}`);
  const m = meta.data;
  const round = ctx.round;
  if (!round) return no('unknown-round', `round ${m.roundId}`);
  if (!ctx.participant) return no('not-invited', `round ${round.id}`);
  if (ctx.participant.state === 'updated') return no('duplicate', `round ${round.id} already has this device's update`);
  if (round.state !== 'collecting' || ctx.now > round.deadlineAt) return no('late', `round ${round.id} is ${round.state === 'collecting' ? 'past its deadline' : round.state}`);
  if (ctx.participant.state === 'declined' || ctx.participant.state === 'failed') return no('not-invited', `the device ${ctx.participant.state} round ${round.id}`);
  if (m.baseManifestSha256 !== round.baseManifestSha256) return no('stale-base', `trained from ${m.baseManifestSha256.slice(0, 12)}, the round's base is ${round.baseManifestSha256.slice(0, 12)}`);
  if (bundle.tensors.length !== ctx.specs.length) return no('wrong-tensors', `${bundle.tensors.length} tensors, the model shares ${ctx.specs.length}`);
  for (let i = 0; i < ctx.specs.length; i++) {
    const t = bundle.tensors[i]!;
    const s = ctx.specs[i]!;
    if (t.name !== s.name || t.shape.length !== s.shape.length || t.shape.some((d, j) => d !== s.shape[j])) {
      return no('wrong-tensors', `tensor ${i} is ${t.name} [${t.shape.join(',')}], expected ${s.name} [${s.shape.join(',')}]`);
    }
  }
  const norm = tensorsL2Norm(bundle.tensors);
  const bound = round.config.train.clipNorm;
  if (norm > bound * (1 + NORM_SLACK)) return no('norm-above-bound', `norm ${norm.toPrecision(4)} over the bound ${bound}`);
  return { ok: true, meta: m, bundle, norm };
}
