import { EdgefleetError, manifestSha256, modelRef, verifySignedManifest, type EvalMetrics, type FlUpMessage, type SignedManifest } from '../../proto/index.js';
import { ModelStore } from '../../agent/models/store.js';
import { fetchFile, fetchManifest, newFetchStats, type FetchAuth } from '../../agent/models/fetch.js';
import { Participant, type ParticipantDeps, type TrainingBase } from '../../agent/learner/participant.js';
import { runEvalJob, runTrainJob, type EvalJob, type TrainJob, type TrainJobResult } from '../../agent/learner/job.js';
import type { RunnerOptions } from '../../agent/learner/runner.js';
import { trippedGate, type GateReading } from '../../agent/learner/gates.js';
import { pickRows, type SampleSet } from '../../agent/learner/samples.js';
import type { StopReason } from '../../agent/learner/train.js';
import { silentLogger, type Logger } from '../../common/log.js';
import { dirichletLabels } from '../fl/partition.js';
import { DIGIT_CLASSES, DIGIT_PIXELS, loadDigits } from '../train-digits.js';
import { irisSamples } from '../train-iris.js';

/**
 * Federated learning for simulated devices: each holds a non-IID shard of a real dataset as its
 * labelled samples, the base version's real files (fetched once from the fleet's artifact server
 * for all of them), and the agent's own Participant (agent/learner/participant.ts), which answers
 * invitations, trains and sends updates exactly as on a device. Training runs in this process,
 * one job at a time, instead of in a child per device: a TF.js child each would not fit 50
 * devices on one machine.
 */

export const FL_DATASETS = ['digits', 'iris'] as const;
export type FlDataset = (typeof FL_DATASETS)[number];

/** What a simulated device did in a round, as the status line counts it. */
export type FlActivity = FlUpMessage['kind'] | 'update' | 'fetch-failed';

export interface SimLearningOptions {
  dataset: FlDataset;
  /** The model whose slot holds the samples; default the dataset's name. */
  model?: string;
  /** Dirichlet concentration of the label skew (scripts/fl/partition.ts); default 0.5. */
  alpha?: number;
  /** Seeds the partition; default 1. */
  seed?: number;
  /** The fleet's artifact server. */
  artifactsUrl: string;
  /** Fleet keys a manifest must be signed by (models.provisioning); empty: signatures are not checked. */
  trustedKeys?: readonly string[];
  /** Where the versions' files are kept, shared by every simulated device. */
  cacheDir: string;
  log?: Logger;
}

/** A device that never trips a gate: simulated devices have no sensors of their own. */
const QUIET: GateReading = { cpuLoad: null, temperatureC: null, battery: null };
/** Gates as the agent's defaults, except the CPU one: the simulator's own load is not the device's. */
const GATES = { maxCpuLoad: 1, maxTemperatureC: 80, minBatteryPercent: 30 };

interface Dataset {
  /** Every row, labels as class indices. */
  set: SampleSet & { y: Int32Array };
  classes: number;
}

function loadDataset(name: FlDataset): Dataset {
  if (name === 'digits') {
    const d = loadDigits({ split: 'train' });
    return { set: { x: d.xs, y: Int32Array.from(d.ys), count: d.count, featureShape: [DIGIT_PIXELS], labelWidth: 1 }, classes: DIGIT_CLASSES };
  }
  const { features, labels, classes } = irisSamples();
  return { set: { x: Float32Array.from(features.flat()), y: Int32Array.from(labels), count: labels.length, featureShape: [features[0]!.length], labelWidth: 1 }, classes: classes.length };
}

/**
 * Each device's rows (indices into the dataset, ascending), Dirichlet label-skewed. Every device
 * gets at least a third of an even share (at most 20 rows), so none is left with nothing to train on.
 */
export function partitionRows(labels: ArrayLike<number>, devices: number, alpha: number, seed: number): Int32Array[] {
  if (devices === 0) return [];
  const minRows = Math.max(1, Math.min(20, Math.floor(labels.length / devices / 3)));
  return dirichletLabels(labels, devices, alpha, seed, minRows).map((rows) => Int32Array.from(rows).sort());
}

