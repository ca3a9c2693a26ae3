import { readdirSync } from 'node:fs';
import { availableParallelism, setPriority } from 'node:os';
import { EXIT, isEdgefleetError } from '../../proto/index.js';
import type { StopReason } from './train.js';
import { runEvalJob, runTrainJob, type EvalJob, type TrainJob } from './job.js';
import type { ChildGates, ChildToParent, ParentToChild } from './runner.js';
import { readGates, trippedGate } from './gates.js';

/**
 * The training child: takes one job over IPC, trains at the lowest CPU priority, reports progress
 * (steps and its own CPU time, so the parent can tell its load from the device's) and the result,
 * exits. Inference stays in the agent's process and wins every contest for a core.
 */

function send(m: ChildToParent): Promise<void> {
  return new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()));
}

let stopReason: StopReason | null = null;
const PROGRESS_MS = 250;
let lastProgress = 0;

/**
 * The gates, read here rather than in the agent (see RunnerOptions.readGates). This process's own
 * CPU time is taken off the device's load: training is not the load it yields to.
 */
function watchGates(gates: ChildGates): void {
  if (!gates) return;
  const cores = availableParallelism();
  let last = { micros: cpuMicros(), at: performance.now() };
  // The first currentLoad() covers the time since boot; this one primes it.
  void readGates().catch(() => undefined);
  let reading = false;
  setInterval(() => {
    if (reading || stopReason) return;
    reading = true;
    readGates()
      .then((r) => {
        const now = { micros: cpuMicros(), at: performance.now() };
        const share = now.at > last.at ? (now.micros - last.micros) / 1000 / (now.at - last.at) / cores : 0;
        last = now;
        stopReason ??= trippedGate(r, gates.limits, share);
      })
      .catch(() => undefined)
      .finally(() => (reading = false));
  }, gates.intervalMs).unref();
}

function cpuMicros(): number {
  const c = process.cpuUsage();
  return c.user + c.system;
}

/** An error as the parent rebuilds it: code, message, and the details that say what kind it is. */
function errorMessage(err: unknown): ChildToParent {
  if (isEdgefleetError(err)) return { type: 'error', code: err.code, message: err.message, details: err.details };
  return { type: 'error', code: 'EF_TRAINING_FAILED', message: err instanceof Error ? err.message : String(err) };
}

/**
 * Nice 19, the lowest priority, for every thread of this process. On Linux a priority belongs to
 * a thread, and V8 starts its garbage-collector and compiler threads before any of our code runs:
 * lowering only the main thread left the collection of training's garbage at normal priority, and
 * inference p99 six times its idle value. Threads started later inherit from their creator.
 *
 * SCHED_IDLE on top (chrt --idle --all-tasks) was tried and measured no better, on two cores or
 * pinned to one: inference p99 while training was 4.8–6.9 ms with it and 5.0–6.5 ms without
 * (bench:fedavg's inference part, four runs each). What is left on two cores is the other core's
 * work on shared cache and memory, which no priority removes.
 */
function lowerPriority(niceness: number): void {
  let tids: number[] = [0];
  try {
    tids = readdirSync('/proc/self/task').map(Number);
  } catch {
    // Not Linux: the process's priority is the only one there is.
  }
  for (const tid of tids) {
    try {
      setPriority(tid, niceness);
    } catch {
      // A thread that ended meanwhile, or a platform without priorities: the gates still apply.
    }
  }
}

function started(niceness: number): void {
  lowerPriority(niceness);
  void send({ type: 'started', pid: process.pid, niceness });
}

async function evaluateJob(job: EvalJob, niceness: number): Promise<void> {
  started(niceness);
  try {
    await send({ type: 'evaluated', metrics: await runEvalJob(job) });
  } catch (err) {
    await send(errorMessage(err));
  }
  process.exit(EXIT.OK);
}

async function run(job: TrainJob, niceness: number, gates: ChildGates): Promise<void> {
  started(niceness);
  try {
    const result = await runTrainJob(job, {
      shouldStop: () => stopReason,
      onStep: (steps) => {
        // Watched from the first step: loading the model is not training.
        if (steps === 0) watchGates(gates);
        // At most a few a second: every message is work on the serving process's event loop.
        const now = performance.now();
        if (steps > 1 && now - lastProgress < PROGRESS_MS) return;
        lastProgress = now;
        void send({ type: 'progress', steps, cpuMicros: cpuMicros() });
      },
    });
    await send({ type: 'result', ...result });
  } catch (err) {
    await send(errorMessage(err));
  }
  process.exit(EXIT.OK);
}

if (!process.send) {
  process.stderr.write('learner child-main is started by trainInChild over IPC, not by hand\n');
  process.exit(EXIT.USAGE);
}
process.on('disconnect', () => process.exit(EXIT.OK));
process.on('message', (m: ParentToChild) => {
  if (m.type === 'stop') stopReason ??= m.reason;
  else if (m.type === 'job') void run(m.job, m.niceness, m.gates);
  else if (m.type === 'eval') void evaluateJob(m.job, m.niceness);
});
