import type * as Tfjs from '@tensorflow/tfjs';
import { EdgefleetError, encodeBundle, isEdgefleetError, tensorsL2Norm, dequantizeQ8, quantizeQ8, type BundleTensor, type UpdateMeta } from '../../proto/index.js';
import { normalSampler } from '../../common/random.js';

/**
 * A round's update: the difference between the weights after local training and the round's base,
 * clipped to the round's norm bound, optionally noised, packed as a tensor bundle. Weights are
 * named as in the model's weightsManifest (a LayerVariable's originalName), which is how the fleet
 * finds them in the base version's files.
 */

export interface NamedWeight {
  name: string;
  /** The layer it belongs to: how personal layers are told apart. */
  layer: string;
  shape: number[];
  data: Float32Array;
}

/** `details` of an error about weights that do not fit the model (names or sizes): they will never fit it. */
export const WEIGHTS_MISMATCH = { reason: 'weights-mismatch' } as const;

export function isWeightsMismatch(err: unknown): boolean {
  return isEdgefleetError(err) && (err.details as { reason?: unknown } | undefined)?.reason === WEIGHTS_MISMATCH.reason;
}

/** A copy of the model's weights, in model order. */
export function readWeights(model: Tfjs.LayersModel): NamedWeight[] {
  const out: NamedWeight[] = [];
  for (const layer of model.layers) {
    for (const w of layer.weights) {
      out.push({ name: w.originalName, layer: layer.name, shape: w.shape.map((d) => d ?? 0), data: Float32Array.from(w.read().dataSync() as Float32Array) });
    }
  }
  return out;
}

/** Assigns weights by name; every name must exist in the model with the same size. Names not given keep their values. */
export function writeWeights(tf: typeof Tfjs, model: Tfjs.LayersModel, weights: readonly Pick<NamedWeight, 'name' | 'data'>[]): void {
  const byName = new Map<string, Tfjs.LayerVariable>();
  for (const w of model.weights) byName.set(w.originalName, w);
  for (const w of weights) {
    const v = byName.get(w.name);
    if (!v) throw new EdgefleetError('EF_TRAINING_FAILED', `the model has no weight ${w.name}`, { details: WEIGHTS_MISMATCH });
    const size = v.shape.reduce<number>((a, b) => a * (b ?? 0), 1);
    if (size !== w.data.length) throw new EdgefleetError('EF_TRAINING_FAILED', `weight ${w.name} has ${size} values, ${w.data.length} given`, { details: WEIGHTS_MISMATCH });
    const t = tf.tensor(w.data, v.shape as number[], 'float32');
    v.write(t);
    t.dispose();
  }
}

/** after − base for every weight not in a personal layer: what leaves the device. */
export function weightDelta(after: readonly NamedWeight[], base: readonly NamedWeight[], personalLayers: readonly string[] = []): BundleTensor[] {
  const personal = new Set(personalLayers);
  const baseByName = new Map(base.map((w) => [w.name, w]));
  const out: BundleTensor[] = [];
  for (const w of after) {
    if (personal.has(w.layer)) continue;
    const b = baseByName.get(w.name);
    if (!b || b.data.length !== w.data.length) throw new EdgefleetError('EF_TRAINING_FAILED', `weight ${w.name} is not in the base, or has another size`);
    const d = new Float32Array(w.data.length);
    for (let i = 0; i < d.length; i++) d[i] = w.data[i]! - b.data[i]!;
    out.push({ name: w.name, shape: w.shape, data: d });
  }
  return out;
}

/** The joint L2 norm of the tensors that travel: what a round's `clipNorm` bounds. */
export { tensorsL2Norm as l2Norm };

/** Scales the tensors, together, down to `clipNorm` when their joint L2 norm is above it. */
export function clipToNorm(tensors: BundleTensor[], clipNorm: number): { normBeforeClip: number; clipped: boolean } {
  const norm = tensorsL2Norm(tensors);
  if (norm <= clipNorm) return { normBeforeClip: norm, clipped: false };
  // A hair under the bound, so float32 rounding cannot leave the result just above it.
  const k = (clipNorm / norm) * (1 - 1e-6);
  for (const t of tensors) for (let i = 0; i < t.data.length; i++) t.data[i]! *= k;
  return { normBeforeClip: norm, clipped: true };
}

export interface UpdateOptions {
  meta: Omit<UpdateMeta, 'kind' | 'normBeforeClip' | 'clipped' | 'localNoiseStd' | 'quantizationError'>;
  clipNorm: number;
  localNoiseMultiplier: number;
  encoding: 'float32' | 'q8';
  /** Stochastic rounding and the noise. Local DP noise must come from a cryptographic source (`cryptoUniform`). */
  random: () => number;
}

/** Clips (in place), noises, encodes. Returns the bundle and the meta it carries. */
export function packUpdate(delta: BundleTensor[], opts: UpdateOptions): { bytes: Uint8Array; meta: UpdateMeta } {
  const { normBeforeClip, clipped } = clipToNorm(delta, opts.clipNorm);
  const localNoiseStd = opts.localNoiseMultiplier * opts.clipNorm;
  if (localNoiseStd > 0) {
    const normal = normalSampler(opts.random);
    for (const t of delta) for (let i = 0; i < t.data.length; i++) t.data[i]! += localNoiseStd * normal();
  }
  const meta: UpdateMeta = { kind: 'fl-update', ...opts.meta, normBeforeClip, clipped, localNoiseStd };
  if (opts.encoding === 'q8') meta.quantizationError = quantizationError(delta, opts.random);
  const bytes = encodeBundle({ tensors: delta, meta }, { encoding: opts.encoding, random: opts.random });
  return { bytes, meta };
}

/**
 * ‖q(x) − x‖ / ‖x‖ of one quantization draw of the update: the error 8-bit stochastic rounding
 * adds, which the device reports so the fleet (and the operator) can see what q8 costs. Drawn
 * separately from the encoded one, with the same distribution.
 */
export function quantizationError(tensors: readonly BundleTensor[], random: () => number): number {
  let err = 0;
  let norm = 0;
  for (const t of tensors) {
    const { q, min, scale } = quantizeQ8(t.data, random);
    const back = dequantizeQ8(q, min, scale);
    for (let i = 0; i < t.data.length; i++) {
      const d = back[i]! - t.data[i]!;
      err += d * d;
      norm += t.data[i]! * t.data[i]!;
    }
  }
  return norm === 0 ? 0 : Math.sqrt(err / norm);
}
