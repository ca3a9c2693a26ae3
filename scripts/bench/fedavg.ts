#!/usr/bin/env node
/**
 * `npm run bench:fedavg [-- --quick]`: the fleet's aggregation and the device's training, each
 * against a baseline measured in the same run.
 *
 * - Throughput: streaming FedAvg over `clients` updates of `params` floats against a plain
 *   Float32Array summing loop over the same updates (the memory-bandwidth floor); median and
 *   trimmed mean (20 % each side) over the same updates, relative to FedAvg. Median of 5 repeats.
 * - Peak memory: streaming FedAvg of 10, 100 and 1,000 clients at `params`, each in a fresh
 *   process (RSS sampled after every update, and the kernel's maxRSS).
 * - Inference while training: the digits model served by the agent's TF.js runtime at one request
 *   every 10 ms, idle, then while the agent's low-priority training child trains it, then idle
 *   again (scripts/bench/fedavg-infer.ts).
 *
 * Goals: fedavg_ratio_to_sum_loop ≥ 0.6; peak_mb_1000_clients ≤ 1.2 × peak_mb_10_clients;
 * median and trimmed mean ≤ 5 × FedAvg; infer_p99_training_vs_idle ≤ 1.5. The last line of stdout
 * is one JSON object; progress goes to stderr.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { benchThroughput, type PeakMemoryResult } from './fedavg-aggregate.js';
import { benchInferenceWhileTraining } from './fedavg-infer.js';

const log = (line: string): void => void process.stderr.write(`${line}\n`);

/**
 * In a fresh process that loads only the aggregation code: this script's own imports (TF.js for the
 * inference part) would put a few hundred MB under the figure and hide what the fold uses.
 */
function peakInChild(params: number, clients: number): Promise<PeakMemoryResult> {
  const entry = pathToFileURL(fileURLToPath(new URL('./fedavg-aggregate.js', import.meta.url))).href;
  const code = `import { runPeakMemoryChild } from ${JSON.stringify(entry)}; runPeakMemoryChild(process.argv.slice(1));`;
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ['--input-type=module', '-e', code, '--', '--params', String(params), '--clients', String(clients)], (err, stdout) => {
      if (err) return reject(new Error(`peak-memory child: ${err.message}`));
      resolve(JSON.parse(stdout.trim().split('\n').at(-1) ?? '') as PeakMemoryResult);
    });
  });
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { quick: { type: 'boolean', default: false }, params: { type: 'string' }, clients: { type: 'string' } } });
  const params = Number(values.params ?? (values.quick ? 1 << 18 : 1 << 20));
  const clients = Number(values.clients ?? (values.quick ? 20 : 100));
  const peaks: Record<number, PeakMemoryResult> = {};
  for (const n of values.quick ? [10, 100] : [10, 100, 1000]) {
    peaks[n] = await peakInChild(params, n);
    log(`  peak RSS with ${n} clients: ${peaks[n].peakRssMB.toFixed(1)} MB`);
  }
  log(`throughput: ${clients} updates of ${params} floats`);
  const t = benchThroughput({ params, clients, seed: 1, repeats: values.quick ? 3 : 5 });
  log(`  sum loop ${t.sumLoopMs.toFixed(1)} ms, fedavg ${t.fedavgMs.toFixed(1)} ms, median ${t.medianMs.toFixed(1)} ms, trimmed ${t.trimmedMs.toFixed(1)} ms`);
  log('inference p99, idle and while training');
  const infer = await benchInferenceWhileTraining({ blockSec: values.quick ? 3 : 8, intervalMs: 10 });
  log(`  idle p99 ${infer.idle_p99_ms} ms, training p99 ${infer.training_p99_ms} ms (${infer.training_steps} training steps meanwhile)`);
  const big = peaks[1000] ?? peaks[100]!;
  const r = (x: number, d = 3): number => Number(x.toFixed(d));
  const result = {
    bench: 'fedavg',
    params,
    clients,
    sum_loop_ms: r(t.sumLoopMs, 1),
    fedavg_ms: r(t.fedavgMs, 1),
    fedavg_ratio_to_sum_loop: r(t.fedavg_ratio_to_sum_loop),
    median_cost_vs_fedavg: r(t.median_cost_vs_fedavg),
    trimmed_cost_vs_fedavg: r(t.trimmed_cost_vs_fedavg),
    peak_mb_10_clients: r(peaks[10]!.peakRssMB, 1),
    peak_mb_100_clients: r(peaks[100]!.peakRssMB, 1),
    peak_mb_1000_clients: peaks[1000] ? r(peaks[1000].peakRssMB, 1) : null,
    ...infer,
    met: {
      fedavg_ratio_to_sum_loop: t.fedavg_ratio_to_sum_loop >= 0.6,
      peak_flat: big.peakRssMB <= 1.2 * peaks[10]!.peakRssMB,
      median_cost_vs_fedavg: t.median_cost_vs_fedavg <= 5,
      trimmed_cost_vs_fedavg: t.trimmed_cost_vs_fedavg <= 5,
      infer_p99_training_vs_idle: infer.infer_p99_training_vs_idle <= 1.5,
    },
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
