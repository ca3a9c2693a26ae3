import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FRAME_FL_UPDATE, encodeBundle, encodeFlFrame, type StrategySpec, type UpdateMeta } from '../../proto/index.js';
import { mulberry32 } from '../../common/random.js';
import { foldFiles, foldFilesInWorker, type FoldJob } from '../../fleet-server/federated/fold-files.js';
import { aggregate, strategyFor } from '../../fleet-server/federated/strategy.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

/**
 * The round's fold over the intake's files, in a worker thread: the same figures as the strategy
 * folding the same arrays in this thread, and the event loop free while it runs.
 */

afterAll(cleanup);

const META: UpdateMeta = {
  kind: 'fl-update',
  roundId: 1,
  baseManifestSha256: 'a'.repeat(64),
  sampleCount: 1,
  normBeforeClip: 1,
  clipped: false,
  localNoiseStd: 0,
  metrics: { lossBefore: 1, lossAfter: 0.5, accuracyBefore: 0.3, accuracyAfter: 0.9, holdoutCount: 10 },
  steps: 1,
  stoppedBy: 'done',
  trainMs: 1,
};

/** `clients` update files of two tensors (`rows`×4 and 4), random values; the flat arrays as well. */
function writeUpdates(clients: number, rows: number, seed: number): { job: Omit<FoldJob, 'strategy'>; flats: Float32Array[]; samples: number[] } {
  const dir = tempDir();
  const rand = mulberry32(seed);
  const flats: Float32Array[] = [];
  const samples: number[] = [];
  const updates: FoldJob['updates'] = [];
  for (let c = 0; c < clients; c++) {
    const kernel = Float32Array.from({ length: rows * 4 }, () => rand() * 2 - 1);
    const bias = Float32Array.from({ length: 4 }, () => rand() * 2 - 1);
    const n = 1 + Math.floor(rand() * 50);
    const file = join(dir, `d${c}.eftb`);
    writeFileSync(file, encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: [{ name: 'dense/kernel', shape: [rows, 4], data: kernel }, { name: 'dense/bias', shape: [4], data: bias }], meta: { ...META, sampleCount: n } })));
    const flat = new Float32Array(rows * 4 + 4);
    flat.set(kernel);
    flat.set(bias, rows * 4);
    flats.push(flat);
    samples.push(n);
    updates.push({ file, samples: n });
  }
  return { job: { shared: rows * 4 + 4, updates }, flats, samples };
}

describe('the round fold over update files', () => {
  const specs: StrategySpec[] = [{ name: 'fedavg' }, { name: 'fedavg-clipped', normBound: 1 }, { name: 'median' }, { name: 'trimmed-mean', trimShare: 0.2 }];
  for (const strategy of specs) {
    it(`${strategy.name}: in the worker, exactly what the strategy gives on the same arrays here`, async () => {
      const { job, flats, samples } = writeUpdates(9, 25, 7);
      const here = aggregate(strategyFor(strategy), job.shared, flats.map((delta, i) => ({ delta, samples: samples[i]! })));
      const there = await foldFilesInWorker({ ...job, strategy });
      expect(there.clients).toBe(9);
      expect(there.samples).toBe(samples.reduce((a, b) => a + b, 0));
      expect(there.info).toEqual(here.info);
      expect(Array.from(there.delta)).toEqual(Array.from(here.delta));
    });
  }

  it('keeps the event loop turning while it folds', async () => {
    // 24 updates of 400,000 values: a fold of a few hundred milliseconds in any thread.
    const { job } = writeUpdates(24, 100_000, 3);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    try {
      await foldFilesInWorker({ ...job, strategy: { name: 'median' } });
      const inWorker = ticks;
      ticks = 0;
      // The same fold on this thread: not one tick until it is done.
      await Promise.resolve().then(() => foldFiles({ ...job, strategy: { name: 'median' } }));
      expect(ticks).toBe(0);
      expect(inWorker).toBeGreaterThanOrEqual(3);
    } finally {
      clearInterval(timer);
    }
  });

  it('refuses a file that no longer reads, or does not fit the model, with a coded error naming it', async () => {
    const { job } = writeUpdates(3, 5, 1);
    writeFileSync(job.updates[1]!.file, Buffer.from('not an update'));
    await expect(foldFilesInWorker({ ...job, strategy: { name: 'fedavg' } })).rejects.toMatchObject({ code: 'EF_INTERNAL', message: expect.stringMatching(/aggregation failed/) as unknown });
    const other = writeUpdates(2, 5, 2).job;
    await expect(foldFilesInWorker({ ...other, shared: other.shared + 1, strategy: { name: 'fedavg' } })).rejects.toMatchObject({ code: 'EF_INTERNAL', message: expect.stringMatching(/d0\.eftb: 24 values, the model has 25/) as unknown });
    await expect(foldFilesInWorker({ ...other, shared: other.shared - 1, strategy: { name: 'median' } })).rejects.toMatchObject({ message: expect.stringMatching(/more values than the model/) as unknown });
  });
});
