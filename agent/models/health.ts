import type { HealthPolicy, Histogram, Manifest } from '../../proto/index.js';
import { argmaxAt } from '../runtime/tensor.js';
import type { TensorMap } from '../runtime/types.js';

/** Latency samples kept per version: enough for a stable p95, small enough to sort at every check. */
const LATENCY_RING = 1024;
/** Values (or, for `:argmax` baselines, rows) a PSI needs before it counts. */
const MIN_PSI_OBSERVATIONS = 50;

export type CheckName = 'golden' | 'latency' | 'latency-vs-previous' | 'errors' | 'nan' | 'memory' | 'psi' | 'confidence';

export interface CheckFailure {
  check: CheckName;
  value: number;
  limit: number;
  detail?: string;
}

export interface HealthFigures {
  requests: number;
  errors: number;
  nonFinite: number;
  p95Ms: number | null;
  previousP95Ms: number | null;
  memoryGrowthMb: number;
  psi: Record<string, number>;
  meanConfidence: number | null;
}

export interface Verdict {
  ok: boolean;
  failures: CheckFailure[];
  figures: HealthFigures | null;
}

/** What one request's outputs showed: whether any value was not finite, and its rows' confidence. */
export interface OutputScan {
  nonFinite: boolean;
  confidenceSum: number;
  confidenceN: number;
}

/**
 * What one version did while it served: latencies, errors, non-finite outputs, output histograms
 * on the baseline's bins, confidence. Observing a request costs a few array writes; the outputs
 * are scanned once for non-finite values and binned for PSI.
 */
export class VersionStats {
  requests = 0;
  errors = 0;
  nonFinite = 0;
  private readonly latencies = new Float64Array(LATENCY_RING);
  private latencyCount = 0;
  private readonly counts = new Map<string, Float64Array>();
  /** Outputs whose winning class is binned (baseline key `<name>:argmax`), with their class counts. */
  private readonly argmax = new Map<string, Float64Array>();
  private confidenceSum = 0;
  private confidenceN = 0;
  readonly rssAtStart: number;

  constructor(
    private readonly manifest: Manifest,
    rss = process.memoryUsage.rss(),
  ) {
    this.rssAtStart = rss;
    for (const [key, h] of Object.entries(manifest.baseline.outputs)) {
      if (key.endsWith(':argmax')) this.argmax.set(key.slice(0, -7), new Float64Array(h.probs.length));
      else this.counts.set(key, new Float64Array(h.probs.length));
    }
  }

  /**
   * Counts a request whose outputs another record scanned already (after commit the watch window
   * scans them): latency, the request, what the scan found. No histograms: PSI is the window's.
   */
  observeScanned(latencyMs: number, scan: OutputScan): void {
    this.requests++;
    this.latencies[this.latencyCount++ % LATENCY_RING] = latencyMs;
    if (scan.nonFinite) this.nonFinite++;
    this.confidenceSum += scan.confidenceSum;
    this.confidenceN += scan.confidenceN;
  }

  /** Counts a request and scans its outputs; returns what the scan found, for `observeScanned`. */
  observe(latencyMs: number, outputs: TensorMap): OutputScan {
    let bad = false;
    let confidenceSum = 0;
    let confidenceN = 0;
    for (const name in outputs) {
      const t = outputs[name];
      if (!t || t.data instanceof BigInt64Array) continue;
      const data = t.data;
      const bins = this.counts.get(name);
      const h = bins ? this.manifest.baseline.outputs[name] : undefined;
      for (let i = 0; i < data.length; i++) {
        const v = data[i] as number;
        if (!Number.isFinite(v)) {
          bad = true;
          continue;
        }
        if (bins && h) bins[binOf(h.edges, v)]! += 1;
      }
    }
    for (const [name, classes] of this.argmax) {
      const t = outputs[name];
      const k = classes.length;
      if (!t || t.data instanceof BigInt64Array || t.data.length % k !== 0) continue;
      for (let r = 0; r < t.data.length; r += k) classes[argmaxAt(t.data, r, k)]! += 1;
    }
    const conf = this.manifest.health.confidenceOutput;
    if (conf !== undefined) {
      const t = outputs[conf];
      if (t && !(t.data instanceof BigInt64Array)) {
        const last = t.shape.length > 0 ? (t.shape[t.shape.length - 1] as number) : 1;
        const rows = last > 0 ? t.data.length / last : 0;
        for (let r = 0; r < rows; r++) {
          let max = -Infinity;
          for (let j = 0; j < last; j++) max = Math.max(max, t.data[r * last + j] as number);
          if (Number.isFinite(max)) {
            confidenceSum += max;
            confidenceN++;
          }
        }
      }
    }
    const scan = { nonFinite: bad, confidenceSum, confidenceN };
    this.observeScanned(latencyMs, scan);
    return scan;
  }

  error(): void {
    this.requests++;
    this.errors++;
  }

  p95(): number | null {
    return this.quantile(0.95);
  }

  p50(): number | null {
    return this.quantile(0.5);
  }

  private quantile(q: number): number | null {
    const n = Math.min(this.latencyCount, LATENCY_RING);
    if (n < 20) return null;
    const sorted = this.latencies.slice(0, n).sort();
    return sorted[Math.min(n - 1, Math.floor(n * q))] as number;
  }

