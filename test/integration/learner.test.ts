import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeBundle, Manifest, TrainSpec, UpdateMeta, type TrainingSpec } from '../../proto/index.js';
import { silentLogger } from '../../common/log.js';
import { runEvalJob, runTrainJob, type TrainJob } from '../../agent/learner/job.js';
import { Personalizer } from '../../agent/learner/personal.js';
import { trainInChild, type RunnerOptions } from '../../agent/learner/runner.js';
import type { GateReading } from '../../agent/learner/gates.js';
import { l2Norm } from '../../agent/learner/update.js';
import { irisSamples, type IrisModel } from '../../scripts/train-iris.js';
import { irisModels } from '../helpers/models.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

/**
 * The device's side of a federated round on a real model: the iris `wrong` variant (trained on
 * scrambled labels) learns from the true labels, in-process and in the low-priority child.
 */

function manifestOf(model: IrisModel, training: Partial<TrainingSpec> = {}): Manifest {
  return Manifest.parse({
    schema: 1,
    name: 'iris',
    version: 1,
    runtime: model.runtime,
    entry: model.entry,
    files: model.files,
    inputs: model.inputs,
    outputs: model.outputs,
    createdAt: 0,
    expiresAt: null,
    training: { loss: 'sparse-categorical-crossentropy', ...training },
  });
}

function job(model: IrisModel, over: Partial<TrainJob> = {}, training: Partial<TrainingSpec> = {}): TrainJob {
  const { features, labels } = irisSamples();
  return {
    manifest: manifestOf(model, training),
    dir: model.dir,
    samples: { x: Float32Array.from(features.flat()), y: Int32Array.from(labels), count: labels.length, featureShape: [4], labelWidth: 1 },
    keys: Int32Array.from(labels.keys()),
    spec: TrainSpec.parse({ epochs: 30, batchSize: 16, learningRate: 0.05, optimizer: 'adam', clipNorm: 100 }),
    roundId: 7,
    baseManifestSha256: 'a'.repeat(64),
    deadlineAt: Date.now() + 120_000,
    seed: 1,
    ...over,
  };
}

const quietDevice = (): Promise<GateReading> => Promise.resolve({ cpuLoad: 0, temperatureC: null, battery: null });
const runner = (over: Partial<RunnerOptions> = {}): RunnerOptions => ({
  gates: { maxCpuLoad: 0.9, maxTemperatureC: 80, minBatteryPercent: 20 },
  gateIntervalMs: 50,
  graceMs: 5_000,
  readGates: quietDevice,
  ...over,
});

describe('local training for a round', () => {
  it('learns from the device’s labels and sends a clipped difference under the base’s weight names', async () => {
    const { wrong } = await irisModels();
    const result = await runTrainJob(job(wrong));
    const meta = UpdateMeta.parse(result.meta);
    expect(meta.metrics.accuracyAfter!).toBeGreaterThan(meta.metrics.accuracyBefore! + 0.3);
    expect(meta.metrics.lossAfter).toBeLessThan(meta.metrics.lossBefore);
    expect(meta.sampleCount + meta.metrics.holdoutCount).toBe(150);
    expect(meta.stoppedBy).toBe('done');
    const bundle = decodeBundle(result.bytes);
    expect(bundle.meta).toEqual(meta);
    expect(bundle.tensors.map((t) => t.name)).toEqual(['hidden0/kernel', 'hidden0/bias', 'probabilities/kernel', 'probabilities/bias']);
    expect(l2Norm(bundle.tensors)).toBeCloseTo(meta.normBeforeClip, 3);
    expect(result.personal).toEqual([]);
  });

  it('clips to the round’s norm bound and leaves personal layers out of the update', async () => {
    const { wrong } = await irisModels();
    const base = job(wrong, {}, { personalLayers: ['probabilities'] });
    const result = await runTrainJob({ ...base, spec: { ...base.spec, clipNorm: 0.5 } });
    expect(result.meta.clipped).toBe(true);
    expect(result.meta.normBeforeClip).toBeGreaterThan(0.5);
    const bundle = decodeBundle(result.bytes);
    expect(bundle.tensors.map((t) => t.name)).toEqual(['hidden0/kernel', 'hidden0/bias']);
    expect(l2Norm(bundle.tensors)).toBeLessThanOrEqual(0.5);
    expect(result.personal.map((w) => w.name)).toEqual(['probabilities/kernel', 'probabilities/bias']);
  });

  it('sends 8-bit updates with the error quantization added', async () => {
    const { wrong } = await irisModels();
    const base = job(wrong);
    const result = await runTrainJob({ ...base, spec: { ...base.spec, encoding: 'q8' } });
    const float = await runTrainJob(base);
    // 131 weights: the per-tensor ranges in the header eat most of what one byte per weight saves.
    expect(result.bytes.length).toBeLessThan(float.bytes.length);
    // Training is deterministic (same seed, same rows): every value within one step of the float update.
    const exact = decodeBundle(float.bytes).tensors;
    decodeBundle(result.bytes).tensors.forEach((t, i) => {
      const x = exact[i]!.data;
      const step = (Math.max(...x) - Math.min(...x)) / 255;
      t.data.forEach((v, j) => expect(Math.abs(v - x[j]!)).toBeLessThanOrEqual(step * 1.0001 + 1e-9));
    });
    expect(result.meta.quantizationError).toBeGreaterThan(0);
    expect(result.meta.quantizationError).toBeLessThan(0.05);
  });

  it('refuses a model without a training section, and a deadline already past', async () => {
    const { wrong } = await irisModels();
    const untrainable = job(wrong);
    const { training: _, ...rest } = untrainable.manifest;
    await expect(runTrainJob({ ...untrainable, manifest: rest })).rejects.toMatchObject({ code: 'EF_TRAINING_FAILED' });
    await expect(runTrainJob(job(wrong, { deadlineAt: Date.now() - 1 }))).rejects.toThrow(/deadline before the first step/);
  });
});

