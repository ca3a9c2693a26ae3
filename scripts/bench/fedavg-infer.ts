import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Manifest, TrainSpec } from '../../proto/index.js';
import { sha256File } from '../../common/files.js';
import { loadTfjs, saveLayersModelToDir, disposeTfModel } from '../../agent/runtime/tfjs.js';
import { trainInChild } from '../../agent/learner/runner.js';
import { buildDigitsModel, loadDigits, DIGIT_PIXELS } from '../train-digits.js';

/**
 * Inference latency on a device while it trains for a round, against the same device idle: the
 * digits model (784 → 512 → 256 → 10) served through the agent's TF.js runtime in this process,
 * one request every `intervalMs` (an open loop, as requests reach a device), while the agent's
 * training child trains the same model on 2,000 labelled rows at its low priority.
 *
 * Blocks: idle, training, idle. The idle p99 is over both idle blocks, so a machine that got
 * slower or faster during the run does not favour either side.
 */

export interface InferWhileTrainingResult {
  requests_idle: number;
  requests_training: number;
  idle_p50_ms: number;
  idle_p99_ms: number;
  training_p50_ms: number;
  training_p99_ms: number;
  infer_p99_training_vs_idle: number;
  training_steps: number;
}

const quantile = (xs: number[], q: number): number => {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
};

export async function benchInferenceWhileTraining(opts: { blockSec: number; intervalMs: number }): Promise<InferWhileTrainingResult> {
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-bench-fl-'));
  try {
    const built = await buildDigitsModel({ seed: 1 });
    const files = await saveLayersModelToDir(built, dir);
    disposeTfModel(built);
    const manifest = Manifest.parse({
      schema: 1,
      name: 'digits',
      version: 1,
      runtime: 'tfjs-layers',
      entry: 'model.json',
      files: files.map((p) => ({ path: p, size: statSync(join(dir, p)).size, sha256: sha256File(join(dir, p)) })),
      inputs: [{ name: 'pixels', dtype: 'float32', shape: [-1, DIGIT_PIXELS] }],
      outputs: [{ name: 'probabilities', dtype: 'float32', shape: [-1, 10] }],
      createdAt: 0,
      expiresAt: null,
      training: { loss: 'sparse-categorical-crossentropy' },
    });
    const served = await loadTfjs(manifest, dir);
    const rows = loadDigits({ split: 'test', limit: 256 });
    let next = 0;
    const one = async (): Promise<number> => {
      const r = next++ % rows.count;
      const t = performance.now();
      await served.run({ pixels: { dtype: 'float32', shape: [1, DIGIT_PIXELS], data: rows.xs.slice(r * DIGIT_PIXELS, (r + 1) * DIGIT_PIXELS) } });
      return performance.now() - t;
    };
    // An open loop: requests start on a fixed schedule; one that would start while the previous
    // runs waits for it (a device serves one at a time), and its wait counts.
    const block = async (sec: number): Promise<number[]> => {
      const out: number[] = [];
      const end = performance.now() + sec * 1000;
      let due = performance.now();
      while (due < end) {
        const wait = due - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        const started = performance.now();
        const ms = await one();
        out.push(ms + Math.max(0, started - due));
        due += opts.intervalMs;
      }
      return out;
    };
    for (let i = 0; i < 50; i++) await one();
    const idle1 = await block(opts.blockSec);

    const train = loadDigits({ split: 'train', limit: 2000 });
    const abort = new AbortController();
    let steps = 0;
    let started!: () => void;
    const firstStep = new Promise<void>((r) => (started = r));
    const training = trainInChild(
      {
        manifest,
        dir,
        samples: { x: train.xs, y: Int32Array.from(train.ys), count: train.count, featureShape: [DIGIT_PIXELS], labelWidth: 1 },
        keys: Int32Array.from({ length: train.count }, (_, i) => i),
        spec: TrainSpec.parse({ epochs: 100, batchSize: 32, learningRate: 0.05 }),
        roundId: 1,
        baseManifestSha256: '0'.repeat(64),
        deadlineAt: Date.now() + 3_600_000,
        seed: 1,
      },
      {
        gates: { maxCpuLoad: 1, maxTemperatureC: 1000, minBatteryPercent: 0 },
        gateIntervalMs: 1000,
        graceMs: 10_000,
        signal: abort.signal,
        onProgress: (n) => {
          steps = n;
          if (n === 1) started();
        },
      },
    ).catch(() => null);
    await firstStep;
    const during = await block(opts.blockSec);
    const trainedSteps = steps;
    abort.abort();
    await training;
    const idle2 = await block(opts.blockSec);
    await served.dispose();
    const idle = [...idle1, ...idle2];
    const r3 = (x: number): number => Math.round(x * 1000) / 1000;
    return {
      requests_idle: idle.length,
      requests_training: during.length,
      idle_p50_ms: r3(quantile(idle, 0.5)),
      idle_p99_ms: r3(quantile(idle, 0.99)),
      training_p50_ms: r3(quantile(during, 0.5)),
      training_p99_ms: r3(quantile(during, 0.99)),
      infer_p99_training_vs_idle: r3(quantile(during, 0.99) / quantile(idle, 0.99)),
      training_steps: trainedSteps,
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
