import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { FRAME_FL_UPDATE, decodeFlFrame, EdgefleetError, type StrategySpec } from '../../proto/index.js';
import { compiledEntry } from '../../common/compiled.js';
import { strategyFor, type AggregateResult } from './strategy.js';

/**
 * A round's fold, over the update files the intake wrote, in a worker thread. The fleet's event
 * loop carries every device's reports, the operators' requests and the rollouts; reading and
 * folding a hundred 4 MB updates on it held all of that for the whole fold (a second and more, and
 * several for the robust strategies). In the worker the loop keeps turning, and the decoded updates
 * live and die in the worker's heap.
 */

export interface FoldJob {
  strategy: StrategySpec;
  /** Length of the shared (non-personal) parameters: the tensors of every update, concatenated. */
  shared: number;
  /** In the order they are folded; each file is an `up/update` frame as the intake accepted it. */
  updates: { file: string; samples: number }[];
}

export type FoldReply = { ok: true; result: AggregateResult } | { ok: false; message: string };

/** The fold itself, in whichever thread calls it: read each file, flatten its tensors, add. */
export function foldFiles(job: FoldJob): AggregateResult {
  const fold = strategyFor(job.strategy).begin(job.shared);
  for (const u of job.updates) {
    const bundle = decodeFlFrame(FRAME_FL_UPDATE, readFileSync(u.file));
    // A fresh array per update: a non-streaming fold keeps the ones it is given.
    const flat = new Float32Array(job.shared);
    let at = 0;
    for (const t of bundle.tensors) {
      if (at + t.data.length > job.shared) throw new Error(`${u.file}: more values than the model's ${job.shared} shared parameters`);
      flat.set(t.data, at);
      at += t.data.length;
    }
    if (at !== job.shared) throw new Error(`${u.file}: ${at} values, the model has ${job.shared} shared parameters`);
    fold.add({ delta: flat, samples: u.samples });
  }
  return fold.finish();
}

/**
 * `foldFiles` in a worker thread. Rejects with EF_INTERNAL when the fold throws (an update the
 * intake accepted no longer reads, or the strategy refused one) or the worker dies; the round
 * then fails with that reason rather than registering a wrong candidate.
 */
export function foldFilesInWorker(job: FoldJob): Promise<AggregateResult> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(compiledEntry(import.meta.url, './fold-worker.js'), { workerData: job });
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      fn();
    };
    worker.once('message', (m: FoldReply) => settle(() => (m.ok ? resolve(m.result) : reject(new EdgefleetError('EF_INTERNAL', `aggregation failed: ${m.message}`)))));
    worker.once('error', (err) => settle(() => reject(new EdgefleetError('EF_INTERNAL', `aggregation worker failed: ${err.message}`, { cause: err }))));
    worker.once('exit', (code) => settle(() => reject(new EdgefleetError('EF_INTERNAL', `aggregation worker exited with code ${code} before answering`))));
  });
}
