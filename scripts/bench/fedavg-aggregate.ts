/**
 * Aggregation cost, as functions another script runs and prints (this file has no main).
 *
 * - benchThroughput: the same pre-generated updates folded by a plain `sum[i] += u[i]` loop into a
 *   Float32Array (the memory-bandwidth floor, measured in the same run), by streaming FedAvg, by the
 *   coordinate-wise median and by the trimmed mean (trimShare 0.2). Runs are interleaved (sum,
 *   fedavg, median, trimmed, then again) so drift in a shared machine's speed hits all four alike;
 *   each figure is the median of `repeats`. Goals: fedavg_ratio_to_sum_loop ≥ 0.6; median and
 *   trimmed ≤ 5× fedavg.
 * - peakMemoryOfFedAvg: peak RSS while folding `clients` updates of `params` into FedAvg, the
 *   updates made one at a time in one reused buffer, so the figure is the fold's own memory. Run it
 *   in a fresh process per client count (runPeakMemoryChild); goal: 1000 clients ≤ 1.2 × 10 clients.
 *
 * Data: per-client seeds and scales from mulberry32(seed); the values themselves from an inline
 * xorshift32 (Marsaglia, 2003), uniform in ±scale/2, because a billion mulberry32 calls would make
 * the 1000-client memory run mostly data generation. MB is 2^20 bytes.
 */
import { parseArgs } from 'node:util';
import { mulberry32 } from '../../common/random.js';
import { strategyFor, type ClientUpdate, type Strategy } from '../../fleet-server/federated/strategy.js';

export interface BenchOptions {
  params: number;
  clients: number;
  seed: number;
}

export interface ThroughputResult {
  params: number;
  clients: number;
  repeats: number;
  sumLoopMs: number;
  fedavgMs: number;
  medianMs: number;
  trimmedMs: number;
  fedavg_ratio_to_sum_loop: number;
  median_cost_vs_fedavg: number;
  trimmed_cost_vs_fedavg: number;
}

export interface PeakMemoryResult {
  params: number;
  clients: number;
  /** RSS before the fold's buffers existed. */
  baselineRssMB: number;
  /**
   * The largest RSS sampled after every add. Not the kernel's maxRSS: Linux carries it over from
   * the parent across fork and exec, so a child of a large process reported its parent's size.
   */
  peakRssMB: number;
  foldMs: number;
}

const MB = 1024 * 1024;

interface ClientPlan {
  seed: number;
  scale: number;
  samples: number;
}

function plan(seed: number, clients: number): ClientPlan[] {
  const r = mulberry32(seed);
  return Array.from({ length: clients }, () => ({ seed: (r() * 0xffffffff) | 1, scale: 0.5 + r(), samples: 10 + Math.floor(r() * 990) }));
}

function fill(out: Float32Array, p: ClientPlan): void {
  let x = p.seed | 0;
  const k = p.scale / 4294967296;
  for (let i = 0; i < out.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x * k;
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h]! : (s[h - 1]! + s[h]!) / 2;
}

function timed(work: () => void): number {
  const t0 = performance.now();
  work();
  return performance.now() - t0;
}

function fold(strategy: Strategy, params: number, updates: readonly ClientUpdate[]): Float32Array {
  const f = strategy.begin(params);
  for (const u of updates) f.add(u);
  return f.finish().delta;
}

function sumLoop(params: number, updates: readonly ClientUpdate[]): Float32Array {
  const sum = new Float32Array(params);
  for (const { delta } of updates) {
    for (let i = 0; i < params; i++) sum[i]! += delta[i]!;
  }
  return sum;
}