/**
 * Versions' signed manifests and files from the fleet's artifact server, kept in the agent's own
 * store layout (blobs by sha256, a view per version) and fetched once for every simulated device,
 * with the credential of the first device that needs them. Sizes and sha256 are checked as the
 * agent checks them (fetchFile while downloading, verifyVersion for files a kept cache held).
 */
export class ModelCache {
  private readonly store: ModelStore;
  private readonly manifests = new Map<string, Promise<{ signed: SignedManifest; sha256: string }>>();
  private readonly fetching = new Map<string, Promise<TrainingBase>>();
  private readonly ready = new Map<string, TrainingBase>();

  constructor(
    dir: string,
    private readonly artifactsUrl: string,
    private readonly trustedKeys: readonly string[],
  ) {
    this.store = new ModelStore(dir);
  }

  /** The signed manifest of a version and its sha256 (what the fleet names a base by). */
  manifest(name: string, version: number, auth: { username: string; password: string }): Promise<{ signed: SignedManifest; sha256: string }> {
    return memo(this.manifests, modelRef(name, version), async () => {
      const signed = await fetchManifest(this.auth(auth), name, version);
      const m = signed.manifest;
      if (m.name !== name || m.version !== version) throw new EdgefleetError('EF_MODEL_INVALID', `asked for ${modelRef(name, version)}, got ${modelRef(m.name, m.version)}`);
      if (this.trustedKeys.length > 0) verifySignedManifest(signed, this.trustedKeys);
      return { signed, sha256: manifestSha256(signed) };
    });
  }

  /** Fetches the version's files unless they are here; resolves with where they are. */
  fetch(name: string, version: number, auth: { username: string; password: string }): Promise<TrainingBase> {
    return memo(this.fetching, modelRef(name, version), async () => {
      const { signed, sha256 } = await this.manifest(name, version, auth);
      const stats = newFetchStats();
      for (const file of signed.manifest.files) await fetchFile(this.store, this.auth(auth), file, stats);
      this.store.saveManifest(signed);
      const dir = this.store.buildView(signed.manifest);
      this.store.verifyVersion(signed.manifest);
      const base: TrainingBase = { manifest: signed.manifest, manifestSha256: sha256, dir };
      this.ready.set(modelRef(name, version), base);
      return base;
    });
  }

  /** The version's files when fetched already, else null. */
  base(name: string, version: number): TrainingBase | null {
    return this.ready.get(modelRef(name, version)) ?? null;
  }

  private auth(a: { username: string; password: string }): FetchAuth {
    return { baseUrl: this.artifactsUrl, username: a.username, password: a.password };
  }
}

/** One promise per key; a failure is forgotten, so the next device asking tries again. */
function memo<T>(map: Map<string, Promise<T>>, key: string, make: () => Promise<T>): Promise<T> {
  let p = map.get(key);
  if (!p) {
    p = make();
    map.set(key, p);
    p.catch(() => map.delete(key));
  }
  return p;
}

/**
 * Training and evaluation in this process, one job at a time, in the order asked: the jobs of
 * many devices would otherwise fight over the same cores and all miss their deadlines together.
 * A job still waiting at its deadline does not start; a running one stops at the deadline through
 * runTrainJob's own check, at a tripped gate, or when its round is cancelled.
 */
export class InProcessTrainer {
  private tail: Promise<void> = Promise.resolve();
  private closed = false;

  readonly train = (job: TrainJob, opts: RunnerOptions): Promise<TrainJobResult> =>
    this.enqueue(opts, job.deadlineAt, (shouldStop) => runTrainJob(job, { shouldStop, ...(opts.clock ? { clock: opts.clock } : {}) }));

  readonly evaluate = (job: EvalJob, deadlineAt: number, opts: RunnerOptions): Promise<EvalMetrics> => this.enqueue(opts, deadlineAt, () => runEvalJob(job));

  /** Jobs waiting do not start, the running one stops at its next step. */
  close(): void {
    this.closed = true;
  }

  private enqueue<T>(opts: RunnerOptions, deadlineAt: number, work: (shouldStop: () => StopReason | null) => Promise<T>): Promise<T> {
    const turn = this.tail.then(() => this.runOne(opts, deadlineAt, work));
    this.tail = turn.then(
      () => undefined,
      () => undefined,
    );
    return turn;
  }

