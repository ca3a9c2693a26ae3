import { join } from 'node:path';
import type * as Ort from 'onnxruntime-node';
import { DTYPES, EdgefleetError, type Dtype, type Manifest, type TensorSpec } from '../../proto/index.js';
import type { LoadedModel, Tensor, TensorMap } from './types.js';

/**
 * ONNX models through onnxruntime-node. Tensors cross in both directions without copying: an
 * ort.Tensor wraps the caller's typed array, and the output's typed array is handed back as is.
 */

let ortModule: Promise<typeof Ort> | null = null;

/** Imported on first use, so an agent that serves only TF.js models never loads the native library. */
function ort(): Promise<typeof Ort> {
  ortModule ??= import('onnxruntime-node');
  return ortModule;
}

export interface ModelSignature {
  inputs: TensorSpec[];
  outputs: TensorSpec[];
}

function asDtype(type: string): Dtype | null {
  return (DTYPES as readonly string[]).includes(type) ? (type as Dtype) : null;
}

/**
 * The signature an ONNX file declares. Symbolic dimensions (`batch`) become -1. ONNX Runtime
 * reports an unknown shape and a scalar alike as `[]`; both come out as a scalar.
 */
function signatureOf(session: Ort.InferenceSession): ModelSignature {
  const spec = (m: Ort.InferenceSession.ValueMetadata): TensorSpec => {
    if (!m.isTensor) throw new EdgefleetError('EF_MODEL_INVALID', `ONNX value ${m.name} is not a tensor; only tensors are supported`);
    const dtype = asDtype(m.type);
    if (dtype === null) throw new EdgefleetError('EF_MODEL_INVALID', `ONNX value ${m.name} has element type ${m.type}, which edgefleet does not carry`);
    return { name: m.name, dtype, shape: m.shape.map((d) => (typeof d === 'number' && d >= 0 ? d : -1)) };
  };
  return { inputs: session.inputMetadata.map(spec), outputs: session.outputMetadata.map(spec) };
}

/** Reads an .onnx file's inputs and outputs, so publishing can derive the manifest's signature. */
export async function describeOnnx(path: string): Promise<ModelSignature> {
  const session = await (await ort()).InferenceSession.create(path);
  try {
    return signatureOf(session);
  } finally {
    await session.release();
  }
}

/**
 * Refuses a manifest whose signature names tensors the file does not have, or gives them another
 * dtype: better at load than as a runtime error on the first request.
 */
function checkSignature(manifest: Manifest, actual: ModelSignature): void {
  for (const side of ['inputs', 'outputs'] as const) {
    for (const s of manifest[side]) {
      const a = actual[side].find((x) => x.name === s.name);
      if (!a) throw new EdgefleetError('EF_MODEL_INVALID', `the manifest names ${side.slice(0, -1)} ${s.name}; the ONNX file has ${actual[side].map((x) => x.name).join(', ')}`);
      if (a.dtype !== s.dtype) throw new EdgefleetError('EF_MODEL_INVALID', `${side.slice(0, -1)} ${s.name} is ${a.dtype} in the ONNX file, ${s.dtype} in the manifest`);
    }
  }
  const required = actual.inputs.filter((a) => !manifest.inputs.some((s) => s.name === a.name));
  if (required.length > 0) throw new EdgefleetError('EF_MODEL_INVALID', `the ONNX file takes inputs the manifest does not name: ${required.map((a) => a.name).join(', ')}`);
}

export async function loadOnnx(manifest: Manifest, dir: string): Promise<LoadedModel> {
  const rt = await ort();
  const session = await rt.InferenceSession.create(join(dir, manifest.entry));
  try {
    checkSignature(manifest, signatureOf(session));
  } catch (err) {
    await session.release();
    throw err;
  }
  const outputNames = manifest.outputs.map((o) => o.name);
  const wanted = new Map(manifest.outputs.map((o) => [o.name, o.dtype]));
  let released = false;
  return {
    manifest,
    backend: 'onnxruntime-node',
    async run(inputs: TensorMap): Promise<TensorMap> {
      let results: Ort.InferenceSession.ReturnType;
      try {
        const feeds: Record<string, Ort.Tensor> = {};
        for (const name in inputs) {
          const t = inputs[name]!;
          feeds[name] = new rt.Tensor(t.dtype, t.data, t.shape);
        }
        results = await session.run(feeds, outputNames);
      } catch (err) {
        throw new EdgefleetError('EF_RUNTIME_FAILED', `onnxruntime: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
      const out: TensorMap = {};
      for (const name of outputNames) {
        const r = results[name];
        if (!r) throw new EdgefleetError('EF_RUNTIME_FAILED', `onnxruntime returned no ${name}`);
        const dtype = wanted.get(name)!;
        if (r.type !== dtype) throw new EdgefleetError('EF_RUNTIME_FAILED', `onnxruntime returned ${name} as ${r.type}, the manifest says ${dtype}`);
        out[name] = { dtype, shape: r.dims.slice(), data: r.data as Tensor['data'] };
      }
      return out;
    },
    async dispose(): Promise<void> {
      if (released) return;
      released = true;
      await session.release();
    },
  };
}
