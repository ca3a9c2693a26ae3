import { EdgefleetError, isEdgefleetError, modelRef, type Manifest, type TensorSpec } from '../../proto/index.js';
import { loadOnnx } from './onnx.js';
import { tensorFromJson, validateInputs, withinTolerance } from './tensor.js';
import { loadTfjs } from './tfjs.js';
import type { LoadedModel, TensorMap } from './types.js';

/**
 * Loads a verified model directory into the runtime its manifest names. Whatever goes wrong
 * (missing file, corrupt graph, a signature the file does not have) comes out as EF_RUNTIME_FAILED
 * with the runtime's own error as the cause.
 */
export async function loadModel(manifest: Manifest, dir: string): Promise<LoadedModel> {
  try {
    return manifest.runtime === 'onnx' ? await loadOnnx(manifest, dir) : await loadTfjs(manifest, dir);
  } catch (err) {
    const why = isEdgefleetError(err) ? `${err.code}: ${err.message}` : err instanceof Error ? err.message : String(err);
    throw new EdgefleetError('EF_RUNTIME_FAILED', `loading ${modelRef(manifest.name, manifest.version)} (${manifest.runtime}): ${why}`, { cause: err });
  }
}

export interface GoldenResult {
  /** Index into manifest.golden.vectors. */
  vector: number;
  output: string;
  ok: boolean;
  maxAbsErr: number;
  /** First element out of tolerance, -1 when none. */
  index: number;
}

export interface GoldenFailure {
  vector: number;
  /** Null when the vector failed as a whole (its inputs are invalid, or the run threw). */
  output: string | null;
  message: string;
}

export interface GoldenReport {
  ok: boolean;
  results: GoldenResult[];
  failures: GoldenFailure[];
}

function goldenInputs(specs: readonly TensorSpec[], inputs: Manifest['golden']['vectors'][number]['inputs']): TensorMap {
  const out: TensorMap = {};
  for (const [name, value] of Object.entries(inputs)) {
    const spec = specs.find((s) => s.name === name);
    if (!spec) throw new EdgefleetError('EF_INFER_INVALID', `${name}: the model has no input of this name`, { details: { field: name } });
    out[name] = tensorFromJson(spec.dtype, value, name);
  }
  validateInputs(specs, out);
  return out;
}

/**
 * Runs the manifest's golden vectors and compares each output element by element:
 * |actual - expected| <= abs + rel * |expected|. NaN where a number was expected fails. Never
 * throws for the model's sake: a vector that cannot even run is a failure in the report.
 */
export async function runGolden(model: LoadedModel, manifest: Manifest = model.manifest): Promise<GoldenReport> {
  const { tolerance, vectors } = manifest.golden;
  const results: GoldenResult[] = [];
  const failures: GoldenFailure[] = [];
  for (let v = 0; v < vectors.length; v++) {
    const vector = vectors[v]!;
    let outputs: TensorMap;
    try {
      outputs = await model.run(goldenInputs(manifest.inputs, vector.inputs));
    } catch (err) {
      failures.push({ vector: v, output: null, message: err instanceof Error ? err.message : String(err) });
      continue;
    }
    for (const [name, expected] of Object.entries(vector.outputs)) {
      const actual = outputs[name];
      if (!actual) {
        results.push({ vector: v, output: name, ok: false, maxAbsErr: Infinity, index: -1 });
        failures.push({ vector: v, output: name, message: `the model returned no output ${name}` });
        continue;
      }
      const r = withinTolerance(actual, expected, tolerance);
      results.push({ vector: v, output: name, ...r });
      if (r.ok) continue;
      const message =
        r.index < 0
          ? `shape [${actual.shape.join(',')}], expected [${expected.shape.join(',')}]`
          : `element ${r.index} is ${Number(actual.data[r.index])}, expected ${expected.data[r.index]} (abs ${tolerance.abs}, rel ${tolerance.rel}); max abs error ${r.maxAbsErr}`;
      failures.push({ vector: v, output: name, message });
    }
  }
  return { ok: failures.length === 0, results, failures };
}
