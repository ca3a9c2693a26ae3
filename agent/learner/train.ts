import type * as Tfjs from '@tensorflow/tfjs';
import { EdgefleetError, type Manifest, type TrainSpec, type TrainingSpec } from '../../proto/index.js';
import { loadTf, type Tf } from '../runtime/backends.js';
import { featureSize, type SampleSet } from './samples.js';

/**
 * Local training of a TF.js layers model, for any model whose manifest has a `training` section:
 * the device's own labelled samples, the round's epochs, batch size, learning rate and optional
 * proximal term, checked between steps for a reason to stop. Autodiff does the backward pass
 * (agent/runtime/backends.ts makes the WASM backend's products fast enough for it).
 */

export type StopReason = 'deadline' | 'cpu' | 'temperature' | 'battery';

/** Where a layers model's training input and output sit, by position (the manifest may rename them). */
export interface TrainingPlan {
  training: TrainingSpec;
  outputIndex: number;
}

/** The manifest's training section resolved against its signature, or EF_TRAINING_FAILED saying why not. */
export function trainingPlan(manifest: Manifest): TrainingPlan {
  const training = manifest.training;
  if (!training) throw new EdgefleetError('EF_TRAINING_FAILED', `${manifest.name}@${manifest.version} has no training section in its manifest`);
  if (manifest.runtime !== 'tfjs-layers') throw new EdgefleetError('EF_TRAINING_FAILED', `${manifest.name} is a ${manifest.runtime} model; only tfjs-layers models train`);
  if (manifest.inputs.length !== 1) throw new EdgefleetError('EF_TRAINING_FAILED', `${manifest.name} has ${manifest.inputs.length} inputs; training feeds exactly one`);
  const outputIndex = training.output === undefined ? 0 : manifest.outputs.findIndex((o) => o.name === training.output);
  if (outputIndex < 0) throw new EdgefleetError('EF_TRAINING_FAILED', `${manifest.name} has no output ${training.output}`);
  return { training, outputIndex };
}

export interface LocalTrainOptions {
  spec: Pick<TrainSpec, 'epochs' | 'batchSize' | 'learningRate' | 'optimizer' | 'proximalMu'>;
  plan: TrainingPlan;
  /** Orders the rows of each epoch. */
  random: () => number;
  /** Asked before every step; a reason ends training there (the steps taken so far stand). */
  shouldStop?: () => StopReason | null;
}

export interface TrainOutcome {
  steps: number;
  stoppedBy: 'done' | StopReason;
  trainMs: number;
  /** Mean training loss of each epoch that finished. */
  epochLoss: number[];
}

export interface EvalResult {
  loss: number;
  /** Share of rows whose argmax is the label; null for a squared-error model. */
  accuracy: number | null;
}

function pick(out: Tfjs.Tensor | Tfjs.Tensor[], index: number): Tfjs.Tensor {
  return Array.isArray(out) ? out[index]! : out;
}

/** Per-row losses, shape [n]. */
function rowLoss(tf: Tf, plan: TrainingPlan, out: Tfjs.Tensor, labels: Tfjs.Tensor): Tfjs.Tensor1D {
  const { loss, outputKind } = plan.training;
  if (loss === 'mean-squared-error') return tf.mean(tf.square(tf.sub(out.reshape([out.shape[0], -1]), labels)), 1);
  const classes = out.shape.at(-1)!;
  const onehot = tf.oneHot(labels.toInt(), classes);
  const logp = outputKind === 'logits' ? tf.logSoftmax(out) : tf.log(tf.clipByValue(out, 1e-7, 1));
  return tf.neg(tf.sum(tf.mul(onehot, logp), -1));
}

function tensors(tf: Tf, set: SampleSet): { x: Tfjs.Tensor; y: Tfjs.Tensor } {
  const x = tf.tensor(set.x, [set.count, ...set.featureShape], 'float32');
  const y = set.y instanceof Int32Array ? tf.tensor1d(set.y, 'int32') : tf.tensor2d(set.y, [set.count, set.labelWidth], 'float32');
  return { x, y };
}

function checkSet(model: Tfjs.LayersModel, set: SampleSet): void {
  const want = model.inputs[0]!.shape.slice(1);
  const ok = want.length === set.featureShape.length && want.every((d, i) => d === null || d === -1 || d === set.featureShape[i]);
  if (!ok) throw new EdgefleetError('EF_TRAINING_FAILED', `samples are [${set.featureShape.join(',')}], the model takes [${want.join(',')}]`);
  if (set.x.length !== set.count * featureSize(set.featureShape)) throw new EdgefleetError('EF_TRAINING_FAILED', 'sample features do not match their count');
}

