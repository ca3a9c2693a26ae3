/**
 * Aggregation strategies and server optimizers against references written for obviousness (float64
 * double loops, a sorted JS array per coordinate), plus hand-computed cases and the behaviours the
 * fleet relies on: robustness, DP noise of the stated size, order independence, loud failures.
 */
import { describe, expect, it } from 'vitest';
import { StrategySpec, type ServerOptimizerSpec } from '../../proto/fl.js';
import { mulberry32 } from '../../common/random.js';
import { aggregate, strategyFor, type ClientUpdate } from '../../fleet-server/federated/strategy.js';
import { trimCount } from '../../fleet-server/federated/strategies/robust.js';
import { fromBytes, serverStep, toBytes, type ServerState } from '../../fleet-server/federated/server-opt.js';

// ---- references ----

function refFedAvg(updates: ClientUpdate[]): number[] {
  let total = 0;
  for (const u of updates) total += u.samples;
  return Array.from(updates[0]!.delta, (_, i) => {
    let s = 0;
    for (const u of updates) s += u.samples * u.delta[i]!;
    return s / total;
  });
}

function norm(delta: Float32Array): number {
  let sq = 0;
  for (const v of delta) sq += v * v;
  return Math.sqrt(sq);
}

function refClip(delta: Float32Array, bound: number): Float32Array {
  const norm2 = norm(delta);
  return Float32Array.from(delta, (v) => (norm2 > bound ? (v * bound) / norm2 : v));
}

function refMean(deltas: Float32Array[]): number[] {
  return Array.from(deltas[0]!, (_, i) => deltas.reduce((s, d) => s + d[i]!, 0) / deltas.length);
}

function sortedColumn(deltas: Float32Array[], i: number): number[] {
  return deltas.map((d) => d[i]!).sort((a, b) => a - b);
}

function refMedian(deltas: Float32Array[]): number[] {
  return Array.from(deltas[0]!, (_, i) => {
    const c = sortedColumn(deltas, i);
    const h = c.length >> 1;
    return c.length % 2 === 1 ? c[h]! : (c[h - 1]! + c[h]!) / 2;
  });
}

function refTrimmed(deltas: Float32Array[], k: number): number[] {
  return Array.from(deltas[0]!, (_, i) => {
    const kept = sortedColumn(deltas, i).slice(k, deltas.length - k);
    return kept.reduce((a, b) => a + b, 0) / kept.length;
  });
}

function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, rel = 1e-5, abs = 1e-6): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    if (!(Math.abs(a - e) <= abs + rel * Math.abs(e))) expect.fail(`coordinate ${i}: ${a}, expected ${e}`);
  }
}

function randomUpdates(seed: number, clients: number, params: number, scale = 1): ClientUpdate[] {
  const r = mulberry32(seed);
  return Array.from({ length: clients }, () => ({
    delta: Float32Array.from({ length: params }, () => (r() - 0.5) * scale),
    samples: 1 + Math.floor(r() * 500),
  }));
}

const f32 = (xs: number[]): Float32Array => Float32Array.from(xs);
const run = (spec: StrategySpec, updates: ClientUpdate[], seed = 1) => aggregate(strategyFor(spec, { random: mulberry32(seed) }), updates[0]!.delta.length, updates);
const deltas = (us: ClientUpdate[]): Float32Array[] => us.map((u) => u.delta);

// ---- strategies ----

