import { FLOAT_WIDTH, type FloatKind } from '../../proto/delta.js';

/** Where one tensor's element data sits in a model file. */
export interface TensorRange {
  /** Unique within the file: for ONNX the graph path plus tensor name, e.g. "main/If_0.then_branch/weight"; for TF.js the weight name. */
  name: string;
  /** Byte offset of the tensor's element data in the file. */
  offset: number;
  /** Byte length of that data. */
  length: number;
  /** Float element kind when the data is a little-endian float array, else null (ints, bools, strings, quantized). */
  float: FloatKind | null;
}

/** The file is not what its layout parser expects; callers fall back to no layout. */
export class LayoutError extends Error {
  override readonly name = 'LayoutError';
}

/**
 * What every parser returns: ranges with data only, sorted by offset, inside the file, not
 * overlapping, float only when the length is whole elements, and names made unique in file order
 * ("w", "w#2", "w#3") so that two versions of one model pair their tensors the same way.
 */
export function finishRanges(raw: readonly TensorRange[], fileSize: number): TensorRange[] {
  const kept = raw.filter((r) => r.length > 0);
  // The parsers emit in file order already; sorting is for the odd input that does not.
  for (let i = 1; i < kept.length; i++) {
    if (kept[i]!.offset < kept[i - 1]!.offset) {
      kept.sort((a, b) => a.offset - b.offset);
      break;
    }
  }
  const used = new Set<string>();
  /** The next suffix to try per base name, so that many equal names stay linear. */
  const next = new Map<string, number>();
  const out: TensorRange[] = [];
  let end = 0;
  for (const r of kept) {
    if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.offset < end || r.length > fileSize - r.offset) {
      throw new LayoutError(`tensor ${JSON.stringify(r.name)} at ${r.offset}+${r.length} overlaps another or leaves the file (${fileSize} bytes)`);
    }
    end = r.offset + r.length;
    let name = r.name;
    if (used.has(name)) {
      let n = next.get(r.name) ?? 2;
      while (used.has(`${r.name}#${n}`)) n++;
      name = `${r.name}#${n}`;
      next.set(r.name, n + 1);
    }
    used.add(name);
    const float = r.float !== null && r.length % FLOAT_WIDTH[r.float] === 0 ? r.float : null;
    out.push({ name, offset: r.offset, length: r.length, float });
  }
  return out;
}
