/**
 * Properties of the sample store's parsers of outside input and of loadSamples. Labels: any value
 * is parsed without throwing, and what comes out is what the loss can use. Samples: random
 * sequences of labelled requests, API samples (some invalid) and clock moves, on a real SQLite
 * file, agree with a naive model of the bounds, and loadSamples never throws, returns unique keys
 * newest first and stays within the count bound.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { FeedbackStore } from '../../agent/api/feedback.js';
import { isTrainableLabel, parseLabel, type LoadSamplesOptions, type SampleLoss } from '../../agent/learner/sample-store.js';
import { isEdgefleetError } from '../../proto/index.js';

const LOSSES: SampleLoss[] = ['sparse-categorical-crossentropy', 'mean-squared-error'];
const INT32_MAX = 2 ** 31 - 1;

/** Labels near and far from what the losses take. */
const labelArb = fc.oneof(
  fc.nat(4),
  fc.integer({ min: -3, max: INT32_MAX }),
  fc.record({ class: fc.oneof(fc.nat(4), fc.double()) }),
  fc.array(fc.double({ min: -1e3, max: 1e3, noNaN: true }), { minLength: 1, maxLength: 3 }),
  fc.array(fc.oneof(fc.double(), fc.constant(null), fc.string()), { maxLength: 3 }),
  fc.double(),
  fc.constantFrom(1e39, -1e39, 'cat', null, true, {}, [], { class: '1' }),
  fc.jsonValue({ maxDepth: 2 }),
);

describe('label parser', () => {
  it('never throws, and returns only what the loss can use', () => {
    fc.assert(
      fc.property(fc.oneof(labelArb, fc.anything()), fc.constantFrom(...LOSSES), fc.integer({ min: 1, max: 4 }), (label, loss, width) => {
        const y = parseLabel(label, loss, width);
        if (y === null) return;
        if (loss === 'sparse-categorical-crossentropy') {
          expect(Number.isInteger(y) && (y as number) >= 0 && (y as number) <= INT32_MAX).toBe(true);
        } else {
          expect(Array.isArray(y) && y.length === width).toBe(true);
          for (const v of y as number[]) expect(Number.isFinite(v) && Math.fround(v) === v).toBe(true);
        }
        expect(isTrainableLabel(label)).toBe(true);
      }),
      { numRuns: 2000 },
    );
  });

  it('takes every class index, bare or as {"class": n}, and every finite float32 vector', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: INT32_MAX }), (n) => {
        expect(parseLabel(n, 'sparse-categorical-crossentropy')).toBe(n);
        expect(parseLabel({ class: n, score: 0.5 }, 'sparse-categorical-crossentropy')).toBe(n);
        expect(parseLabel(n + 0.5, 'sparse-categorical-crossentropy')).toBeNull();
      }),
    );
    fc.assert(
      fc.property(fc.array(fc.float({ noNaN: true, noDefaultInfinity: true }), { minLength: 1, maxLength: 8 }), (v) => {
        expect(parseLabel(v, 'mean-squared-error', v.length)).toEqual(v);
        expect(parseLabel(v, 'mean-squared-error', v.length + 1)).toBeNull();
        if (v.length === 1) expect(parseLabel(v[0], 'mean-squared-error', 1)).toEqual(v);
      }),
    );
  });
});

// ---------------------------------------------------------------------------------------------

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const MAX_SAMPLES = 6;
const MAX_AGE_SEC = 100;
const SHAPES = [[4], [2, 2], [1]];

type Op =
  | { kind: 'request'; id: number; shape: number; withInput: boolean; label: unknown }
  | { kind: 'api'; shape: number; poison: boolean; label: unknown }
  | { kind: 'tick'; ms: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ kind: fc.constant('request' as const), id: fc.nat(8), shape: fc.nat(2), withInput: fc.boolean(), label: labelArb }),
  fc.record({ kind: fc.constant('api' as const), shape: fc.nat(2), poison: fc.boolean(), label: labelArb }),
  fc.record({ kind: fc.constant('tick' as const), ms: fc.integer({ min: 0, max: 40_000 }) }),
);

const loadArb: fc.Arbitrary<LoadSamplesOptions> = fc.record(
  {
    featureShape: fc.constantFrom([4], [2, 2], [1], [-1], [-1, 2], [3]),
    loss: fc.constantFrom(...LOSSES),
    labelWidth: fc.integer({ min: 1, max: 3 }),
    classes: fc.integer({ min: 1, max: 5 }),
    limit: fc.integer({ min: 0, max: 10 }),
  },
  { requiredKeys: ['featureShape', 'loss'] },
);

/** One surviving sample in the naive model; `tag` is the value its input is filled with. */
interface Ref {
  tag: number;
  requestId: string | null;
  shape: string;
  label: unknown;
  ts: number;
}

