import { fork } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { EdgefleetError, type ErrorCode, type EvalMetrics } from '../../proto/index.js';
import { compiledEntry } from '../../common/compiled.js';
import { trippedGate, type GateLimits, type GateReading } from './gates.js';
import type { EvalJob, TrainJob, TrainJobResult } from './job.js';
import type { StopReason } from './train.js';

/**
 * Runs a training job in a child process at the lowest CPU priority, watching the resource gates
 * while it trains. Off the serving path twice over: another process (TF.js and its WASM heap out
 * of the agent's), and a priority that hands every contested core to inference.
 */

/** `gates`: the child reads the device's gates itself; null when the parent does (an injected reader). */
export type ChildGates = { limits: GateLimits; intervalMs: number } | null;
export type ParentToChild =
  | { type: 'job'; job: TrainJob; niceness: number; gates: ChildGates }
  | { type: 'eval'; job: EvalJob; niceness: number; gates: ChildGates }
  | { type: 'stop'; reason: StopReason };
export type ChildToParent =
  | { type: 'started'; pid: number; niceness: number }
  | { type: 'progress'; steps: number; cpuMicros: number }
  | ({ type: 'result' } & TrainJobResult)
  | { type: 'evaluated'; metrics: EvalMetrics }
  | { type: 'error'; code: ErrorCode; message: string; details?: unknown };

export interface RunnerOptions {
  gates: GateLimits;
  /** How often the gates are read. */
  gateIntervalMs: number;
  /** Past the job's deadline by this much, the child is killed (it should have stopped at the deadline). */
  graceMs: number;
  /** Default 19, the lowest priority. */
  niceness?: number;
  /**
   * Injected in tests: the device's sensors, read here in the parent. Without it the child reads
   * them (systeminformation): reading temperature and battery spawns processes on some boards,
   * and a spawn from the serving process stalls its event loop for milliseconds, which showed as
   * inference p99 four times its idle value while training.
   */
  readGates?: () => Promise<GateReading>;
  clock?: () => number;
  onProgress?: (steps: number) => void;
  /** Once the child runs at its priority: its pid and niceness. */
  onStarted?: (child: { pid: number; niceness: number }) => void;
  /** Aborting kills the child at once (SIGKILL): the round was aborted, or the agent is stopping. */
  signal?: AbortSignal;
}

/** Resolves with the update, or rejects with an EdgefleetError (EF_TRAINING_FAILED unless the child said otherwise). */
export async function trainInChild(job: TrainJob, opts: RunnerOptions): Promise<TrainJobResult> {
  const r = await inChild({ type: 'job', job, niceness: opts.niceness ?? 19, gates: null }, job.deadlineAt, opts);
  if (r.type !== 'result') throw new EdgefleetError('EF_TRAINING_FAILED', 'the training child answered with something else');
  const { type: _, ...value } = r;
  return { ...value, bytes: new Uint8Array(value.bytes) };
}

/** Federated evaluation in the same low-priority child: the device's holdout through the base and the candidate. */
export async function evaluateInChild(job: EvalJob, deadlineAt: number, opts: RunnerOptions): Promise<EvalMetrics> {
  const r = await inChild({ type: 'eval', job, niceness: opts.niceness ?? 19, gates: null }, deadlineAt, opts);
  if (r.type !== 'evaluated') throw new EdgefleetError('EF_TRAINING_FAILED', 'the evaluation child answered with something else');
  return r.metrics;
}

function inChild(request: Extract<ParentToChild, { type: 'job' | 'eval' }>, deadlineAt: number, opts: RunnerOptions): Promise<Extract<ChildToParent, { type: 'result' | 'evaluated' }>> {
  const clock = opts.clock ?? Date.now;
  const read = opts.readGates;
  const cores = availableParallelism();
  return new Promise((resolve, reject) => {
    const child = fork(compiledEntry(import.meta.url, './child-main.js'), [], { execArgv: [], stdio: ['ignore', 'ignore', 'pipe', 'ipc'], serialization: 'advanced' });
    const kill = (): boolean => child.kill('SIGKILL');
    opts.signal?.addEventListener('abort', kill, { once: true });
    if (opts.signal?.aborted) kill();
    let stderr = '';
    let outcome: { ok: true; value: Extract<ChildToParent, { type: 'result' | 'evaluated' }> } | { ok: false; err: EdgefleetError } | null = null;
    let lastCpu = { micros: 0, at: performance.now() };
    let trainingShare = 0;
    let stopSent = false;
    const stop = (reason: StopReason): void => {
      if (stopSent || !child.connected) return;
      stopSent = true;
      child.send({ type: 'stop', reason } satisfies ParentToChild);
    };
    let reading = false;
    const gateTimer = setInterval(() => {
      if (clock() > deadlineAt + opts.graceMs) child.kill('SIGKILL');
      if (!read || reading) return;
      reading = true;
      read()
        .then((r) => {
          const tripped = trippedGate(r, opts.gates, trainingShare);
          if (tripped) stop(tripped);
        })
        .catch(() => undefined)
        .finally(() => (reading = false));
    }, opts.gateIntervalMs);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (c: string) => (stderr = (stderr + c).slice(-2000)));
    child.on('message', (m: ChildToParent) => {
      if (m.type === 'started') {
        opts.onStarted?.({ pid: m.pid, niceness: m.niceness });
      } else if (m.type === 'progress') {
        const now = performance.now();
        // The child's share of all cores since its last report: its own load, not the device's.
        if (now > lastCpu.at) trainingShare = (m.cpuMicros - lastCpu.micros) / 1000 / (now - lastCpu.at) / cores;
        lastCpu = { micros: m.cpuMicros, at: now };
        opts.onProgress?.(m.steps);
      } else if (m.type === 'result' || m.type === 'evaluated') {
        outcome ??= { ok: true, value: m };
      } else if (m.type === 'error') {
        outcome ??= { ok: false, err: new EdgefleetError(m.code, m.message, { details: m.details }) };
      }
    });
    child.on('close', (code, signal) => {
      clearInterval(gateTimer);
      opts.signal?.removeEventListener('abort', kill);
      if (outcome?.ok) return resolve(outcome.value);
      if (outcome) return reject(outcome.err);
      const how = signal ? `killed by ${signal}` : `exited with code ${code}`;
      reject(new EdgefleetError('EF_TRAINING_FAILED', `the training child ${how} before reporting${stderr ? `; stderr: ${stderr.trim()}` : ''}`));
    });
    child.send({ ...request, gates: read ? null : { limits: opts.gates, intervalMs: opts.gateIntervalMs } });
  });
}
