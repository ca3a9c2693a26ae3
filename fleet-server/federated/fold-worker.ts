import { parentPort, workerData } from 'node:worker_threads';
import { foldFiles, type FoldJob, type FoldReply } from './fold-files.js';

/** The worker thread behind `foldFilesInWorker`: one fold, one reply (the result's array moved, not copied), then exit. */
if (!parentPort) throw new Error('fold-worker runs as a worker thread (foldFilesInWorker), not by hand');
let reply: FoldReply;
try {
  reply = { ok: true, result: foldFiles(workerData as FoldJob) };
} catch (err) {
  reply = { ok: false, message: err instanceof Error ? err.message : String(err) };
}
parentPort.postMessage(reply, reply.ok ? [reply.result.delta.buffer as ArrayBuffer] : []);