describe('loadSamples over random inserts', () => {
  it('matches a naive model of the bounds, never throws, and keeps keys unique and newest first', () => {
    fc.assert(
      fc.property(fc.array(opArb, { maxLength: 40 }), fc.array(loadArb, { minLength: 1, maxLength: 4 }), (ops, loads) => {
        const dir = mkdtempSync(join(tmpdir(), 'edgefleet-samples-prop-'));
        dirs.push(dir);
        let now = 1_000_000;
        const store = FeedbackStore.open(dir, { maxSamplesPerModel: MAX_SAMPLES, maxSampleAgeSec: MAX_AGE_SEC, clock: () => now });
        let ref: Ref[] = [];
        const trim = () => {
          ref = ref.slice(-MAX_SAMPLES).filter((r) => r.ts >= now - MAX_AGE_SEC * 1000);
        };
        try {
          for (const [tag, op] of ops.entries()) {
            if (op.kind === 'tick') {
              now += op.ms;
              continue;
            }
            const shape = SHAPES[op.shape]!;
            const data = new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(tag);
            if (op.kind === 'request') {
              const id = `r${op.id}`;
              store.record(id, 'm', 1, op.withInput ? { data, featureShape: shape } : undefined);
              const text = JSON.stringify(op.label);
              const stored = text !== undefined && Buffer.byteLength(text) <= 4096;
              expect(codeOrOk(() => store.label('m', id, op.label))).toBe(stored ? 'ok' : 'EF_BAD_PAYLOAD');
              if (!stored) continue;
              const label = JSON.parse(text) as unknown;
              const had = ref.find((r) => r.requestId === id);
              if (!isTrainableLabel(label)) ref = ref.filter((r) => r !== had);
              else if (!op.withInput) {
                if (had) had.label = label;
              } else if (had) Object.assign(had, { tag, shape: JSON.stringify(shape), label });
              else {
                ref.push({ tag, requestId: id, shape: JSON.stringify(shape), label, ts: now });
                trim();
              }
            } else {
              if (op.poison) data[0] = Number.NaN;
              const code = codeOrOk(() => store.addSample('m', data, shape, op.label));
              const text = JSON.stringify(op.label) as string | undefined;
              const ok = !op.poison && text !== undefined && Buffer.byteLength(text) <= 4096 && isTrainableLabel(JSON.parse(text));
              expect(code).toBe(ok ? 'ok' : op.poison ? 'EF_INFER_INVALID' : 'EF_BAD_PAYLOAD');
              if (!ok) continue;
              ref.push({ tag, requestId: null, shape: JSON.stringify(shape), label: JSON.parse(text) as unknown, ts: now });
              trim();
            }
          }
          ref = ref.filter((r) => r.ts >= now - MAX_AGE_SEC * 1000);
          expect(store.sampleCount('m')).toBe(ref.length);
          for (const opts of loads) {
            const { set, keys, skipped } = store.loadSamples('m', opts);
            expect(set.count).toBe(keys.length);
            expect(new Set(keys).size).toBe(keys.length);
            for (let i = 1; i < keys.length; i++) expect(keys[i]!).toBeLessThan(keys[i - 1]!);
            expect(set.count).toBeLessThanOrEqual(Math.min(MAX_SAMPLES, opts.limit ?? Infinity));
            expect(set.count + skipped).toBeLessThanOrEqual(ref.length);
            // With no row to fix them, -1 dims stay in the shape of an empty set.
            expect(set.x.length).toBe(set.count === 0 ? 0 : set.count * set.featureShape.reduce((a, b) => a * b, 1));
            expect(set.y.length).toBe(set.count * set.labelWidth);
            const f = set.featureShape.reduce((a, b) => a * b, 1);
            if (!opts.featureShape.includes(-1)) expect(Array.from({ length: set.count }, (_, i) => set.x[i * f])).toEqual(expected(ref, opts));
          }
        } finally {
          store.close();
        }
      }),
      { numRuns: 150 },
    );
  });
});

/** The tags of the samples loadSamples should return for a concrete shape, newest first, from the naive model. */
function expected(ref: Ref[], opts: LoadSamplesOptions): number[] {
  const want = JSON.stringify(opts.featureShape);
  const width = opts.loss === 'mean-squared-error' ? (opts.labelWidth ?? 1) : 1;
  return [...ref]
    .reverse()
    .filter((r) => {
      const y = parseLabel(r.label, opts.loss, width);
      return r.shape === want && y !== null && !(typeof y === 'number' && y >= (opts.classes ?? Infinity));
    })
    .slice(0, opts.limit ?? Infinity)
    .map((r) => r.tag);
}

function codeOrOk(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (err) {
    if (!isEdgefleetError(err)) throw err;
    return err.code;
  }
}
