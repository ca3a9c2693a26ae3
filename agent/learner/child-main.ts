import { setPriority } from 'node:os';
import { EXIT, isEdgefleetError } from '../../proto/index.js';
import type { StopReason } from './train.js';
import { runEvalJob, runTrainJob, type EvalJob, type TrainJob } from './job.js';
import type { ChildToParent, ParentToChild } from './runner.js';

/**
 * The training child: takes one job over IPC, trains at the lowest CPU priority, reports progress
 * (steps and its own CPU time, so the parent can tell its load from the device's) and the result,
 * exits. Inference stays in the agent's process and wins every contest for a core.
 */

function send(m: ChildToParent): Promise<void> {
  return new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()));
}

let stopReason: StopReason | null = null;

function lowerPriority(niceness: number): void {
  try {
    // Our own pid (0): nice 19 is the lowest priority; lowering it needs no privilege.
    setPriority(0, niceness);
  } catch {
    // A platform without priorities trains at normal priority; the gates still apply.
  }
}

async function evaluateJob(job: EvalJob, niceness: number): Promise<void> {
  lowerPriority(niceness);
  try {
    await send({ type: 'evaluated', metrics: await runEvalJob(job) });
  } catch (err) {
    await send({ type: 'error', code: isEdgefleetError(err) ? err.code : 'EF_TRAINING_FAILED', message: err instanceof Error ? err.message : String(err) });
  }
  process.exit(EXIT.OK);
}

async function run(job: TrainJob, niceness: number): Promise<void> {
  lowerPriority(niceness);
  try {
    const result = await runTrainJob(job, {
      shouldStop: () => stopReason,
      onStep: (steps) => {
        const cpu = process.cpuUsage();
        void send({ type: 'progress', steps, cpuMicros: cpu.user + cpu.system });
      },
    });
    await send({ type: 'result', ...result });
  } catch (err) {
    const code = isEdgefleetError(err) ? err.code : 'EF_TRAINING_FAILED';
    await send({ type: 'error', code, message: err instanceof Error ? err.message : String(err) });
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
  else if (m.type === 'job') void run(m.job, m.niceness);
  else if (m.type === 'eval') void evaluateJob(m.job, m.niceness);
});
