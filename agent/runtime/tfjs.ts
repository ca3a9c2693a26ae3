import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve, sep } from 'node:path';
import type * as Tfjs from '@tensorflow/tfjs';
import { EdgefleetError, isEdgefleetError, type Dtype, type Manifest, type ModelRuntime, type TensorSpec } from '../../proto/index.js';
import { loadTf, type Tf } from './backends.js';
import type { ModelSignature } from './onnx.js';
import { allocTensorData } from './tensor.js';
import type { LoadedModel, Tensor, TensorMap } from './types.js';

/**
 * TensorFlow.js models (layers and graph) from a directory on disk. Nothing goes to the network:
 * model.json and its weight shards are read through an IOHandler of our own, because tf's
 * `file://` loader exists only in tfjs-node, and its http loader would fetch.
 */

type TfModel = Tfjs.LayersModel | Tfjs.GraphModel;
/** What GraphModel.inputs/outputs hold (tfjs-converter's TensorInfo, not tfjs-core's). */
type GraphTensorInfo = Tfjs.GraphModel['inputs'][number];

/** `rel` inside `dir`, or an error: a weightsManifest path is outside input like any other. */
function inside(dir: string, rel: string): string {
  const root = resolve(dir);
  const p = resolve(root, rel);
  if (isAbsolute(rel) || !p.startsWith(root + sep)) throw new EdgefleetError('EF_MODEL_INVALID', `weight path ${rel} leaves the model directory`);
  return p;
}