describe('strategies against the references', () => {
  const shapes = [
    [1, 7],
    [2, 33],
    [5, 100],
    [16, 257],
    [33, 1000],
    [100, 300],
  ] as const;

  it.each(shapes)('fedavg, %i clients × %i params', (n, p) => {
    const us = randomUpdates(n * 1000 + p, n, p);
    const res = run({ name: 'fedavg' }, us);
    expectClose(res.delta, refFedAvg(us));
    expect(res.clients).toBe(n);
    expect(res.samples).toBe(us.reduce((s, u) => s + u.samples, 0));
  });

  it.each(shapes)('fedavg-clipped, %i clients × %i params', (n, p) => {
    const us = randomUpdates(n * 1000 + p + 1, n, p);
    const bound = 0.2 * Math.sqrt(p);
    const clipped = us.map((u) => ({ delta: refClip(u.delta, bound), samples: u.samples }));
    const res = run({ name: 'fedavg-clipped', normBound: bound }, us);
    expectClose(res.delta, refFedAvg(clipped));
    expect(res.info.clipped).toBe(us.filter((u) => norm(u.delta) > bound).length);
    expect(res.info.clipped).toBeGreaterThan(0);
  });

  it.each(shapes)('median, %i clients × %i params', (n, p) => {
    const us = randomUpdates(n * 1000 + p + 2, n, p);
    // The median is one of the inputs, or the mean of two: float32 rounding is the only difference.
    expect(run({ name: 'median' }, us).delta).toEqual(f32(refMedian(deltas(us))));
  });

  it.each(shapes)('trimmed-mean 0.2, %i clients × %i params', (n, p) => {
    const us = randomUpdates(n * 1000 + p + 3, n, p);
    const res = run({ name: 'trimmed-mean', trimShare: 0.2 }, us);
    expectClose(res.delta, refTrimmed(deltas(us), Math.floor(0.2 * n)));
    expect(res.info.trimmedEachSide).toBe(Math.floor(0.2 * n));
  });

  it.each(shapes)('dp-fedavg without noise is the clipped unweighted mean, %i clients × %i params', (n, p) => {
    const us = randomUpdates(n * 1000 + p + 4, n, p);
    const clip = 0.25 * Math.sqrt(p);
    const res = run({ name: 'dp-fedavg', clipNorm: clip, noiseMultiplier: 0, delta: 1e-5 }, us);
    expectClose(res.delta, refMean(us.map((u) => refClip(u.delta, clip))));
    expect(res.info.noiseStd).toBe(0);
  });

  it('coordinates full of ties (frozen layers, quantized values) select correctly', () => {
    const r = mulberry32(9);
    for (const n of [3, 8, 25, 64, 101]) {
      const us = Array.from({ length: n }, () => ({ delta: Float32Array.from({ length: 200 }, (_, i) => (i < 50 ? 0 : Math.round(r() * 4) - 2)), samples: 1 }));
      expect(run({ name: 'median' }, us).delta).toEqual(f32(refMedian(deltas(us))));
      expectClose(run({ name: 'trimmed-mean', trimShare: 0.3 }, us).delta, refTrimmed(deltas(us), trimCount(0.3, n)));
    }
  });
});