/** Loss and accuracy over a set, in batches, without training. An empty set gives loss 0 and accuracy null. */
export async function evaluate(model: Tfjs.LayersModel, set: SampleSet, plan: TrainingPlan, batchSize = 256): Promise<EvalResult> {
  if (set.count === 0) return { loss: 0, accuracy: null };
  checkSet(model, set);
  const { tf } = await loadTf();
  const { x, y } = tensors(tf, set);
  let lossSum = 0;
  let right = 0;
  const classify = plan.training.loss === 'sparse-categorical-crossentropy';
  try {
    for (let s = 0; s < set.count; s += batchSize) {
      const n = Math.min(batchSize, set.count - s);
      const [l, hits] = tf.tidy(() => {
        const xb = x.slice(s, n);
        const yb = y.slice(s, n);
        const out = pick(model.predict(xb), plan.outputIndex);
        const sum = tf.sum(rowLoss(tf, plan, out, yb));
        const hit = classify ? tf.sum(tf.equal(tf.argMax(out, -1), yb.toInt()).toInt()) : tf.scalar(0);
        return [sum, hit];
      });
      lossSum += (await l.data())[0]!;
      right += (await hits.data())[0]!;
      tf.dispose([l, hits]);
    }
  } finally {
    tf.dispose([x, y]);
  }
  return { loss: lossSum / set.count, accuracy: classify ? right / set.count : null };
}

/** The model's trainable variables, in the order of model.trainableWeights. */
function trainableVariables(model: Tfjs.LayersModel): Tfjs.Variable[] {
  // LayerVariable.read() hands out the tf.Variable itself, which optimizers update in place.
  return model.trainableWeights.map((w) => w.read() as Tfjs.Variable);
}

/**
 * Trains `model` in place. Rows are shuffled per epoch with `opts.random`; the last batch of an
 * epoch may be short. Between steps the event loop gets a turn, so a stop request (IPC, a timer)
 * is seen within one step.
 */
export async function trainLocally(model: Tfjs.LayersModel, set: SampleSet, opts: LocalTrainOptions): Promise<TrainOutcome> {
  const { tf } = await loadTf();
  const { spec, plan } = opts;
  const start = performance.now();
  if (set.count === 0) return { steps: 0, stoppedBy: 'done', trainMs: 0, epochLoss: [] };
  checkSet(model, set);
  const vars = trainableVariables(model);
  const anchors = spec.proximalMu > 0 ? vars.map((v) => tf.clone(v)) : [];
  const optimizer = spec.optimizer === 'adam' ? tf.train.adam(spec.learningRate) : tf.train.sgd(spec.learningRate);
  const { x, y } = tensors(tf, set);
  const order = new Int32Array(set.count);
  const epochLoss: number[] = [];
  let steps = 0;
  try {
    for (let epoch = 0; epoch < spec.epochs; epoch++) {
      shuffle(order, opts.random);
      let sum = 0;
      for (let s = 0; s < set.count; s += spec.batchSize) {
        const reason = opts.shouldStop?.() ?? null;
        if (reason) return { steps, stoppedBy: reason, trainMs: performance.now() - start, epochLoss };
        const n = Math.min(spec.batchSize, set.count - s);
        const idx = tf.tensor1d(order.subarray(s, s + n), 'int32');
        const loss = optimizer.minimize(
          () =>
            tf.tidy(() => {
              const out = pick(model.apply(tf.gather(x, idx), { training: true }) as Tfjs.Tensor | Tfjs.Tensor[], plan.outputIndex);
              const data = tf.mean(rowLoss(tf, plan, out, tf.gather(y, idx)));
              if (anchors.length === 0) return data as Tfjs.Scalar;
              // FedProx: μ/2 · ‖w − w_base‖² over every trainable weight.
              const prox = tf.addN(vars.map((v, i) => tf.sum(tf.square(tf.sub(v, anchors[i]!)))));
              return tf.add<Tfjs.Scalar>(data, tf.mul(prox, spec.proximalMu / 2));
            }),
          true,
          vars,
        );
        idx.dispose();
        steps++;
        if (loss) {
          sum += (await loss.data())[0]! * n;
          loss.dispose();
        }
        await new Promise<void>((r) => setImmediate(r));
      }
      epochLoss.push(sum / set.count);
    }
    return { steps, stoppedBy: 'done', trainMs: performance.now() - start, epochLoss };
  } catch (err) {
    throw new EdgefleetError('EF_TRAINING_FAILED', `training failed: ${(err as Error).message}`, { cause: err });
  } finally {
    // Adam's moment estimates are tensors too.
    optimizer.dispose();
    tf.dispose([x, y, ...anchors]);
  }
}

function shuffle(order: Int32Array, random: () => number): void {
  for (let i = 0; i < order.length; i++) order[i] = i;
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const t = order[i]!;
    order[i] = order[j]!;
    order[j] = t;
  }
}