  private async runOne<T>(opts: RunnerOptions, deadlineAt: number, work: (shouldStop: () => StopReason | null) => Promise<T>): Promise<T> {
    if (this.closed || opts.signal?.aborted) throw new EdgefleetError('EF_TRAINING_FAILED', 'stopped before its turn');
    if ((opts.clock ?? Date.now)() >= deadlineAt) throw new EdgefleetError('EF_TRAINING_FAILED', 'the deadline passed while waiting for a turn to train');
    let tripped: StopReason | null = null;
    const read = opts.readGates;
    // The share training takes is not known in-process; 0: with the simulator's quiet gates nothing trips anyway.
    const timer = read
      ? setInterval(() => {
          read()
            .then((r) => (tripped ??= trippedGate(r, opts.gates, 0)))
            .catch(() => undefined);
        }, opts.gateIntervalMs)
      : null;
    try {
      // Cancelled or closed: stop as at a deadline. The Participant drops the result of a cancelled round.
      return await work(() => (this.closed || opts.signal?.aborted ? 'deadline' : tripped));
    } finally {
      if (timer) clearInterval(timer);
    }
  }
}

/** What a simulated device gives its learner. */
export interface SimLearnerHost {
  id: string;
  auth: { username: string; password: string };
  /** What the device serves of `model`, and the manifest sha256 it reports for it. */
  serving(model: string): { version: number; sha256: string | null } | null;
  /** Publishes on `up/<kind>`, QoS 1; rejects when the device has no link. */
  publish(kind: 'fl' | 'update', payload: Buffer): Promise<void>;
  activity(what: FlActivity, detail: string | null): void;
}

/** The federated side of a simulated fleet: the dataset and its partition, the file cache, the trainer. */
export class SimLearning {
  readonly model: string;
  readonly dataset: FlDataset;
  readonly cache: ModelCache;
  readonly trainer = new InProcessTrainer();
  private readonly data: Dataset;
  private readonly shards = new Map<string, Int32Array>();
  private readonly log: Logger;

  constructor(opts: SimLearningOptions, ids: readonly string[]) {
    if (!FL_DATASETS.includes(opts.dataset)) throw new RangeError(`unknown dataset ${JSON.stringify(opts.dataset)}; one of ${FL_DATASETS.join(', ')}`);
    const alpha = opts.alpha ?? 0.5;
    if (!(alpha > 0)) throw new RangeError(`the Dirichlet alpha must be above 0, not ${alpha}`);
    this.dataset = opts.dataset;
    this.model = opts.model ?? opts.dataset;
    this.log = opts.log ?? silentLogger();
    this.data = loadDataset(opts.dataset);
    const parts = partitionRows(this.data.set.y, ids.length, alpha, opts.seed ?? 1);
    ids.forEach((id, i) => this.shards.set(id, parts[i]!));
    this.cache = new ModelCache(opts.cacheDir, opts.artifactsUrl, opts.trustedKeys ?? []);
  }

  /** How many samples a device holds for `model`. */
  samples(id: string, model: string): number {
    return model === this.model ? (this.shards.get(id)?.length ?? 0) : 0;
  }

  /** Sample counts over the devices: smallest, largest, total. */
  sampleRange(): { min: number; max: number; total: number } {
    const n = [...this.shards.values()].map((s) => s.length);
    return { min: n.length ? Math.min(...n) : 0, max: n.length ? Math.max(...n) : 0, total: n.reduce((a, b) => a + b, 0) };
  }

  learner(host: SimLearnerHost): SimLearner {
    return new SimLearner(this, host, this.log.child({ deviceId: host.id }));
  }