describe('bucketing before the robust rules', () => {
  /** Plainly: shuffle the indices as the fold does (Fisher–Yates, same draws), cut into groups, average each. */
  function refBuckets(ds: Float32Array[], size: number, seed: number): Float32Array[] {
    const random = mulberry32(seed);
    const order = ds.map((_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      const t = order[i]!;
      order[i] = order[j]!;
      order[j] = t;
    }
    const groups: Float32Array[] = [];
    for (let b = 0; b < order.length; b += size) groups.push(f32(refMean(order.slice(b, b + size).map((i) => ds[i]!))));
    return groups;
  }

  it.each([
    [2, 9, 50],
    [3, 16, 33],
    [4, 10, 100],
  ] as const)('bucket size %i, %i clients × %i params: the rule over the buckets’ means', (size, n, p) => {
    const us = randomUpdates(size * 100 + n, n, p);
    const groups = refBuckets(deltas(us), size, 5);
    const med = run({ name: 'median', bucketSize: size }, us, 5);
    expect(med.info.buckets).toBe(Math.ceil(n / size));
    expectClose(med.delta, refMedian(groups));
    const trimmed = run({ name: 'trimmed-mean', trimShare: 0.2, bucketSize: size }, us, 5);
    expectClose(trimmed.delta, refTrimmed(groups, trimCount(0.2, groups.length)));
    expect(trimmed.info).toEqual({ trimmedEachSide: trimCount(0.2, groups.length), buckets: groups.length });
  });

  it('one bucket holding every update is their unweighted mean; size 1 is no bucketing', () => {
    const us = randomUpdates(31, 7, 40);
    expectClose(run({ name: 'median', bucketSize: 64 }, us).delta, refMean(deltas(us)));
    expect(run({ name: 'median', bucketSize: 1 }, us).delta).toEqual(run({ name: 'median' }, us).delta);
    expect(run({ name: 'median', bucketSize: 1 }, us).info).toEqual({});
  });

  it('keeps a minority of huge updates out when size × attackers stays under half', () => {
    const r = mulberry32(4);
    const honest = Array.from({ length: 10 }, () => f32([1 + r() * 0.1, -1 - r() * 0.1]));
    const all = [...honest, f32([1e6, 1e6]), f32([-1e6, 1e6])].map((delta) => ({ delta, samples: 1 }));
    for (let seed = 1; seed <= 20; seed++) {
      const out = run({ name: 'median', bucketSize: 2 }, all, seed).delta;
      expect(out[0]).toBeGreaterThan(0.9);
      expect(out[0]).toBeLessThan(1.2);
      expect(out[1]).toBeLessThan(-0.9);
      expect(out[1]).toBeGreaterThan(-1.2);
    }
  });

  it('the schema refuses bucket sizes that are not whole numbers from 1 to 64', () => {
    for (const bucketSize of [0, 65, 1.5, -2]) expect(StrategySpec.safeParse({ name: 'median', bucketSize }).success).toBe(false);
    expect(StrategySpec.parse({ name: 'trimmed-mean', bucketSize: 3 })).toEqual({ name: 'trimmed-mean', trimShare: 0.2, bucketSize: 3 });
  });
});

describe('hand-computed cases', () => {
  it('fedavg weighs by samples', () => {
    const res = run({ name: 'fedavg' }, [
      { delta: f32([1, 2]), samples: 1 },
      { delta: f32([3, 6]), samples: 3 },
    ]);
    expect(res.delta).toEqual(f32([2.5, 5]));
  });

  it('fedavg-clipped scales a long update to the bound and leaves the caller its array', () => {
    const long = f32([3, 4]);
    const res = run({ name: 'fedavg-clipped', normBound: 1 }, [{ delta: long, samples: 5 }]);
    expectClose(res.delta, [0.6, 0.8]);
    expect(res.info.clipped).toBe(1);
    expect(long).toEqual(f32([3, 4]));
  });

  it('median: the middle value, or the mean of the two middle values', () => {
    const one = (xs: number[]) => xs.map((x) => ({ delta: f32([x]), samples: 1 }));
    expect(run({ name: 'median' }, one([1, 5, 3])).delta).toEqual(f32([3]));
    expect(run({ name: 'median' }, one([10, 1, 3, 2])).delta).toEqual(f32([2.5]));
  });

  it('trimmed-mean drops ⌊share·n⌋ at each end', () => {
    const us = [7, 1, 9, 3, 10, 2, 5, 4, 8, 6].map((x) => ({ delta: f32([x]), samples: 1 }));
    expect(run({ name: 'trimmed-mean', trimShare: 0.2 }, us).delta).toEqual(f32([5.5]));
  });

  it('trimmed-mean counts as a person would: 0.29 of 100 is 29', () => {
    expect(0.29 * 100).toBeLessThan(29);
    expect(trimCount(0.29, 100)).toBe(29);
    expect(trimCount(0.49, 2)).toBe(0);
    expect(trimCount(0.49, 3)).toBe(1);
  });

  it('trimmed-mean with trimShare 0 is the unweighted mean', () => {
    const us = randomUpdates(77, 9, 64);
    expectClose(run({ name: 'trimmed-mean', trimShare: 0 }, us).delta, refMean(deltas(us)));
  });

  it('the schema default trimShare is 0.2', () => {
    const s = strategyFor(StrategySpec.parse({ name: 'trimmed-mean' }));
    expect(s.spec).toEqual({ name: 'trimmed-mean', trimShare: 0.2 });
    expect(s.streaming).toBe(false);
  });
});

describe('robustness', () => {
  const honest = [f32([0.1, -0.2, 0.3]), f32([0.12, -0.25, 0.28]), f32([0.09, -0.18, 0.33])];
  const attackers = [f32([1e6, -1e6, 1e6]), f32([5e5, 5e5, -5e5])];
  const all = [...honest, ...attackers].map((delta) => ({ delta, samples: 1_000_000 }));
  const within = (out: Float32Array) => {
    for (let i = 0; i < 3; i++) {
      const col = honest.map((h) => h[i]!);
      expect(out[i]).toBeGreaterThanOrEqual(Math.min(...col));
      expect(out[i]).toBeLessThanOrEqual(Math.max(...col));
    }
  };

  it('the median of 3 honest and 2 huge updates stays in the honest range', () => within(run({ name: 'median' }, all).delta));
  it('so does the trimmed mean trimming 2 of 5 at each end', () => within(run({ name: 'trimmed-mean', trimShare: 0.4 }, all).delta));
  it('fedavg does not (which is why the others exist)', () => {
    expect(Math.abs(run({ name: 'fedavg' }, all).delta[0]!)).toBeGreaterThan(1000);
  });
});

describe('dp-fedavg noise', () => {
  it('has mean 0 and the stated std on the average', () => {
    const params = 200_000;
    const n = 4;
    const spec = { name: 'dp-fedavg', clipNorm: 2, noiseMultiplier: 1.5, delta: 1e-5 } as const;
    const zero = Array.from({ length: n }, () => ({ delta: new Float32Array(params), samples: 10 }));
    const res = run(spec, zero, 12345);
    expect(res.info.noiseStd).toBe((1.5 * 2) / n);
    let sum = 0;
    let sq = 0;
    for (const v of res.delta) {
      sum += v;
      sq += v * v;
    }
    const mean = sum / params;
    const std = Math.sqrt(sq / params - mean * mean);
    // Standard errors: 0.75/√2e5 ≈ 0.0017 on the mean, 0.16% relative on the std; 10 of them each.
    expect(Math.abs(mean)).toBeLessThan(0.017);
    expect(Math.abs(std / 0.75 - 1)).toBeLessThan(0.016);
  });

  it('draws from the given source and only from it', () => {
    const us = randomUpdates(5, 3, 50);
    const spec = { name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 } as const;
    expect(run(spec, us, 7).delta).toEqual(run(spec, us, 7).delta);
    expect(run(spec, us, 7).delta).not.toEqual(run(spec, us, 8).delta);
  });

  it('defaults to a cryptographic source: two folds never draw the same noise', () => {
    const s = strategyFor({ name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 });
    const zero = [{ delta: new Float32Array(64), samples: 1 }];
    expect(aggregate(s, 64, zero).delta).not.toEqual(aggregate(s, 64, zero).delta);
  });
});

describe('streaming', () => {
  const streaming: StrategySpec[] = [
    { name: 'fedavg' },
    { name: 'fedavg-clipped', normBound: 3 },
    { name: 'dp-fedavg', clipNorm: 3, noiseMultiplier: 0.7, delta: 1e-5 },
  ];

  it.each(streaming)('$name gives the same result whatever the order of adds', (spec) => {
    const us = randomUpdates(31, 40, 500, 4);
    const shuffled = [...us];
    const r = mulberry32(3);
    for (let i = shuffled.length - 1; i > 0; i--) {
      const j = Math.floor(r() * (i + 1));
      [shuffled[i], shuffled[j]] = [shuffled[j]!, shuffled[i]!];
    }
    expectClose(run(spec, shuffled, 99).delta, run(spec, us, 99).delta, 1e-6, 1e-7);
    expect(strategyFor(spec).streaming).toBe(true);
  });
});

describe('failures are loud', () => {
  const every: StrategySpec[] = [
    { name: 'fedavg' },
    { name: 'fedavg-clipped', normBound: 1 },
    { name: 'median' },
    { name: 'trimmed-mean', trimShare: 0.2 },
    { name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 1, delta: 1e-5 },
  ];

  it.each(every)('$name: wrong length, bad samples, no clients, reuse', (spec) => {
    const s = strategyFor(spec, { random: mulberry32(1) });
    const fold = s.begin(3);
    expect(() => fold.add({ delta: new Float32Array(4), samples: 1 })).toThrow(/4 values, the model has 3/);
    expect(() => fold.add({ delta: new Float32Array(3), samples: 0 })).toThrow(/samples/);
    expect(() => fold.add({ delta: new Float32Array(3), samples: NaN })).toThrow(/samples/);
    expect(() => fold.finish()).toThrow(/no updates/);
    expect(fold.count).toBe(0);
    fold.add({ delta: f32([1, 2, 3]), samples: 1 });
    expect(fold.count).toBe(1);
    fold.finish();
    expect(() => fold.finish()).toThrow(/twice/);
    expect(() => fold.add({ delta: f32([1, 2, 3]), samples: 1 })).toThrow(/after finish/);
    expect(() => s.begin(0)).toThrow(/params/);
  });

  it.each([{ name: 'median' }, { name: 'trimmed-mean', trimShare: 0.2 }] as StrategySpec[])('$name keeps its arrays, so it refuses memory it already holds', (spec) => {
    const fold = strategyFor(spec).begin(4);
    const pool = new Float32Array(12);
    fold.add({ delta: pool.subarray(0, 4), samples: 1 });
    fold.add({ delta: pool.subarray(4, 8), samples: 1 });
    expect(() => fold.add({ delta: pool.subarray(2, 6), samples: 1 })).toThrow(/overlaps/);
    expect(fold.count).toBe(2);
    fold.add({ delta: pool.subarray(8, 12), samples: 1 });
    expect(fold.finish().clients).toBe(3);
  });

  it.each(every)('$name: a NaN or ±Inf that slipped past the caller fails the aggregate', (spec) => {
    for (const bad of [NaN, Infinity]) {
      const us = [f32([0, 1]), f32([bad, 1]), f32([2, 1])].map((delta) => ({ delta, samples: 1 }));
      // Clipping an infinite update gives NaN; either way the result must not come out finite.
      expect(() => run(spec, us)).toThrow(/NaN|Inf/);
    }
  });
});

// ---- server optimizers ----

function refServer(spec: ServerOptimizerSpec, base: number[], deltas: number[][]): number[] {
  const n = base.length;
  let w = [...base];
  const m = new Array<number>(n).fill(0);
  const v = new Array<number>(n).fill(spec.name === 'sgd' ? 0 : spec.tau ** 2);
  for (const d of deltas) {
    w = w.map((_, i) => {
      if (spec.name === 'sgd') {
        m[i] = Math.fround(spec.momentum * m[i]! + d[i]!);
        return base[i]! + spec.learningRate * m[i];
      }
      const d2 = d[i]! * d[i]!;
      m[i] = Math.fround(spec.beta1 * m[i]! + (1 - spec.beta1) * d[i]!);
      v[i] = Math.fround(spec.name === 'adam' ? spec.beta2 * v[i]! + (1 - spec.beta2) * d2 : v[i]! - (1 - spec.beta2) * d2 * Math.sign(v[i]! - d2));
      return base[i]! + (spec.learningRate * m[i]) / (Math.sqrt(v[i]) + spec.tau);
    });
  }
  return w;
}

describe('server optimizers', () => {
  const specs: ServerOptimizerSpec[] = [
    { name: 'sgd', learningRate: 1, momentum: 0 },
    { name: 'sgd', learningRate: 0.5, momentum: 0.9 },
    { name: 'adam', learningRate: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
    { name: 'yogi', learningRate: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
  ];
  const r = mulberry32(4);
  const base = Float32Array.from({ length: 64 }, () => r() - 0.5);
  const rounds = Array.from({ length: 3 }, () => Float32Array.from({ length: 64 }, () => (r() - 0.5) * 0.1));

  it.each(specs)('$name (η $learningRate) follows the update rule over three rounds, from restored state each time', (spec) => {
    let state: ServerState | null = null;
    let weights: Float32Array = base;
    for (const d of rounds) {
      // The same base each round isolates the moment bookkeeping from the weights' history.
      const step = serverStep(spec, base, d, state === null ? null : fromBytes(toBytes(state)));
      expect(step.restarted).toBeNull();
      state = step.state;
      weights = step.weights;
    }
    expectClose(weights, refServer(spec, [...base], rounds.map((d) => [...d])), 1e-6, 1e-7);
    expect(state!.round).toBe(3);
  });

  it('sgd with η 1 and no momentum is base + Δ and keeps no vectors', () => {
    const step = serverStep({ name: 'sgd', learningRate: 1, momentum: 0 }, base, rounds[0]!, null);
    expect(step.weights).toEqual(Float32Array.from(base, (b, i) => b + rounds[0]![i]!));
    expect(step.state.m).toBeNull();
    expect(toBytes(step.state).length).toBe(16);
  });

  it('a state of another optimizer or size is set aside, and says why', () => {
    const adam = serverStep(specs[2]!, base, rounds[0]!, null).state;
    const yogi = serverStep(specs[3]!, base, rounds[1]!, adam);
    expect(yogi.restarted).toMatch(/adam/);
    expect(yogi.state.round).toBe(1);
    expect(yogi.weights).toEqual(serverStep(specs[3]!, base, rounds[1]!, null).weights);
    expect(serverStep(specs[2]!, base.subarray(1), rounds[0]!.subarray(1), adam).restarted).toMatch(/64 parameters/);
    expect(() => serverStep(specs[0]!, base, rounds[0]!.subarray(1), null)).toThrow(/63 values/);
  });

  it('fromBytes rejects what it did not write', () => {
    const bytes = toBytes(serverStep(specs[2]!, base, rounds[0]!, null).state);
    expect(() => fromBytes(bytes.subarray(0, bytes.length - 1))).toThrow(/bytes/);
    expect(() => fromBytes(Uint8Array.from([1, 2, 3]))).toThrow(/not a server optimizer state/);
    const wrongKind = bytes.slice();
    wrongKind[5] = 9;
    expect(() => fromBytes(wrongKind)).toThrow(/optimizer/);
  });
});
