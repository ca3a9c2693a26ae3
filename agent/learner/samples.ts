import { EdgefleetError } from '../../proto/index.js';

/**
 * Labelled examples in the flat form training wants: `count` rows of `featureSize` floats, and
 * per row either a class index or `labelWidth` target floats.
 */
export interface SampleSet {
  x: Float32Array;
  /** Class indices (`labelWidth` 1) for cross-entropy; `count × labelWidth` floats for squared error. */
  y: Int32Array | Float32Array;
  count: number;
  /** One row's shape, without the batch dimension. */
  featureShape: number[];
  labelWidth: number;
}

export const featureSize = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** Rows `idx` of a set, copied. */
export function pickRows(set: SampleSet, idx: ArrayLike<number>): SampleSet {
  const f = featureSize(set.featureShape);
  const n = idx.length;
  const x = new Float32Array(n * f);
  const y = set.y instanceof Int32Array ? new Int32Array(n * set.labelWidth) : new Float32Array(n * set.labelWidth);
  for (let i = 0; i < n; i++) {
    const r = idx[i]!;
    x.set(set.x.subarray(r * f, (r + 1) * f), i * f);
    y.set(set.y.subarray(r * set.labelWidth, (r + 1) * set.labelWidth), i * set.labelWidth);
  }
  return { x, y, count: n, featureShape: set.featureShape, labelWidth: set.labelWidth };
}

/**
 * A deterministic train/holdout split: row r goes to the holdout when a hash of its key falls
 * below `holdoutShare`. Keyed by something stable per sample (its row id in the store), a sample
 * stays on the same side from round to round, so the holdout never leaks into training.
 */
export function splitHoldout(set: SampleSet, keys: ArrayLike<number>, holdoutShare: number): { train: SampleSet; holdout: SampleSet } {
  if (keys.length !== set.count) throw new EdgefleetError('EF_TRAINING_FAILED', `${keys.length} keys for ${set.count} samples`);
  const train: number[] = [];
  const holdout: number[] = [];
  for (let i = 0; i < set.count; i++) (hashUnit(keys[i]!) < holdoutShare ? holdout : train).push(i);
  return { train: pickRows(set, train), holdout: pickRows(set, holdout) };
}

/** A 32-bit integer hash (lowbias32, Chris Wellons) mapped to [0, 1). */
function hashUnit(k: number): number {
  let h = k >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return (h >>> 0) / 4294967296;
}
