/**
 * For any updates: every strategy agrees with a plainly written reference, the coordinate-wise
 * results lie within the inputs' range, sgd with η 1 is base + Δ, and optimizer state survives
 * its byte form exactly.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mulberry32 } from '../../common/random.js';
import { aggregate, strategyFor, type ClientUpdate } from '../../fleet-server/federated/strategy.js';
import { trimCount } from '../../fleet-server/federated/strategies/robust.js';
import { fromBytes, serverStep, toBytes, type ServerState } from '../../fleet-server/federated/server-opt.js';
import type { ServerOptimizerSpec, StrategySpec } from '../../proto/fl.js';

const RUNS = 300;

function column(us: ClientUpdate[], i: number): number[] {
  return us.map((u) => u.delta[i]!).sort((a, b) => a - b);
}

function clip(d: Float32Array, bound: number): number[] {
  let sq = 0;
  for (const v of d) sq += v * v;
  const norm = Math.sqrt(sq);
  return Array.from(d, (v) => (norm > bound ? (v * bound) / norm : v));
}

/** The references: one plain loop per coordinate, in float64. */
function reference(spec: StrategySpec, us: ClientUpdate[]): number[] {
  const params = us[0]!.delta.length;
  const n = us.length;
  const out: number[] = [];
  for (let i = 0; i < params; i++) {
    const c = column(us, i);
    switch (spec.name) {
      case 'fedavg':
      case 'fedavg-clipped': {
        const bound = spec.name === 'fedavg-clipped' ? spec.normBound : Infinity;
        let num = 0;
        let den = 0;
        for (const u of us) {
          num += u.samples * clip(u.delta, bound)[i]!;
          den += u.samples;
        }
        out.push(num / den);
        break;
      }
      case 'dp-fedavg':
        out.push(us.reduce((s, u) => s + clip(u.delta, spec.clipNorm)[i]!, 0) / n);
        break;
      case 'median':
        out.push(n % 2 ? c[(n - 1) / 2]! : (c[n / 2 - 1]! + c[n / 2]!) / 2);
        break;
      case 'trimmed-mean': {
        const k = trimCount(spec.trimShare, n);
        const kept = c.slice(k, n - k);
        out.push(kept.reduce((a, b) => a + b, 0) / kept.length);
        break;
      }
    }
  }
  return out;
}

/** float32 values, with ties common: quantized updates and frozen layers repeat values. */
const value = fc.oneof(fc.float({ min: -1000, max: 1000, noNaN: true }), fc.constantFrom(0, 1, -1, 0.5));

const updates = fc
  .record({ clients: fc.integer({ min: 1, max: 24 }), params: fc.integer({ min: 1, max: 40 }) })
  .chain(({ clients, params }) =>
    fc.array(
      fc.record({
        delta: fc.array(value, { minLength: params, maxLength: params }).map((xs) => Float32Array.from(xs)),
        samples: fc.integer({ min: 1, max: 10_000 }),
      }),
      { minLength: clients, maxLength: clients },
    ),
  );

const spec: fc.Arbitrary<StrategySpec> = fc.oneof(
  fc.constant({ name: 'fedavg' as const }),
  fc.double({ min: 0.01, max: 1e4, noNaN: true }).map((normBound) => ({ name: 'fedavg-clipped' as const, normBound })),
  fc.constant({ name: 'median' as const }),
  fc.double({ min: 0, max: 0.49, noNaN: true }).map((trimShare) => ({ name: 'trimmed-mean' as const, trimShare })),
  fc.double({ min: 0.01, max: 1e4, noNaN: true }).map((clipNorm) => ({ name: 'dp-fedavg' as const, clipNorm, noiseMultiplier: 0, delta: 1e-5 })),
);

describe('strategies (property)', () => {
  it('every strategy equals its reference', () => {
    fc.assert(
      fc.property(spec, updates, (s, us) => {
        const got = aggregate(strategyFor(s, { random: mulberry32(1) }), us[0]!.delta.length, us).delta;
        const want = reference(s, us);
        for (let i = 0; i < want.length; i++) {
          // Sums in another order differ by a few ulps of the largest input, not of the result; the
          // result is float32, so below its smallest subnormal (1.4e-45) the difference is rounding.
          const scale = Math.max(...column(us, i).map(Math.abs));
          expect(Math.abs(got[i]! - want[i]!)).toBeLessThanOrEqual(1e-6 * scale + Math.abs(want[i]!) * 1e-6 + 3e-45);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('median, trimmed mean and fedavg lie within each coordinate’s [min, max]', () => {
    const robust = fc.oneof(fc.constant<StrategySpec>({ name: 'fedavg' }), fc.constant<StrategySpec>({ name: 'median' }), fc.double({ min: 0, max: 0.49, noNaN: true }).map((trimShare): StrategySpec => ({ name: 'trimmed-mean', trimShare })));
    fc.assert(
      fc.property(robust, updates, (s, us) => {
        const got = aggregate(strategyFor(s), us[0]!.delta.length, us).delta;
        got.forEach((v, i) => {
          const c = column(us, i);
          expect(v).toBeGreaterThanOrEqual(c[0]!);
          expect(v).toBeLessThanOrEqual(c[c.length - 1]!);
        });
      }),
      { numRuns: RUNS },
    );
  });
});

const vector = (n: number) => fc.array(fc.float({ min: -100, max: 100, noNaN: true }), { minLength: n, maxLength: n }).map((xs) => Float32Array.from(xs));

const optimizer: fc.Arbitrary<ServerOptimizerSpec> = fc.oneof(
  fc.record({ name: fc.constant('sgd' as const), learningRate: fc.double({ min: 0.01, max: 2, noNaN: true }), momentum: fc.double({ min: 0, max: 0.99, noNaN: true }) }),
  fc.record({
    name: fc.constantFrom('adam' as const, 'yogi' as const),
    learningRate: fc.double({ min: 1e-4, max: 1, noNaN: true }),
    beta1: fc.double({ min: 0, max: 0.99, noNaN: true }),
    beta2: fc.double({ min: 0, max: 0.999, noNaN: true }),
    tau: fc.double({ min: 1e-6, max: 1, noNaN: true }),
  }),
);

describe('server optimizers (property)', () => {
  it('sgd with η 1 and no momentum is exactly base + Δ', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 64 }).chain((n) => fc.tuple(vector(n), vector(n))), ([base, delta]) => {
        const { weights } = serverStep({ name: 'sgd', learningRate: 1, momentum: 0 }, base, delta, null);
        expect(weights).toEqual(Float32Array.from(base, (b, i) => b + delta[i]!));
      }),
      { numRuns: RUNS },
    );
  });

  it('state round-trips through bytes exactly, and a restored run continues as an unbroken one', () => {
    fc.assert(
      fc.property(
        optimizer,
        fc.integer({ min: 1, max: 32 }).chain((n) => fc.tuple(vector(n), fc.array(vector(n), { minLength: 1, maxLength: 4 }))),
        (spec, [base, deltas]) => {
          let kept: ServerState | null = null;
          let restored: ServerState | null = null;
          for (const d of deltas) {
            const a = serverStep(spec, base, d, kept);
            const b = serverStep(spec, base, d, restored === null ? null : fromBytes(toBytes(restored)));
            expect(b.weights).toEqual(a.weights);
            kept = a.state;
            restored = b.state;
          }
          expect(fromBytes(toBytes(kept!))).toEqual(kept);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
