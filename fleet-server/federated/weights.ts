import { readFileSync } from 'node:fs';
import { posix } from 'node:path';
import { EdgefleetError, type Manifest, type ModelFile } from '../../proto/index.js';

/**
 * A TF.js layers model's weights as the fleet sees them: read from the registry's artifact files
 * without TF.js (model.json's weightsManifest says where each weight sits in the shards), and a
 * new weights file written in the same order for a candidate. Only float32 weights: a quantized
 * base cannot take a float difference without losing it, and is refused when a round starts.
 */

export interface WeightSpec {
  name: string;
  shape: number[];
  size: number;
}

export interface ModelWeights {
  /** model.json as the base has it. */
  modelJson: Record<string, unknown>;
  specs: WeightSpec[];
  /** Every weight, in spec order, one after the other. */
  flat: Float32Array;
}

interface ManifestEntry {
  name: string;
  shape: number[];
  dtype?: string;
  quantization?: unknown;
}

const bad = (why: string): EdgefleetError => new EdgefleetError('EF_MODEL_INVALID', `cannot train this model on devices: ${why}`);

/** Reads the base's weights; `pathOf(file)` gives where the artifact store keeps a manifest file. */
export function readModelWeights(manifest: Manifest, pathOf: (file: ModelFile) => string): ModelWeights {
  const byPath = new Map(manifest.files.map((f) => [f.path, f]));
  const entry = byPath.get(manifest.entry);
  if (!entry) throw bad(`entry ${manifest.entry} is not among its files`);
  const modelJson = JSON.parse(readFileSync(pathOf(entry), 'utf8')) as Record<string, unknown>;
  const groups = modelJson.weightsManifest as { paths: string[]; weights: ManifestEntry[] }[] | undefined;
  if (!Array.isArray(groups)) throw bad('model.json has no weightsManifest');
  const specs: WeightSpec[] = [];
  const parts: Float32Array[] = [];
  const dir = posix.dirname(manifest.entry);
  for (const g of groups) {
    const buffers = g.paths.map((p) => {
      const f = byPath.get(posix.normalize(posix.join(dir, p)));
      if (!f) throw bad(`weight shard ${p} is not among the manifest's files`);
      return readFileSync(pathOf(f));
    });
    const all = Buffer.concat(buffers);
    let at = 0;
    for (const w of g.weights) {
      if ((w.dtype ?? 'float32') !== 'float32' || w.quantization !== undefined) throw bad(`weight ${w.name} is ${w.dtype ?? 'float32'}${w.quantization ? ', quantized' : ''}; only float32 weights train`);
      const size = w.shape.reduce((a, b) => a * b, 1);
      if (at + size * 4 > all.length) throw bad(`the shards end before weight ${w.name}`);
      // A copy: aligned, and independent of the file buffer.
      parts.push(new Float32Array(all.buffer.slice(all.byteOffset + at, all.byteOffset + at + size * 4)));
      specs.push({ name: w.name, shape: w.shape.slice(), size });
      at += size * 4;
    }
  }
  const flat = new Float32Array(specs.reduce((a, s) => a + s.size, 0));
  let at = 0;
  for (const p of parts) {
    flat.set(p, at);
    at += p.length;
  }
  return { modelJson, specs, flat };
}

/** The specs that travel in updates: all but the personal layers' (a weight `layer/...` belongs to `layer`). */
export function sharedSpecs(specs: readonly WeightSpec[], personalLayers: readonly string[]): { specs: WeightSpec[]; offsets: number[] } {
  const out: WeightSpec[] = [];
  const offsets: number[] = [];
  let at = 0;
  for (const s of specs) {
    if (!personalLayers.some((l) => s.name.startsWith(`${l}/`))) {
      out.push(s);
      offsets.push(at);
    }
    at += s.size;
  }
  return { specs: out, offsets };
}

/** model.json and weights.bin of a model with the base's topology and `flat` as its weights. */
export function writeModelWeights(base: ModelWeights, flat: Float32Array): { modelJson: Buffer; weightsBin: Buffer } {
  const weights = base.specs.map((s) => ({ name: s.name, shape: s.shape, dtype: 'float32' }));
  const json = { ...base.modelJson, weightsManifest: [{ paths: ['weights.bin'], weights }] };
  return { modelJson: Buffer.from(JSON.stringify(json)), weightsBin: Buffer.from(flat.buffer, flat.byteOffset, flat.byteLength) };
}