/** Loads model.json (`entry`, relative to `dir`) and the weight files its weightsManifest names, relative to model.json. */
export function dirLoadHandler(tf: Tf, dir: string, entry = 'model.json'): Tfjs.io.IOHandler {
  const jsonPath = inside(dir, entry);
  return {
    async load(): Promise<Tfjs.io.ModelArtifacts> {
      const json = JSON.parse(await readFile(jsonPath, 'utf8')) as Tfjs.io.ModelJSON;
      if (typeof json !== 'object' || json === null || json.modelTopology === undefined) {
        throw new EdgefleetError('EF_MODEL_INVALID', `${entry} is not a TF.js model.json (no modelTopology)`);
      }
      return tf.io.getModelArtifactsForJSON(json, async (manifest) => {
        const specs: Tfjs.io.WeightsManifestEntry[] = [];
        const shards: ArrayBuffer[] = [];
        for (const group of manifest) {
          for (const path of group.paths) {
            const buf = await readFile(inside(dirname(jsonPath), path));
            shards.push(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
          }
          specs.push(...group.weights);
        }
        return [specs, shards];
      });
    },
  };
}

async function loadFromDir(runtime: ModelRuntime, dir: string, entry: string): Promise<{ tf: Tf; backend: string; model: TfModel }> {
  const { tf, backend } = await loadTf();
  const handler = dirLoadHandler(tf, dir, entry);
  if (runtime === 'tfjs-layers') return { tf, backend, model: await tf.loadLayersModel(handler) };
  if (runtime === 'tfjs-graph') return { tf, backend, model: await tf.loadGraphModel(handler) };
  throw new EdgefleetError('EF_MODEL_INVALID', `runtime ${runtime} is not a TF.js runtime`);
}

/**
 * Frees a model's weights. LayersModel.dispose() alone leaks a layer used more than once in the
 * graph (a shared layer): TF.js counts a reference per use and the model releases one. Every
 * weight the model holds is disposed here, whatever its layer's count.
 */
export function disposeTfModel(model: TfModel): void {
  if (!('layers' in model)) return model.dispose();
  const weights = model.weights;
  model.dispose();
  for (const w of weights) {
    try {
      w.dispose();
    } catch {
      // Already freed with its layer: the common case.
    }
  }
}

function toTf(tf: Tf, t: Tensor): Tfjs.Tensor {
  // TF.js knows float32, int32 and bool; narrower integers widen losslessly, float64 narrows.
  switch (t.dtype) {
    case 'float32':
      return tf.tensor(t.data as Float32Array, t.shape, 'float32');
    case 'int32':
      return tf.tensor(t.data as Int32Array, t.shape, 'int32');
    case 'bool':
      return tf.tensor(t.data as Uint8Array, t.shape, 'bool');
    case 'float64':
      return tf.tensor(Float32Array.from(t.data as Float64Array), t.shape, 'float32');
    case 'int8':
    case 'uint8':
    case 'int16':
      return tf.tensor(Int32Array.from(t.data as Int8Array), t.shape, 'int32');
    case 'int64': {
      // TF.js runs int64 graph inputs as int32 (its converter does the same); refuse what does not fit.
      const d = t.data as BigInt64Array;
      const out = new Int32Array(d.length);
      for (let i = 0; i < d.length; i++) {
        const x = d[i]!;
        if (x > 2147483647n || x < -2147483648n) throw new EdgefleetError('EF_RUNTIME_FAILED', `int64 value ${x} does not fit the int32 TF.js runs it as`);
        out[i] = Number(x);
      }
      return tf.tensor(out, t.shape, 'int32');
    }
  }
}

async function fromTf(t: Tfjs.Tensor, spec: TensorSpec): Promise<Tensor> {
  const data = await t.data();
  const shape = t.shape.slice();
  const tfFloat = t.dtype === 'float32';
  if ((spec.dtype === 'float32' && tfFloat) || (spec.dtype === 'int32' && t.dtype === 'int32') || (spec.dtype === 'bool' && t.dtype === 'bool')) {
    return { dtype: spec.dtype, shape, data };
  }
  const integral = spec.dtype !== 'float32' && spec.dtype !== 'float64';
  if ((integral && tfFloat) || !(data instanceof Float32Array || data instanceof Int32Array || data instanceof Uint8Array)) {
    throw new EdgefleetError('EF_RUNTIME_FAILED', `output ${spec.name} is ${t.dtype}, the manifest says ${spec.dtype}`);
  }
  const out = allocTensorData(spec.dtype, data.length);
  if (out instanceof BigInt64Array) for (let i = 0; i < data.length; i++) out[i] = BigInt(data[i]!);
  else out.set(data);
  return { dtype: spec.dtype, shape, data: out };
}

function checkLayersSignature(manifest: Manifest, model: Tfjs.LayersModel): void {
  for (const [side, specs, actual] of [['inputs', manifest.inputs, model.inputs], ['outputs', manifest.outputs, model.outputs]] as const) {
    if (specs.length !== actual.length) {
      throw new EdgefleetError('EF_MODEL_INVALID', `the layers model has ${actual.length} ${side}, the manifest names ${specs.length} (matched by position)`);
    }
    specs.forEach((s, i) => {
      const rank = actual[i]!.shape.length;
      if (s.shape.length !== rank) throw new EdgefleetError('EF_MODEL_INVALID', `${side.slice(0, -1)} ${s.name} has rank ${s.shape.length} in the manifest, ${rank} in the model`);
    });
  }
}

function checkGraphSignature(manifest: Manifest, model: Tfjs.GraphModel): void {
  // Signature keys and node names both work in execute(); `name:0` is the node's first output.
  const known = (nodes: string[], infos: GraphTensorInfo[]): Set<string> => {
    const names = new Set<string>();
    for (const n of [...nodes, ...infos.map((i) => i.name)]) names.add(n).add(n.replace(/:0$/, ''));
    return names;
  };
  const inputs = known(model.inputNodes, model.inputs);
  const outputs = known(model.outputNodes, model.outputs);
  for (const s of manifest.inputs) if (!inputs.has(s.name)) throw new EdgefleetError('EF_MODEL_INVALID', `the graph model has no input ${s.name} (it has ${model.inputNodes.join(', ')})`);
  for (const s of manifest.outputs) if (!outputs.has(s.name)) throw new EdgefleetError('EF_MODEL_INVALID', `the graph model has no output ${s.name} (it has ${model.outputNodes.join(', ')})`);
}

export async function loadTfjs(manifest: Manifest, dir: string): Promise<LoadedModel> {
  const { tf, backend, model } = await loadFromDir(manifest.runtime, dir, manifest.entry);
  try {
    if (model instanceof tf.LayersModel) checkLayersSignature(manifest, model);
    else checkGraphSignature(manifest, model);
  } catch (err) {
    disposeTfModel(model);
    throw err;
  }
  const outputNames = manifest.outputs.map((o) => o.name);
  // A graph with control flow or dynamic shapes runs only through executeAsync; learnt on the first request.
  let graphAsync = false;

  const execute = async (xs: Tfjs.Tensor[]): Promise<Tfjs.Tensor[]> => {
    if (model instanceof tf.LayersModel) {
      const y = model.predict(xs.length === 1 ? xs[0]! : xs);
      return Array.isArray(y) ? y : [y];
    }
    const named: Tfjs.NamedTensorMap = {};
    manifest.inputs.forEach((s, i) => (named[s.name] = xs[i]!));
    if (!graphAsync) {
      try {
        const y = model.execute(named, outputNames);
        return Array.isArray(y) ? y : [y];
      } catch (err) {
        if (!/executeAsync/.test((err as Error).message)) throw err;
        graphAsync = true;
      }
    }
    const y = await model.executeAsync(named, outputNames);
    return Array.isArray(y) ? y : [y];
  };

  let disposed = false;
  const layers = model instanceof tf.LayersModel ? model : null;
  const byName = (): Map<string, Tfjs.LayerVariable> => new Map((layers?.weights ?? []).map((w) => [w.originalName, w]));
  return {
    manifest,
    backend,
    ...(layers
      ? {
          weights: {
            read(names: readonly string[]) {
              const all = byName();
              return names.map((name) => {
                const v = all.get(name);
                if (!v) throw new EdgefleetError('EF_RUNTIME_FAILED', `the model has no weight ${name}`);
                return { name, data: Float32Array.from(v.read().dataSync() as Float32Array) };
              });
            },
            write(weights: readonly { name: string; data: Float32Array }[]) {
              const all = byName();
              // Every name and size checked before anything is written: all or nothing.
              const targets = weights.map((w) => {
                const v = all.get(w.name);
                const size = v?.shape.reduce<number>((a, b) => a * (b ?? 0), 1);
                if (!v || size !== w.data.length) throw new EdgefleetError('EF_RUNTIME_FAILED', `weight ${w.name} is not in the model, or has another size`);
                return [v, w.data] as const;
              });
              for (const [v, data] of targets) {
                const t = tf.tensor(data, v.shape as number[], 'float32');
                v.write(t);
                t.dispose();
              }
            },
          },
        }
      : {}),
    async run(inputs: TensorMap): Promise<TensorMap> {
      const xs: Tfjs.Tensor[] = [];
      let ys: Tfjs.Tensor[] = [];
      try {
        for (const s of manifest.inputs) {
          const t = inputs[s.name];
          if (!t) throw new EdgefleetError('EF_RUNTIME_FAILED', `input ${s.name} is missing`);
          xs.push(toTf(tf, t));
        }
        ys = await execute(xs);
        if (ys.length !== manifest.outputs.length) throw new EdgefleetError('EF_RUNTIME_FAILED', `the model returned ${ys.length} outputs, the manifest names ${manifest.outputs.length}`);
        const out: TensorMap = {};
        for (let i = 0; i < ys.length; i++) out[manifest.outputs[i]!.name] = await fromTf(ys[i]!, manifest.outputs[i]!);
        return out;
      } catch (err) {
        if (isEdgefleetError(err)) throw err;
        throw new EdgefleetError('EF_RUNTIME_FAILED', `TensorFlow.js: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      } finally {
        tf.dispose(xs);
        tf.dispose(ys);
      }
    },
    dispose(): Promise<void> {
      if (!disposed) {
        disposed = true;
        disposeTfModel(model);
      }
      return Promise.resolve();
    },
  };
}

const TF_DTYPES: Record<string, Dtype> = { float32: 'float32', int32: 'int32', bool: 'bool', DT_FLOAT: 'float32', DT_INT32: 'int32', DT_BOOL: 'bool', DT_INT64: 'int64' };

function tfSpec(name: string, dtype: string | undefined, shape: readonly (number | null)[] | undefined): TensorSpec {
  const d = dtype === undefined ? 'float32' : TF_DTYPES[dtype];
  if (!d) throw new EdgefleetError('EF_MODEL_INVALID', `TF.js tensor ${name} has dtype ${dtype}, which edgefleet does not carry`);
  return { name, dtype: d, shape: (shape ?? []).map((x) => (x === null || x < 0 ? -1 : x)) };
}

interface SignatureEntry {
  name?: string;
  dtype?: string;
  tensorShape?: { dim?: { size?: string | number }[]; unknownRank?: boolean };
}

/**
 * The signature of a TF.js model directory, so publishing can derive the manifest's. Layers
 * models are described by their input and output layers' names; the manifest may rename them, as
 * they are matched by position. Graph models are run by these names. A graph output whose shape
 * neither the node nor the model's signature gives comes out as a scalar: fill it in by hand.
 */
export async function describeTfjs(dir: string, runtime: ModelRuntime, entry = 'model.json'): Promise<ModelSignature> {
  const { tf, model } = await loadFromDir(runtime, dir, entry);
  try {
    if (model instanceof tf.LayersModel) {
      return {
        // Layer names (`features`, `probabilities`) read better than tensor names (`probabilities/Softmax`).
        inputs: model.inputs.map((t, i) => tfSpec(model.inputLayers[i]?.name ?? t.name, t.dtype, t.shape)),
        outputs: model.outputs.map((t, i) => tfSpec(model.outputLayers[i]?.name ?? t.name, t.dtype, t.shape)),
      };
    }
    const sig = model.modelSignature as { inputs?: Record<string, SignatureEntry>; outputs?: Record<string, SignatureEntry> };
    const fromSig = (e: SignatureEntry | undefined): (number | null)[] | undefined =>
      e?.tensorShape?.dim?.map((d) => Number(d.size ?? -1)) ?? undefined;
    const graph = (names: string[], infos: GraphTensorInfo[], sigs: Record<string, SignatureEntry> | undefined): TensorSpec[] =>
      names.map((n, i) => {
        const s = sigs?.[n];
        return tfSpec(n.replace(/:0$/, ''), infos[i]?.dtype ?? s?.dtype ?? undefined, infos[i]?.shape ?? fromSig(s));
      });
    return { inputs: graph(model.inputNodes, model.inputs, sig.inputs), outputs: graph(model.outputNodes, model.outputs, sig.outputs) };
  } finally {
    disposeTfModel(model);
  }
}

/** Writes a TF.js model directory: model.json and one weights.bin. Returns the files written, relative to `dir`. */
export async function writeTfjsModelDir(dir: string, modelJson: Omit<Tfjs.io.ModelJSON, 'weightsManifest'>, weights: { specs: Tfjs.io.WeightsManifestEntry[]; data: ArrayBuffer }): Promise<string[]> {
  await mkdir(dir, { recursive: true });
  const json: Tfjs.io.ModelJSON = { ...modelJson, weightsManifest: [{ paths: ['weights.bin'], weights: weights.specs }] };
  await writeFile(join(dir, 'weights.bin'), new Uint8Array(weights.data));
  await writeFile(join(dir, 'model.json'), JSON.stringify(json));
  return ['model.json', 'weights.bin'];
}

/** Saves a layers model as model.json + weights.bin under `dir` (created). Returns the files written. */
export async function saveLayersModelToDir(model: Tfjs.LayersModel, dir: string): Promise<string[]> {
  const { tf } = await loadTf();
  let files: string[] = [];
  await model.save(
    tf.io.withSaveHandler(async (artifacts) => {
      const data = tf.io.CompositeArrayBuffer.join(artifacts.weightData);
      const topology = artifacts.modelTopology;
      if (topology === undefined || topology instanceof ArrayBuffer) throw new EdgefleetError('EF_MODEL_INVALID', 'the layers model gave no JSON topology to save');
      const json = { modelTopology: topology, format: artifacts.format, generatedBy: artifacts.generatedBy, convertedBy: artifacts.convertedBy };
      files = await writeTfjsModelDir(dir, json, { specs: artifacts.weightSpecs ?? [], data });
      return { modelArtifactsInfo: tf.io.getModelArtifactsInfoForJSON(artifacts) };
    }),
  );
  return files;
}
