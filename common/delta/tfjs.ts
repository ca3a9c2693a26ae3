import { FLOAT_WIDTH, type FloatKind } from '../../proto/delta.js';
import { LayoutError, finishRanges, type TensorRange } from './types.js';

/**
 * Where the weights of a TF.js model are in its shard files, from the weightsManifest of its
 * model.json (tfjs-core io/types.ts, WeightsManifestConfig). A group's weights are concatenated in
 * order and the result is cut into the group's paths in order, each shard but the last holding
 * the same number of bytes (the converter's --weight_shard_size_bytes, 4 MiB by default; the
 * writers of tfjs-core write one shard). That is what lets one shard's size place it in the group.
 */

interface Group {
  paths: string[];
  weights: unknown[];
}

interface Weight {
  name: string;
  bytes: number;
  float: FloatKind | null;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The last segment of a path or URL path: what a shard file is called on disk. */
export function shardBaseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

function groups(modelJson: unknown): Group[] {
  if (!isRecord(modelJson) || !Array.isArray(modelJson.weightsManifest)) throw new LayoutError('model.json has no weightsManifest array');
  return modelJson.weightsManifest.map((g: unknown, i) => {
    if (!isRecord(g) || !Array.isArray(g.paths) || !Array.isArray(g.weights)) throw new LayoutError(`weightsManifest[${i}] needs paths and weights arrays`);
    const paths = g.paths as unknown[];
    for (const p of paths) {
      if (typeof p !== 'string' || shardBaseName(p) === '') throw new LayoutError(`weightsManifest[${i}].paths holds ${JSON.stringify(p)}`);
    }
    return { paths: paths as string[], weights: g.weights as unknown[] };
  });
}

/** Bytes and element kind of one manifest entry, as tfjs-core's io_utils decodes it. */
function weight(w: unknown, where: string): Weight {
  if (!isRecord(w) || typeof w.name !== 'string' || typeof w.dtype !== 'string' || !Array.isArray(w.shape)) {
    throw new LayoutError(`${where} needs name, dtype and shape`);
  }
  let elements = 1;
  for (const d of w.shape as unknown[]) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw new LayoutError(`${where} has dimension ${JSON.stringify(d)}`);
    elements *= d;
    if (!Number.isSafeInteger(elements)) throw new LayoutError(`${where} has too many elements`);
  }
  const dtype = w.dtype;
  let width: number;
  let float: FloatKind | null = null;
  if (w.quantization !== undefined) {
    const q = w.quantization;
    if (!isRecord(q) || typeof q.dtype !== 'string') throw new LayoutError(`${where} has a quantization without dtype`);
    if (q.dtype === 'float16' && dtype === 'float32') {
      width = 2;
      float = 'f16';
    } else if ((q.dtype === 'uint8' || q.dtype === 'uint16') && (dtype === 'float32' || dtype === 'int32')) {
      width = q.dtype === 'uint8' ? 1 : 2;
    } else {
      throw new LayoutError(`${where} has quantization ${q.dtype} of ${dtype}`);
    }
  } else if (dtype === 'float32') {
    width = 4;
    float = 'f32';
  } else if (dtype === 'complex64') {
    // Stored as (real, imaginary) float32 pairs.
    width = 8;
    float = 'f32';
  } else if (dtype === 'int32') {
    width = 4;
  } else if (dtype === 'bool') {
    width = 1;
  } else {
    // 'string' included: each value has its own length prefix, so no later offset is known.
    throw new LayoutError(`${where} has dtype ${dtype}`);
  }
  const bytes = elements * width;
  if (!Number.isSafeInteger(bytes)) throw new LayoutError(`${where} has too many bytes`);
  return { name: w.name, bytes, float };
}

/** The weight files a model.json names, in manifest order, as written there. */
export function tfjsWeightsFiles(modelJson: unknown): string[] {
  return [...new Set(groups(modelJson).flatMap((g) => g.paths))];
}

/**
 * The weight ranges inside the shard called `shardName` (matched on the last path segment),
 * `shardSize` bytes long. A weight that straddles shards is clipped to this one; a clipped float
 * piece that does not start or end on an element boundary is reported with float null.
 * Throws LayoutError only.
 */
export function tfjsShardRanges(modelJson: unknown, shardName: string, shardSize: number): TensorRange[] {
  if (!Number.isSafeInteger(shardSize) || shardSize < 0) throw new LayoutError(`shard size ${shardSize}`);
  const all = groups(modelJson);
  const wanted = shardBaseName(shardName);
  const hits: { group: number; shard: number }[] = [];
  all.forEach((g, group) => {
    g.paths.forEach((p, shard) => {
      if (shardBaseName(p) === wanted) hits.push({ group, shard });
    });
  });
  if (hits.length !== 1) throw new LayoutError(`${JSON.stringify(wanted)} is named ${hits.length} times in weightsManifest`);
  const weightsOf = all.map((g, i) => g.weights.map((w, j) => weight(w, `weightsManifest[${i}].weights[${j}]`)));
  const { group, shard } = hits[0]!;
  const weights = weightsOf[group]!;
  const total = weights.reduce((sum, w) => sum + w.bytes, 0);
  if (!Number.isSafeInteger(total)) throw new LayoutError('weights group too large');
  const [start, end] = shardSpan(total, all[group]!.paths.length, shard, shardSize);

  const out: TensorRange[] = [];
  let at = 0;
  for (const w of weights) {
    const from = Math.max(at, start);
    const to = Math.min(at + w.bytes, end);
    if (to > from) {
      const width = w.float === null ? 1 : FLOAT_WIDTH[w.float];
      const aligned = (from - at) % width === 0 && (to - from) % width === 0;
      out.push({ name: w.name, offset: from - start, length: to - from, float: aligned ? w.float : null });
    }
    at += w.bytes;
  }
  return finishRanges(out, shardSize);
}

/**
 * Where shard `index` of `count` sits in its group's `total` bytes: [start, end). Every shard but
 * the last has the same size; a shard size that fits no such cut means the manifest and the files
 * disagree.
 */
function shardSpan(total: number, count: number, index: number, size: number): [number, number] {
  if (count === 1) {
    if (total > size) throw new LayoutError(`manifest needs ${total} bytes, shard has ${size}`);
    return [0, total];
  }
  if (index < count - 1) {
    if (size === 0 || (count - 1) * size >= total || count * size < total) {
      throw new LayoutError(`shard ${index + 1} of ${count} with ${size} bytes does not fit a group of ${total} bytes`);
    }
    return [index * size, (index + 1) * size];
  }
  const chunk = (total - size) / (count - 1);
  if (size === 0 || !Number.isSafeInteger(chunk) || chunk < size) {
    throw new LayoutError(`last shard of ${count} with ${size} bytes does not fit a group of ${total} bytes`);
  }
  return [total - size, total];
}