describe('the training child', () => {
  it('trains at low priority and hands back the same kind of update', async () => {
    const { wrong } = await irisModels();
    let progress = 0;
    // What the kernel says of the child while it runs, not what the child says of itself.
    let nice: number | null = null;
    const result = await trainInChild(
      job(wrong),
      runner({
        onProgress: (n) => (progress = n),
        onStarted: (c) => {
          // /proc/<pid>/stat after the command's closing parenthesis: nice is field 19.
          const fields = readFileSync(`/proc/${c.pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ');
          nice = Number(fields[16]);
        },
      }),
    );
    expect(nice).toBe(19);
    expect(UpdateMeta.parse(result.meta).stoppedBy).toBe('done');
    expect(result.bytes).toBeInstanceOf(Uint8Array);
    expect(decodeBundle(result.bytes).tensors).toHaveLength(4);
    expect(progress).toBeGreaterThan(0);
  });

  it('stops at a tripped resource gate and sends what it trained so far', async () => {
    const { wrong } = await irisModels();
    let steps = 0;
    // A board that heats up once training is under way.
    const heating = (): Promise<GateReading> => Promise.resolve({ cpuLoad: 0, temperatureC: steps > 20 ? 95 : 40, battery: null });
    const long = job(wrong);
    const result = await trainInChild({ ...long, spec: { ...long.spec, epochs: 100_000 } }, runner({ readGates: heating, onProgress: (n) => (steps = n) }));
    expect(result.meta.stoppedBy).toBe('temperature');
    expect(result.meta.steps).toBeGreaterThan(0);
  });

  it('reads the gates itself when none are injected (here a CPU limit no device meets)', async () => {
    const { wrong } = await irisModels();
    const long = job(wrong);
    const { readGates: _, ...own } = runner({ gates: { maxCpuLoad: -1, maxTemperatureC: 80, minBatteryPercent: 20 } });
    const result = await trainInChild({ ...long, spec: { ...long.spec, epochs: 100_000 } }, own);
    expect(result.meta.stoppedBy).toBe('cpu');
    expect(result.meta.steps).toBeGreaterThan(0);
  });

  it('stops at the round’s deadline', async () => {
    const { wrong } = await irisModels();
    const long = job(wrong);
    const result = await trainInChild({ ...long, spec: { ...long.spec, epochs: 100_000 }, deadlineAt: Date.now() + 4_000 }, runner());
    expect(result.meta.stoppedBy).toBe('deadline');
    expect(result.meta.steps).toBeGreaterThan(0);
  });

  it('reports a child killed with SIGKILL as a coded failure', async () => {
    const { wrong } = await irisModels();
    const long = job(wrong);
    const abort = new AbortController();
    let steps = 0;
    const pending = trainInChild({ ...long, spec: { ...long.spec, epochs: 100_000 } }, runner({ signal: abort.signal, onProgress: () => ++steps === 5 && abort.abort() }));
    await expect(pending).rejects.toMatchObject({ code: 'EF_TRAINING_FAILED', message: expect.stringMatching(/killed by SIGKILL/) as unknown });
  });
});

describe('personal layers kept on the device', () => {
  afterAll(cleanup);

  /** A Personalizer over the iris model's real files, evaluating in this process; the manager records what it is told. */
  function personalizer(model: IrisModel): { p: Personalizer; dir: string; told: (number | null)[] } {
    const dir = tempDir();
    const manifest = manifestOf(model, { personalLayers: ['probabilities'] });
    const { samples, keys } = job(model);
    const told: (number | null)[] = [];
    const p = new Personalizer({
      dir,
      manager: {
        trainingBase: () => ({ manifest, dir: model.dir, committed: true, personalized: false }),
        personalize: (_name, version, variant) => {
          told.push(variant === null ? null : version);
          return true;
        },
        models: () => ['iris'],
      },
      samples: () => ({ set: samples, keys }),
      evaluate: (j) => runEvalJob(j),
      log: silentLogger(),
    });
    return { p, dir, told };
  }

  it('drops kept weights whose shapes no longer fit the serving version, and a file it cannot read', async () => {
    const { wrong } = await irisModels();
    const { p, dir, told } = personalizer(wrong);
    const file = join(dir, 'iris.personal');
    // An output layer of another width: what a new global version with a changed layer leaves behind.
    await p.offer('iris', [{ name: 'probabilities/kernel', data: new Float32Array(5) }, { name: 'probabilities/bias', data: new Float32Array(3) }], 0.2);
    expect(existsSync(file)).toBe(false);
    expect(told).toEqual([null]);
    expect(p.current('iris')).toBeNull();

    writeFileSync(file, 'not a tensor bundle');
    expect(p.current('iris')).toBeNull();
    expect(existsSync(file)).toBe(false);
  });
});
