import type * as Tfjs from '@tensorflow/tfjs';
import { decodeBundle, encodeBundle, type ServerOptimizerSpec, type StrategySpec, type TrainSpec, type UpdateMeta } from '../../proto/index.js';
import { loadTf } from '../../agent/runtime/backends.js';
import { pickRows, splitHoldout, type SampleSet } from '../../agent/learner/samples.js';
import { evaluate, trainLocally, type TrainingPlan } from '../../agent/learner/train.js';
import { l2Norm, packUpdate, readWeights, weightDelta, writeWeights, type NamedWeight } from '../../agent/learner/update.js';
import { mulberry32 } from '../../common/random.js';
import { strategyFor } from '../../fleet-server/federated/strategy.js';
import { serverStep, type ServerState } from '../../fleet-server/federated/server-opt.js';

/**
 * Federated rounds in one process, with the real parts on both sides: each simulated client runs
 * the agent's training, delta, clipping and bundle code on its own shard; the "fleet" decodes the
 * bundles and folds them with the fleet's strategies and server optimizer. What is simulated is
 * only the transport and the scheduling.
 */

export interface SimClient {
  id: number;
  train: SampleSet;
  holdout: SampleSet;
  /** Sends the sign-flipped update, scaled up to the round's norm bound (the most the fleet lets through). */
  malicious: boolean;
}

/** Splits a client's rows into its training split and local holdout, keyed by row id so the split is stable. */
export function makeClient(id: number, all: SampleSet, rows: number[], holdoutShare: number, malicious = false): SimClient {
  const mine = pickRows(all, rows);
  const { train, holdout } = splitHoldout(mine, rows, holdoutShare);
  return { id, train, holdout, malicious };
}

export interface FederatedConfig {
  rounds: number;
  /** Clients per round, drawn uniformly without replacement each round. */
  perRound: number;
  spec: TrainSpec;
  strategy: StrategySpec;
  /** Default plain FedAvg (sgd, learning rate 1, no momentum). */
  serverOptimizer?: ServerOptimizerSpec;
  seed: number;
  /** Called after each round with the global model loaded. */
  onRound?: (round: number, info: RoundInfo) => Promise<void> | void;
}

export interface RoundInfo {
  updates: number;
  rejected: number;
  meanNormBeforeClip: number;
  /** Mean relative error 8-bit updates carried (‖q(x) − x‖ / ‖x‖, as the devices report it); null for float32 updates. */
  meanQuantizationError: number | null;
  meanAccuracyBefore: number;
  meanAccuracyAfter: number;
}

/** The flat parameter vector of the weights that travel, in layout order. */
function flatten(tensors: readonly { data: Float32Array }[], size: number): Float32Array {
  const out = new Float32Array(size);
  let at = 0;
  for (const t of tensors) {
    out.set(t.data, at);
    at += t.data.length;
  }
  return out;
}

function unflatten(flat: Float32Array, like: readonly NamedWeight[]): NamedWeight[] {
  let at = 0;
  return like.map((w) => {
    const data = flat.slice(at, at + w.data.length);
    at += w.data.length;
    return { ...w, data };
  });
}

/**
 * Runs `rounds` rounds from the model's current weights, leaving the final global weights in it.
 * Returns per-round facts.
 */
export async function runFederated(model: Tfjs.LayersModel, plan: TrainingPlan, clients: SimClient[], cfg: FederatedConfig): Promise<RoundInfo[]> {
  const { tf } = await loadTf();
  const rand = mulberry32(cfg.seed);
  let global = readWeights(model);
  const size = global.reduce((a, w) => a + w.data.length, 0);
  const names = global.map((w) => w.name);
  const strategy = strategyFor(cfg.strategy, { random: mulberry32(cfg.seed ^ 0x5eed) });
  let serverState: ServerState | null = null;
  const infos: RoundInfo[] = [];
  for (let round = 1; round <= cfg.rounds; round++) {
    const chosen = sample(clients, cfg.perRound, rand);
    const fold = strategy.begin(size);
    let rejected = 0;
    let normSum = 0;
    let quantSum = 0;
    let quantN = 0;
    let accBefore = 0;
    let accAfter = 0;
    for (const c of chosen) {
      writeWeights(tf, model, global);
      const before = await evaluate(model, c.holdout, plan);
      const outcome = await trainLocally(model, c.train, { spec: cfg.spec, plan, random: mulberry32(cfg.seed * 7919 + round * 104_729 + c.id) });
      const after = await evaluate(model, c.holdout, plan);
      const delta = weightDelta(readWeights(model), global);
      const meta = {
        roundId: round,
        baseManifestSha256: '0'.repeat(64),
        sampleCount: c.train.count,
        metrics: { lossBefore: before.loss, lossAfter: after.loss, accuracyBefore: before.accuracy, accuracyAfter: after.accuracy, holdoutCount: c.holdout.count },
        steps: outcome.steps,
        stoppedBy: outcome.stoppedBy,
        trainMs: outcome.trainMs,
      };
      let bytes: Uint8Array;
      if (c.malicious) {
        // An attacker skips the device's clipping and sends −δ at exactly the norm the fleet accepts.
        const k = -cfg.spec.clipNorm / Math.max(l2Norm(delta), 1e-12);
        for (const t of delta) for (let i = 0; i < t.data.length; i++) t.data[i]! *= k;
        const full: UpdateMeta = { kind: 'fl-update', ...meta, normBeforeClip: cfg.spec.clipNorm, clipped: false, localNoiseStd: 0 };
        bytes = encodeBundle({ tensors: delta, meta: full });
      } else {
        bytes = packUpdate(delta, { meta, clipNorm: cfg.spec.clipNorm, localNoiseMultiplier: cfg.spec.localNoiseMultiplier, encoding: cfg.spec.encoding, random: rand }).bytes;
      }
      // The fleet's side: decode, check names and the norm bound, fold.
      const bundle = decodeBundle(bytes);
      const m = bundle.meta as UpdateMeta;
      const sameNames = bundle.tensors.length === names.length && bundle.tensors.every((t, i) => t.name === names[i]);
      const norm = l2Norm(bundle.tensors);
      // q8 rounding can move the norm by a little; the slack is the fleet's too.
      if (!sameNames || norm > cfg.spec.clipNorm * 1.01) {
        rejected++;
        continue;
      }
      fold.add({ delta: flatten(bundle.tensors, size), samples: m.sampleCount });
      normSum += m.normBeforeClip;
      if (m.quantizationError !== undefined) {
        quantSum += m.quantizationError;
        quantN++;
      }
      accBefore += before.accuracy ?? 0;
      accAfter += after.accuracy ?? 0;
    }
    const n = chosen.length - rejected;
    const result = fold.finish();
    const step = serverStep(cfg.serverOptimizer ?? { name: 'sgd', learningRate: 1, momentum: 0 }, flatten(global, size), result.delta, serverState);
    serverState = step.state;
    global = unflatten(step.weights, global);
    writeWeights(tf, model, global);
    const info = { updates: n, rejected, meanNormBeforeClip: normSum / n, meanQuantizationError: quantN ? quantSum / quantN : null, meanAccuracyBefore: accBefore / n, meanAccuracyAfter: accAfter / n };
    infos.push(info);
    await cfg.onRound?.(round, info);
  }
  return infos;
}

function sample<T>(items: readonly T[], k: number, rand: () => number): T[] {
  const a = items.slice();
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a.slice(0, Math.min(k, a.length));
}