  psi(): Record<string, number> {
    const out: Record<string, number> = {};
    const all = [...this.counts, ...[...this.argmax].map(([name, c]) => [`${name}:argmax`, c] as const)];
    for (const [name, bins] of all) {
      const h = this.manifest.baseline.outputs[name];
      const total = bins.reduce((a, b) => a + b, 0);
      // Fewer observations than this and a ten-bin PSI is mostly sampling noise.
      if (!h || total < MIN_PSI_OBSERVATIONS) continue;
      out[name] = psi(h, bins, total);
    }
    return out;
  }

  meanConfidence(): number | null {
    return this.confidenceN >= 10 ? this.confidenceSum / this.confidenceN : null;
  }
}

function binOf(edges: number[], v: number): number {
  // Bins are [e0,e1) ... [e(n-1), en]; values outside go to the end bins.
  const last = edges.length - 2;
  if (v < (edges[1] as number)) return 0;
  if (v >= (edges[last] as number)) return last;
  let lo = 1;
  let hi = last;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (v >= (edges[mid] as number)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Population stability index, with the usual floor of 1e-4 per bin so empty bins do not blow up. */
export function psi(baseline: Histogram, counts: ArrayLike<number>, total: number): number {
  let sum = 0;
  for (let i = 0; i < baseline.probs.length; i++) {
    const e = Math.max(baseline.probs[i] as number, 1e-4);
    const a = Math.max((counts[i] as number) / total, 1e-4);
    sum += (a - e) * Math.log(a / e);
  }
  return sum;
}

/**
 * Judges a version against its manifest's policy and the previous version's record on this
 * device. `final` is set at the end of a window: checks that need many samples (PSI, confidence,
 * latency) only count then, or once enough samples have arrived; error and NaN rates count at once.
 */
/** What the latency comparison needs of the previous version: its live stats, or the figures kept from its probation. */
export interface LatencyRecord {
  p50(): number | null;
  p95(): number | null;
}

export function latencyRecord(figures: { p50Ms: number; p95Ms: number }): LatencyRecord {
  return { p50: () => figures.p50Ms, p95: () => figures.p95Ms };
}

export function judge(policy: HealthPolicy, stats: VersionStats, previous: LatencyRecord | null, final: boolean, rss = process.memoryUsage.rss()): Verdict {
  const failures: CheckFailure[] = [];
  const p95 = stats.p95();
  const prevP95 = previous?.p95() ?? null;
  const growth = (rss - stats.rssAtStart) / (1024 * 1024);
  const psis = stats.psi();
  const conf = stats.meanConfidence();
  const n = stats.requests;
  const enough = final || n >= Math.max(policy.probationRequests, 20);
  if (n > 0) {
    const errRate = stats.errors / n;
    // One error in a handful of requests is a rate of 20 %: judge the rate only once it means something, except at zero tolerance.
    if ((enough || policy.errorRateMax === 0) && errRate > policy.errorRateMax) failures.push({ check: 'errors', value: errRate, limit: policy.errorRateMax });
    const nanRate = stats.nonFinite / n;
    if ((enough || policy.nanRateMax === 0) && nanRate > policy.nanRateMax) failures.push({ check: 'nan', value: nanRate, limit: policy.nanRateMax });
  }
  if (growth > policy.memoryGrowthMb) failures.push({ check: 'memory', value: round(growth), limit: policy.memoryGrowthMb });
  if (enough && p95 !== null) {
    if (policy.latencyP95Ms !== undefined && p95 > policy.latencyP95Ms) failures.push({ check: 'latency', value: round(p95), limit: policy.latencyP95Ms });
    // Against the previous version, the median must have moved too: a busy device stretches the
    // tail of every version alike (the two were measured at different times), a slower model
    // moves the whole distribution.
    const p50 = stats.p50() ?? 0;
    const prevP50 = previous?.p50() ?? null;
    const slower = (a: number, b: number): boolean => a > b * policy.latencyRatioMax && a - b > policy.latencySlackMs;
    if (prevP95 !== null && prevP50 !== null && prevP95 > 0 && slower(p95, prevP95) && slower(p50, prevP50)) {
      failures.push({
        check: 'latency-vs-previous',
        value: round(p95 / prevP95),
        limit: policy.latencyRatioMax,
        detail: `p95 ${round(p95)} ms against ${round(prevP95)} ms, p50 ${round(p50)} ms against ${round(prevP50)} ms`,
      });
    }
  }
  if (enough) {
    for (const [name, value] of Object.entries(psis)) if (value > policy.psiMax) failures.push({ check: 'psi', value: round(value), limit: policy.psiMax, detail: name });
    if (policy.minMeanConfidence !== undefined && conf !== null && conf < policy.minMeanConfidence) {
      failures.push({ check: 'confidence', value: round(conf), limit: policy.minMeanConfidence });
    }
  }
  return {
    ok: failures.length === 0,
    failures,
    figures: {
      requests: n,
      errors: stats.errors,
      nonFinite: stats.nonFinite,
      p95Ms: p95 === null ? null : round(p95),
      previousP95Ms: prevP95 === null ? null : round(prevP95),
      memoryGrowthMb: round(growth),
      psi: Object.fromEntries(Object.entries(psis).map(([k, v]) => [k, round(v)])),
      meanConfidence: conf === null ? null : round(conf),
    },
  };
}

function round(x: number): number {
  return Math.round(x * 1000) / 1000;
}