  /** A device's samples as the agent's sample store gives them: its rows, keyed by row index. */
  load(id: string, model: string, opts: { featureShape: number[]; loss: 'sparse-categorical-crossentropy' | 'mean-squared-error'; labelWidth?: number }): { set: SampleSet; keys: Int32Array } {
    const rows = model === this.model ? this.shards.get(id) : undefined;
    if (!rows) throw new EdgefleetError('EF_TRAINING_FAILED', `no samples for ${model}`);
    const { set, classes } = this.data;
    const have = set.featureShape;
    if (opts.featureShape.length !== have.length || !opts.featureShape.every((d, i) => d === -1 || d === have[i])) {
      throw new EdgefleetError('EF_TRAINING_FAILED', `${model} takes rows of [${opts.featureShape.join(', ')}]; the ${this.dataset} samples are [${have.join(', ')}]`);
    }
    const picked = pickRows(set, rows);
    if (opts.loss === 'sparse-categorical-crossentropy') return { set: picked, keys: rows };
    // Squared error: one-hot targets when the output has a unit per class, the class index as a number when it has one.
    const width = opts.labelWidth ?? 1;
    if (width !== 1 && width !== classes) throw new EdgefleetError('EF_TRAINING_FAILED', `${model}'s output has ${width} units; the ${this.dataset} samples have ${classes} classes`);
    const y = new Float32Array(picked.count * width);
    for (let i = 0; i < picked.count; i++) {
      const c = picked.y[i]!;
      if (width === 1) y[i] = c;
      else y[i * width + c] = 1;
    }
    return { set: { ...picked, y, labelWidth: width }, keys: rows };
  }

  close(): void {
    this.trainer.close();
  }
}

/**
 * One simulated device's learner: the agent's Participant with the device's samples, the cached
 * files of what the device serves, the in-process trainer and the device's link. Messages go to
 * the Participant in arrival order, each after the files of the version the device serves are
 * here (the Participant looks for them synchronously).
 */
export class SimLearner {
  private readonly participant: Participant;
  private chain: Promise<void> = Promise.resolve();
  private stopping = false;

  constructor(
    private readonly learning: SimLearning,
    private readonly host: SimLearnerHost,
    log: Logger,
  ) {
    const deps: ParticipantDeps = {
      serving: (model) => {
        const s = host.serving(model);
        const base = s ? learning.cache.base(model, s.version) : null;
        // The files must be those of the manifest the device says it serves.
        return base && base.manifestSha256 === s?.sha256 ? base : null;
      },
      samples: { count: (model) => learning.samples(host.id, model), load: (model, opts) => learning.load(host.id, model, opts) },
      publish: async (kind, payload) => {
        // A device going away says nothing more, as an agent whose training child is killed on stop.
        if (this.stopping) throw new Error(`${host.id} is stopping`);
        await host.publish(kind, payload);
        this.count(kind, payload);
      },
      gates: GATES,
      gateIntervalMs: 1000,
      readGates: () => Promise.resolve(QUIET),
      train: learning.trainer.train,
      evaluate: learning.trainer.evaluate,
      log,
    };
    this.participant = new Participant(deps);
  }

  handle(kind: 'fl' | 'candidate', payload: Buffer): void {
    if (this.stopping) return;
    this.chain = this.chain.then(async () => {
      await this.fetchServing();
      if (!this.stopping) this.participant.handle(kind, payload);
    });
  }

  /** The device process died: what it was training is lost. */
  abort(): void {
    void this.participant.stop();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.chain;
    await this.participant.stop();
  }

  private async fetchServing(): Promise<void> {
    const model = this.learning.model;
    const s = this.host.serving(model);
    if (!s || this.learning.cache.base(model, s.version)) return;
    try {
      await this.learning.cache.fetch(model, s.version, this.host.auth);
    } catch (err) {
      // The Participant then declines (not-serving-base): the device cannot train what it has no files of.
      this.host.activity('fetch-failed', `${modelRef(model, s.version)}: ${(err as Error).message}`);
    }
  }

  private count(kind: 'fl' | 'update', payload: Buffer): void {
    if (kind === 'update') return this.host.activity('update', null);
    const m = JSON.parse(payload.toString('utf8')) as FlUpMessage;
    const detail =
      m.kind === 'decline' ? `round ${m.roundId}: ${m.reason}${m.detail ? ` (${m.detail})` : ''}` : m.kind === 'failed' ? `round ${m.roundId}: ${m.code}: ${m.message}` : `round ${m.roundId}`;
    this.host.activity(m.kind, detail);
  }
}