export function benchThroughput(opts: BenchOptions & { repeats?: number }): ThroughputResult {
  const { params, clients, seed } = opts;
  const repeats = opts.repeats ?? 5;
  const strategies = {
    fedavg: strategyFor({ name: 'fedavg' }),
    median: strategyFor({ name: 'median' }),
    trimmed: strategyFor({ name: 'trimmed-mean', trimShare: 0.2 }),
  };
  // Compile every loop on small inputs first, so the first timed repeat is not the JIT's.
  const small = plan(seed + 1, Math.min(clients, 16)).map((p) => {
    const delta = new Float32Array(4096);
    fill(delta, p);
    return { delta, samples: p.samples };
  });
  for (let i = 0; i < 3; i++) {
    sumLoop(4096, small);
    for (const s of Object.values(strategies)) fold(s, 4096, small);
  }

  const updates = plan(seed, clients).map((p) => {
    const delta = new Float32Array(params);
    fill(delta, p);
    return { delta, samples: p.samples };
  });
  const times = { sum: [] as number[], fedavg: [] as number[], median: [] as number[], trimmed: [] as number[] };
  for (let r = 0; r < repeats; r++) {
    times.sum.push(timed(() => sumLoop(params, updates)));
    times.fedavg.push(timed(() => fold(strategies.fedavg, params, updates)));
    times.median.push(timed(() => fold(strategies.median, params, updates)));
    times.trimmed.push(timed(() => fold(strategies.trimmed, params, updates)));
  }
  const sumLoopMs = median(times.sum);
  const fedavgMs = median(times.fedavg);
  const medianMs = median(times.median);
  const trimmedMs = median(times.trimmed);
  return {
    params,
    clients,
    repeats,
    sumLoopMs,
    fedavgMs,
    medianMs,
    trimmedMs,
    fedavg_ratio_to_sum_loop: sumLoopMs / fedavgMs,
    median_cost_vs_fedavg: medianMs / fedavgMs,
    trimmed_cost_vs_fedavg: trimmedMs / fedavgMs,
  };
}

export function peakMemoryOfFedAvg(opts: BenchOptions): PeakMemoryResult {
  const { params, clients, seed } = opts;
  const baselineRss = process.memoryUsage.rss();
  const buffer = new Float32Array(params);
  const f = strategyFor({ name: 'fedavg' }).begin(params);
  let peak = process.memoryUsage.rss();
  const t0 = performance.now();
  for (const p of plan(seed, clients)) {
    fill(buffer, p);
    f.add({ delta: buffer, samples: p.samples });
    peak = Math.max(peak, process.memoryUsage.rss());
  }
  f.finish();
  const foldMs = performance.now() - t0;
  peak = Math.max(peak, process.memoryUsage.rss());
  return { params, clients, baselineRssMB: baselineRss / MB, peakRssMB: peak / MB, foldMs };
}

/**
 * Entry for a forked child: `--params N --clients N [--seed N]` (or FL_BENCH_PARAMS, FL_BENCH_CLIENTS,
 * FL_BENCH_SEED); prints one JSON line, the PeakMemoryResult.
 */
export function runPeakMemoryChild(argv: string[] = process.argv.slice(1)): void {
  // slice(1) and positionals allowed: a forked script has its path at argv[1], `node -e` does not.
  const { values } = parseArgs({ args: argv, options: { params: { type: 'string' }, clients: { type: 'string' }, seed: { type: 'string' } }, strict: false, allowPositionals: true });
  const num = (name: string, v: unknown, env: string | undefined, fallback?: number): number => {
    const x = Number(typeof v === 'string' ? v : (env ?? fallback));
    if (!Number.isSafeInteger(x) || x < 0) throw new Error(`runPeakMemoryChild: --${name} must be a non-negative integer`);
    return x;
  };
  const result = peakMemoryOfFedAvg({
    params: num('params', values.params, process.env.FL_BENCH_PARAMS),
    clients: num('clients', values.clients, process.env.FL_BENCH_CLIENTS),
    seed: num('seed', values.seed, process.env.FL_BENCH_SEED, 1),
  });
  process.stdout.write(`${JSON.stringify(result)}\n`);
}
