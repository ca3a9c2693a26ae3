import {
  CandidateMeta,
  FRAME_FL_CANDIDATE,
  FRAME_FL_UPDATE,
  FlDownMessage,
  MAX_PAYLOAD_BYTES,
  decodeFlFrame,
  decodeJson,
  encodeFlFrame,
  encodeJson,
  isEdgefleetError,
  type DeclineReason,
  type ErrorCode,
  type EvalMetrics,
  type FlUpMessage,
  type Manifest,
  type TrainingSpec,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import { readGates, trippedGate, type GateLimits, type GateReading } from './gates.js';
import type { EvalJob, TrainJob, TrainJobResult } from './job.js';
import { evaluateInChild, trainInChild, type RunnerOptions } from './runner.js';
import { Personalizer, type PersonalizerDeps } from './personal.js';
import { trainingFeatureShape } from './sample-store.js';
import type { SampleSet } from './samples.js';

/**
 * The device's side of federated rounds: answers invitations (join or decline, with the reason),
 * trains in the low-priority child, sends the update; measures a round's candidate on its holdout
 * when asked. One round at a time; an invitation seen before (sent again after a fleet restart) is
 * ignored. Samples stay here: only counts, updates and holdout figures leave.
 */

export interface TrainingBase {
  manifest: Manifest;
  /** sha256 of the signed manifest: what the fleet names a base by. */
  manifestSha256: string;
  /** Where the version's files are. */
  dir: string;
}

export interface ParticipantDeps {
  /** The version serving `model`, or null. */
  serving(model: string): TrainingBase | null;
  samples: {
    count(model: string): number;
    load(model: string, opts: { featureShape: number[]; loss: TrainingSpec['loss']; labelWidth?: number }): { set: SampleSet; keys: Int32Array };
  };
  /** Publishes upstream (`up/fl` JSON, `up/update` binary), QoS 1. */
  publish(kind: 'fl' | 'update', payload: Buffer): Promise<void>;
  gates: GateLimits;
  gateIntervalMs: number;
  /** Counts a refused message from the fleet (the agent's reject counter). */
  reject?: (code: ErrorCode, kind: 'fl' | 'candidate', detail: Record<string, unknown>) => void;
  readGates?: () => Promise<GateReading>;
  /** Runs a training job; default in the low-priority child (trainInChild). The simulator trains in-process instead. */
  train?: (job: TrainJob, opts: RunnerOptions) => Promise<TrainJobResult>;
  /** Runs a federated evaluation; default in the child (evaluateInChild). */
  evaluate?: (job: EvalJob, deadlineAt: number, opts: RunnerOptions) => Promise<EvalMetrics>;
  /** The device's personal layers: trained from, kept, and judged (personal.ts). None in the simulator. */
  personalizer?: Personalizer;
  log: Logger;
  now?: () => number;
}

export class Participant {
  private readonly seen = new Set<number>();
  private current: { roundId: number; abort: AbortController } | null = null;
  private readonly tasks = new Set<Promise<void>>();

  constructor(private readonly deps: ParticipantDeps) {}

  get busy(): boolean {
    return this.current !== null;
  }

  /** The serving versions may have changed: the personal layers are judged against the new ones. */
  refreshPersonal(): void {
    void this.deps.personalizer?.refresh();
  }

  /** Stops whatever runs (the child is killed) and waits for it. */
  async stop(): Promise<void> {
    this.current?.abort.abort();
    await Promise.all(this.tasks);
  }

  handle(kind: 'fl' | 'candidate', payload: Buffer): void {
    const task = (kind === 'fl' ? this.onFl(payload) : this.onCandidate(payload)).catch((err: unknown) => this.deps.log.error({ err }, 'federated task failed'));
    this.tasks.add(task);
    void task.finally(() => this.tasks.delete(task));
  }

  private runner(signal: AbortSignal): RunnerOptions {
    return { gates: this.deps.gates, gateIntervalMs: this.deps.gateIntervalMs, graceMs: 10_000, signal, ...(this.deps.readGates ? { readGates: this.deps.readGates } : {}) };
  }

  private async send(msg: FlUpMessage): Promise<void> {
    await this.deps.publish('fl', encodeJson(msg)).catch((err: unknown) => this.deps.log.warn({ err, kind: msg.kind }, 'federated message not sent'));
  }

  private async onFl(payload: Buffer): Promise<void> {
    const decoded = decodeJson(FlDownMessage, payload, MAX_PAYLOAD_BYTES.fl);
    if (!decoded.ok) {
      this.deps.reject?.(decoded.error.code, 'fl', { message: decoded.error.message.slice(0, 200) });
      return;
    }
    const msg = decoded.value;
    if (msg.kind === 'cancel') {
      if (this.current?.roundId === msg.roundId) this.current.abort.abort();
      return;
    }
    if (this.seen.has(msg.roundId)) return;
    this.seen.add(msg.roundId);
    const now = (this.deps.now ?? Date.now)();
    const decline = (reason: DeclineReason, detail?: string): Promise<void> => {
      this.deps.log.info({ round: msg.roundId, reason, detail }, 'declined a federated round');
      return this.send({ kind: 'decline', roundId: msg.roundId, reason, ...(detail ? { detail } : {}) });
    };
    if (now >= msg.deadlineAt) return decline('past-deadline');
    if (this.current) return decline('busy', `training for round ${this.current.roundId}`);
    const base = this.deps.serving(msg.model);
    if (!base || base.manifest.version !== msg.baseVersion || base.manifestSha256 !== msg.baseManifestSha256) {
      return decline('not-serving-base', base ? `serving ${msg.model}@${base.manifest.version}` : `no ${msg.model} serving`);
    }
    const training = base.manifest.training;
    if (!training || base.manifest.runtime !== 'tfjs-layers') return decline('not-trainable');
    const count = this.deps.samples.count(msg.model);
    if (count < msg.minSamples) return decline('too-few-samples', `${count} of ${msg.minSamples}`);
    const tripped = trippedGate(await (this.deps.readGates ?? readGates)(), this.deps.gates, 0);
    if (tripped) return decline('resource-gates', tripped);
    const abort = new AbortController();
    this.current = { roundId: msg.roundId, abort };
    try {
      const { set, keys } = this.load(base, training);
      const personal = this.deps.personalizer?.current(msg.model) ?? null;
      await this.send({ kind: 'join', roundId: msg.roundId, sampleCount: set.count });
      const result = await (this.deps.train ?? trainInChild)(
        {
          manifest: base.manifest,
          dir: base.dir,
          samples: set,
          keys,
          spec: msg.train,
          roundId: msg.roundId,
          baseManifestSha256: msg.baseManifestSha256,
          deadlineAt: msg.deadlineAt,
          seed: (msg.roundId * 2_654_435_761) >>> 0,
          // Personal layers start from the device's own weights, carried over from round to round and version to version.
          ...(personal ? { personal } : {}),
        },
        this.runner(abort.signal),
      );
      if (abort.signal.aborted) return;
      await this.deps.publish('update', encodeFlFrame(FRAME_FL_UPDATE, result.bytes));
      if (result.personal.length > 0) void this.deps.personalizer?.offer(msg.model, result.personal, msg.train.holdoutShare);
      this.deps.log.info({ round: msg.roundId, samples: result.meta.sampleCount, steps: result.meta.steps, stoppedBy: result.meta.stoppedBy, bytes: result.bytes.length }, 'federated update sent');
    } catch (err) {
      if (abort.signal.aborted) return;
      const code = isEdgefleetError(err) ? err.code : 'EF_TRAINING_FAILED';
      this.deps.log.warn({ err, round: msg.roundId }, 'federated training failed');
      await this.send({ kind: 'failed', roundId: msg.roundId, code, message: (err as Error).message.slice(0, 500) });
    } finally {
      this.current = null;
    }
  }

  private load(base: TrainingBase, training: TrainingSpec): { set: SampleSet; keys: Int32Array } {
    return holdoutSamples(this.deps.samples, base.manifest, training);
  }

  private async onCandidate(payload: Buffer): Promise<void> {
    let meta: CandidateMeta;
    let difference;
    try {
      const bundle = decodeFlFrame(FRAME_FL_CANDIDATE, payload, { maxBytes: MAX_PAYLOAD_BYTES.candidate });
      meta = CandidateMeta.parse(bundle.meta);
      difference = bundle.tensors;
    } catch (err) {
      this.deps.reject?.(isEdgefleetError(err) ? err.code : 'EF_BAD_PAYLOAD', 'candidate', { message: (err as Error).message.slice(0, 200) });
      return;
    }
    const base = this.deps.serving(meta.model);
    if (!base || base.manifestSha256 !== meta.baseManifestSha256 || !base.manifest.training) {
      return this.send({ kind: 'decline', roundId: meta.roundId, reason: 'not-serving-base' });
    }
    const abort = new AbortController();
    try {
      const { set, keys } = this.load(base, base.manifest.training);
      const metrics = await (this.deps.evaluate ?? evaluateInChild)({ manifest: base.manifest, dir: base.dir, samples: set, keys, holdoutShare: meta.holdoutShare, difference }, meta.deadlineAt, this.runner(abort.signal));
      await this.send({ kind: 'evaluation', roundId: meta.roundId, metrics });
      this.deps.log.info({ round: meta.roundId, ...metrics }, 'federated candidate evaluated');
    } catch (err) {
      await this.send({ kind: 'decline', roundId: meta.roundId, reason: 'too-few-samples', detail: (err as Error).message.slice(0, 400) });
    }
  }
}

/** The agent's participant: its model manager's serving versions, its sample store, its link. */
export function createParticipant(opts: {
  manager: Omit<PersonalizerDeps['manager'], 'trainingBase'> & { trainingBase(name: string): (TrainingBase & { committed: boolean; personalized: boolean }) | null };
  samples: ParticipantDeps['samples'];
  /** Where the personal layers' weights are kept. */
  dir: string;
  config: { maxCpuLoad: number; maxTemperatureC: number; minBatteryPercent: number; gateIntervalSec: number };
  publish: ParticipantDeps['publish'];
  reject: NonNullable<ParticipantDeps['reject']>;
  log: Logger;
}): Participant {
  const c = opts.config;
  const gates = { maxCpuLoad: c.maxCpuLoad, maxTemperatureC: c.maxTemperatureC, minBatteryPercent: c.minBatteryPercent };
  const personalizer = new Personalizer({
    dir: opts.dir,
    manager: opts.manager,
    samples: (base, training) => holdoutSamples(opts.samples, base.manifest, training),
    // No deadline of its own: a judgement is short; the grace is the limit.
    evaluate: (job) => evaluateInChild(job, Date.now() + 600_000, { gates, gateIntervalMs: c.gateIntervalSec * 1000, graceMs: 0 }),
    log: opts.log,
  });
  return new Participant({
    personalizer,
    serving: (model) => opts.manager.trainingBase(model),
    samples: opts.samples,
    publish: opts.publish,
    gates: { maxCpuLoad: c.maxCpuLoad, maxTemperatureC: c.maxTemperatureC, minBatteryPercent: c.minBatteryPercent },
    gateIntervalMs: c.gateIntervalSec * 1000,
    reject: opts.reject,
    log: opts.log,
  });
}

/** The device's samples of a model, shaped for its training input and output. */
function holdoutSamples(samples: ParticipantDeps['samples'], manifest: Manifest, training: TrainingSpec): { set: SampleSet; keys: Int32Array } {
  const output = training.output === undefined ? manifest.outputs[0]! : manifest.outputs.find((o) => o.name === training.output)!;
  return samples.load(manifest.name, { featureShape: trainingFeatureShape(manifest) ?? [], loss: training.loss, labelWidth: Math.max(1, output.shape.at(-1) ?? 1) });
}
