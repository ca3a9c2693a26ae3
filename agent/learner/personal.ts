import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { decodeBundle, encodeBundle, isEdgefleetError, type EvalMetrics, type Manifest, type TrainingSpec } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';
import type { Logger } from '../../common/log.js';
import type { PersonalVerdict } from '../models/slot.js';
import type { EvalJob } from './job.js';
import { isWeightsMismatch } from './update.js';
import type { SampleSet } from './samples.js';

/**
 * Personalization (FedPer, Arivazhagan et al. 2019): the weights of a model's personal layers,
 * trained here in federated rounds, never leave the device. They are kept in
 * `<stateDir>/learner/<model>.personal` and laid over whatever global version the device serves,
 * the one they were trained on and every later one whose shapes fit. Like any version, the
 * personalized variant has to earn its place: before it serves, and again whenever the global
 * version changes, it is measured against the global weights on the device's holdout, and it
 * serves only while it does at least as well. Otherwise it is dropped, and the global version
 * serves as published.
 */

export interface PersonalizerDeps {
  dir: string;
  manager: {
    trainingBase(name: string): { manifest: Manifest; dir: string; committed: boolean; personalized: boolean } | null;
    personalize(name: string, version: number, p: { weights: { name: string; data: Float32Array }[]; verdict: PersonalVerdict } | null): boolean;
    models(): string[];
  };
  samples: (base: { manifest: Manifest }, training: TrainingSpec) => { set: SampleSet; keys: Int32Array };
  /** Measures base and candidate on the holdout (the training child, or in-process in tests). */
  evaluate: (job: EvalJob) => Promise<EvalMetrics>;
  log: Logger;
}

interface Stored {
  weights: { name: string; data: Float32Array }[];
  holdoutShare: number;
}

export class Personalizer {
  /** The global version each model's personal weights were last judged against. */
  private readonly judged = new Map<string, number>();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly deps: PersonalizerDeps) {}

  private file(model: string): string {
    return join(this.deps.dir, `${model}.personal`);
  }

  /** The kept personal weights of `model`, for the next round to train from; null when none. */
  current(model: string): { name: string; data: Float32Array }[] | null {
    return this.load(model)?.weights ?? null;
  }

  /** New personal weights from a round: kept, then judged against the global weights. */
  offer(model: string, weights: { name: string; data: Float32Array }[], holdoutShare: number): Promise<void> {
    mkdirSync(this.deps.dir, { recursive: true });
    writeFileAtomic(this.file(model), encodeBundle({ tensors: weights.map((w) => ({ name: w.name, shape: [w.data.length], data: w.data })), meta: { kind: 'personal', model, holdoutShare } }));
    this.judged.delete(model);
    return this.refresh();
  }

  /** Judges the kept personal weights of every model whose serving version they have not been judged against. */
  refresh(): Promise<void> {
    this.queue = this.queue.then(async () => {
      for (const model of this.deps.manager.models()) await this.judge(model).catch((err: unknown) => this.deps.log.warn({ err, model }, 'personalization check failed'));
    });
    return this.queue;
  }

  private load(model: string): Stored | null {
    if (!existsSync(this.file(model))) return null;
    try {
      const b = decodeBundle(readFileSync(this.file(model)));
      const share = (b.meta as { holdoutShare?: unknown }).holdoutShare;
      return { weights: b.tensors.map((t) => ({ name: t.name, data: t.data })), holdoutShare: typeof share === 'number' ? share : 0.2 };
    } catch (err) {
      this.deps.log.warn({ err, model }, 'personal weights unreadable; dropped');
      this.drop(model, null);
      return null;
    }
  }

  private drop(model: string, version: number | null): void {
    rmSync(this.file(model), { force: true });
    if (version !== null) this.deps.manager.personalize(model, version, null);
  }

  private async judge(model: string): Promise<void> {
    const base = this.deps.manager.trainingBase(model);
    const training = base?.manifest.training;
    if (!base || !training || !base.committed) return;
    const version = base.manifest.version;
    if (this.judged.get(model) === version) return;
    const stored = this.load(model);
    if (!stored) return;
    const { set, keys } = this.deps.samples(base, training);
    let m: EvalMetrics;
    try {
      m = await this.deps.evaluate({ manifest: base.manifest, dir: base.dir, samples: set, keys, holdoutShare: stored.holdoutShare, replace: stored.weights });
    } catch (err) {
      // Shapes that no longer fit (the new global version changed the layer), or no holdout to judge on.
      this.deps.log.info({ model, version, err: isEdgefleetError(err) ? err.message : String(err) }, 'personal weights do not carry over; the global version serves');
      this.judged.set(model, version);
      if (isWeightsMismatch(err)) this.drop(model, version);
      return;
    }
    const beats = m.candidateAccuracy !== null && m.baseAccuracy !== null ? m.candidateAccuracy >= m.baseAccuracy : m.candidateLoss <= m.baseLoss;
    const verdict: PersonalVerdict = {
      version,
      layers: training.personalLayers,
      holdoutCount: m.holdoutCount,
      accuracy: m.candidateAccuracy,
      globalAccuracy: m.baseAccuracy,
      loss: m.candidateLoss,
      globalLoss: m.baseLoss,
    };
    if (!beats) {
      this.judged.set(model, version);
      this.deps.log.info({ model, ...verdict }, 'the personalized variant does worse than the global version on this device’s holdout; dropped');
      this.drop(model, version);
    } else if (this.deps.manager.personalize(model, version, { weights: stored.weights, verdict })) {
      this.judged.set(model, version);
      this.deps.log.info({ model, ...verdict }, 'serving the personalized variant');
    }
    // Otherwise the version moved on (or left probation) meanwhile: judged again at the next refresh.
  }
}
