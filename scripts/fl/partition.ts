import { mulberry32, normalSampler } from '../../common/random.js';

/**
 * Non-IID partitions of a labelled dataset across simulated clients, as the federated learning
 * literature builds them.
 */

/**
 * Label-skewed shards (McMahan et al., 2017, §3 "pathological non-IID"): rows sorted by label, cut
 * into `clients × shardsPerClient` equal shards, each client given `shardsPerClient` random
 * shards, so most clients see only that many digits. Returns each client's row indices.
 */
export function labelShards(labels: ArrayLike<number>, clients: number, shardsPerClient: number, seed: number): number[][] {
  const rows = Array.from({ length: labels.length }, (_, i) => i);
  // Stable by label, then by index: the same seed always gives the same shards.
  rows.sort((a, b) => labels[a]! - labels[b]! || a - b);
  const shards = clients * shardsPerClient;
  const size = Math.floor(rows.length / shards);
  const ids = Array.from({ length: shards }, (_, i) => i);
  const rand = mulberry32(seed);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [ids[i], ids[j]] = [ids[j]!, ids[i]!];
  }
  return Array.from({ length: clients }, (_, c) => ids.slice(c * shardsPerClient, (c + 1) * shardsPerClient).flatMap((s) => rows.slice(s * size, (s + 1) * size)));
}

/** How many distinct labels each client holds, and the largest share one label takes: a check that the skew is real. */
export function skewOf(labels: ArrayLike<number>, parts: number[][]): { meanLabelsPerClient: number; meanTopLabelShare: number } {
  let labelsSum = 0;
  let topSum = 0;
  for (const rows of parts) {
    const counts = new Map<number, number>();
    for (const r of rows) counts.set(labels[r]!, (counts.get(labels[r]!) ?? 0) + 1);
    labelsSum += counts.size;
    topSum += Math.max(...counts.values()) / rows.length;
  }
  return { meanLabelsPerClient: labelsSum / parts.length, meanTopLabelShare: topSum / parts.length };
}

/**
 * Dirichlet label skew (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
 * Distribution"): for every label, its rows are split across clients in proportions drawn from
 * Dir(α). α 0.5 leaves most clients with two or three dominant digits and a few of the others;
 * small α tends to the shards above, large α to IID.
 */
export function dirichletLabels(labels: ArrayLike<number>, clients: number, alpha: number, seed: number, minRows = 1): number[][] {
  // A client with (almost) nothing has nothing to train on; draw again, deterministically.
  for (let attempt = 0; attempt < 1000; attempt++) {
    const parts = dirichletOnce(labels, clients, alpha, seed + attempt * 7919);
    if (parts.every((p) => p.length >= minRows)) return parts;
  }
  throw new Error(`no Dirichlet(${alpha}) partition gives every one of ${clients} clients ${minRows} rows`);
}

function dirichletOnce(labels: ArrayLike<number>, clients: number, alpha: number, seed: number): number[][] {
  const rand = mulberry32(seed);
  const normal = normalSampler(rand);
  const byLabel = new Map<number, number[]>();
  for (let i = 0; i < labels.length; i++) {
    const l = labels[i]!;
    if (!byLabel.has(l)) byLabel.set(l, []);
    byLabel.get(l)!.push(i);
  }
  const parts: number[][] = Array.from({ length: clients }, () => []);
  for (const [, rows] of [...byLabel.entries()].sort((a, b) => a[0] - b[0])) {
    const g = Array.from({ length: clients }, () => gamma(alpha, rand, normal));
    const total = g.reduce((a, b) => a + b, 0);
    let start = 0;
    let acc = 0;
    g.forEach((x, c) => {
      acc += x / total;
      const end = c === clients - 1 ? rows.length : Math.round(acc * rows.length);
      parts[c]!.push(...rows.slice(start, end));
      start = end;
    });
  }
  return parts;
}

/** Gamma(α, 1) by Marsaglia and Tsang (2000); α < 1 through the boost Gamma(α+1)·U^(1/α). */
function gamma(alpha: number, rand: () => number, normal: () => number): number {
  if (alpha < 1) return gamma(alpha + 1, rand, normal) * Math.pow(rand() || 1e-12, 1 / alpha);
  const d = alpha - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      x = normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const u = rand();
    if (u < 1 - 0.0331 * x ** 4 || Math.log(u) < 0.5 * x * x + d * (1 - v + Math.log(v))) return d * v;
  }
}
