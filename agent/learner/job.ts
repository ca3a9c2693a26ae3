import type * as Tfjs from '@tensorflow/tfjs';
import { EdgefleetError, type BundleTensor, type EvalMetrics, type Manifest, type TrainSpec, type UpdateMeta } from '../../proto/index.js';
import { cryptoUniform, mulberry32 } from '../../common/random.js';
import { loadTf } from '../runtime/backends.js';
import { dirLoadHandler, disposeTfModel } from '../runtime/tfjs.js';
import { splitHoldout, type SampleSet } from './samples.js';
import { evaluate, trainLocally, trainingPlan, type StopReason } from './train.js';
import { WEIGHTS_MISMATCH, packUpdate, readWeights, weightDelta, writeWeights, type NamedWeight } from './update.js';

/**
 * One round's work on a device, start to finish: load the base version, put the device's personal
 * layers back, split the samples, measure, train, measure again, and pack the update. It runs in
 * the training child (child-main.ts); it is a plain function so tests and scripts run it in-process.
 */

export interface TrainJob {
  manifest: Manifest;
  /** The base version's files. */
  dir: string;
  samples: SampleSet;
  /** A stable id per sample (its row id in the store): decides the holdout split. */
  keys: Int32Array;
  spec: TrainSpec;
  roundId: number;
  baseManifestSha256: string;
  /** ms since the epoch; training stops at the first step after it. */
  deadlineAt: number;
  /** Orders the batches. Noise and quantization draw from the OS's CSPRNG instead. */
  seed: number;
  /** The device's personal layers, carried over from its earlier version. */
  personal?: Pick<NamedWeight, 'name' | 'data'>[];
}

export interface TrainJobResult {
  bytes: Uint8Array;
  meta: UpdateMeta;
  /** The personal layers' weights after training: they stay on the device. */
  personal: NamedWeight[];
}

export interface JobHooks {
  /** Asked before every step, after the deadline check. */
  shouldStop?: () => StopReason | null;
  onStep?: (steps: number) => void;
  clock?: () => number;
}

export async function loadLayersModel(manifest: Manifest, dir: string): Promise<Tfjs.LayersModel> {
  const { tf } = await loadTf();
  return tf.loadLayersModel(dirLoadHandler(tf, dir, manifest.entry));
}

export async function runTrainJob(job: TrainJob, hooks: JobHooks = {}): Promise<TrainJobResult> {
  const plan = trainingPlan(job.manifest);
  const clock = hooks.clock ?? Date.now;
  const { tf } = await loadTf();
  const model = await loadLayersModel(job.manifest, job.dir);
  try {
    const personalLayers = new Set(plan.training.personalLayers);
    const unknown = [...personalLayers].filter((l) => !model.layers.some((x) => x.name === l));
    if (unknown.length > 0) throw new EdgefleetError('EF_TRAINING_FAILED', `personal layers ${unknown.join(', ')} are not in the model`);
    if (job.personal?.length) writeWeights(tf, model, job.personal);
    // The base the difference is taken from: the global weights, with the device's personal layers
    // in place (those never leave, so their difference does not matter).
    const start = readWeights(model);
    const { train, holdout } = splitHoldout(job.samples, job.keys, job.spec.holdoutShare);
    if (train.count === 0) throw new EdgefleetError('EF_TRAINING_FAILED', 'no samples left to train on after the holdout split');
    const before = await evaluate(model, holdout, plan);
    const lossBefore = holdout.count > 0 ? before.loss : (await evaluate(model, train, plan)).loss;
    let steps = 0;
    const outcome = await trainLocally(model, train, {
      spec: job.spec,
      plan,
      random: mulberry32(job.seed),
      shouldStop: () => {
        if (clock() >= job.deadlineAt) return 'deadline';
        const r = hooks.shouldStop?.() ?? null;
        if (!r) hooks.onStep?.(steps++);
        return r;
      },
    });
    if (outcome.steps === 0) throw new EdgefleetError('EF_TRAINING_FAILED', `stopped by ${outcome.stoppedBy} before the first step`);
    const after = await evaluate(model, holdout, plan);
    const lossAfter = holdout.count > 0 ? after.loss : (await evaluate(model, train, plan)).loss;
    const trained = readWeights(model);
    const delta = weightDelta(trained, start, plan.training.personalLayers);
    const { bytes, meta } = packUpdate(delta, {
      meta: {
        roundId: job.roundId,
        baseManifestSha256: job.baseManifestSha256,
        sampleCount: train.count,
        metrics: { lossBefore, lossAfter, accuracyBefore: before.accuracy, accuracyAfter: after.accuracy, holdoutCount: holdout.count },
        steps: outcome.steps,
        stoppedBy: outcome.stoppedBy,
        trainMs: Math.round(outcome.trainMs),
      },
      clipNorm: job.spec.clipNorm,
      localNoiseMultiplier: job.spec.localNoiseMultiplier,
      encoding: job.spec.encoding,
      random: cryptoUniform(),
    });
    return { bytes, meta, personal: trained.filter((w) => personalLayers.has(w.layer)) };
  } finally {
    disposeTfModel(model);
  }
}

/** Federated evaluation: the base and the round's candidate (base + difference) measured on the device's holdout. */
export interface EvalJob {
  manifest: Manifest;
  dir: string;
  samples: SampleSet;
  keys: Int32Array;
  holdoutShare: number;
  /** The candidate as candidate − base, for the weights that travel (a round's candidate)... */
  difference?: BundleTensor[];
  /** ...or as weights that replace the base's (a device's personal layers). */
  replace?: Pick<NamedWeight, 'name' | 'data'>[];
  personal?: Pick<NamedWeight, 'name' | 'data'>[];
}

export async function runEvalJob(job: EvalJob): Promise<EvalMetrics> {
  const plan = trainingPlan(job.manifest);
  const { tf } = await loadTf();
  const model = await loadLayersModel(job.manifest, job.dir);
  try {
    if (job.personal?.length) writeWeights(tf, model, job.personal);
    const { holdout } = splitHoldout(job.samples, job.keys, job.holdoutShare);
    if (holdout.count === 0) throw new EdgefleetError('EF_TRAINING_FAILED', 'no holdout samples to evaluate on');
    const before = await evaluate(model, holdout, plan);
    const current = new Map(readWeights(model).map((w) => [w.name, w]));
    const moved = job.replace ?? (job.difference ?? []).map((d) => {
      const w = current.get(d.name);
      if (!w || w.data.length !== d.data.length) throw new EdgefleetError('EF_TRAINING_FAILED', `the candidate's ${d.name} does not fit the base`, { details: WEIGHTS_MISMATCH });
      const data = new Float32Array(w.data.length);
      for (let i = 0; i < data.length; i++) data[i] = w.data[i]! + d.data[i]!;
      return { name: d.name, data };
    });
    writeWeights(tf, model, moved);
    const after = await evaluate(model, holdout, plan);
    return { holdoutCount: holdout.count, baseLoss: before.loss, baseAccuracy: before.accuracy, candidateLoss: after.loss, candidateAccuracy: after.accuracy };
  } finally {
    disposeTfModel(model);
  }
}
