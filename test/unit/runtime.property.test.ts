/**
 * Properties of the tensor parsers on the inference path: whatever a client sends, tensorFromJson
 * and validateInputs answer with a tensor or an EF_INFER_INVALID naming a field, never another
 * error; what they accept is exactly what the signature allows.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DTYPES, isEdgefleetError, type Dtype, type TensorSpec, type TensorValue } from '../../proto/index.js';
import { allocTensorData, tensorFromJson, tensorToJson, validateInputs } from '../../agent/runtime/tensor.js';
import type { Tensor, TensorMap } from '../../agent/runtime/types.js';

/** Runs fn; passes when it returns, or throws EF_INFER_INVALID with a string field. Returns whether it threw. */
function onlyInferInvalid(fn: () => unknown): boolean {
  try {
    fn();
    return false;
  } catch (err) {
    if (!isEdgefleetError(err) || err.code !== 'EF_INFER_INVALID') throw new Error(`threw something else: ${String(err)}`, { cause: err });
    const details = err.details as { field?: unknown; index?: unknown };
    expect(typeof details.field).toBe('string');
    if (details.index !== undefined) expect(Number.isInteger(details.index)).toBe(true);
    return true;
  }
}

const dtype = fc.constantFrom(...DTYPES);
const garbageDtype = fc.oneof(dtype, fc.string({ maxLength: 10 }), fc.constantFrom('toString', '__proto__', 'constructor', 'float16', 'string'));
const dims = fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 4 });
const number = fc.oneof(fc.double(), fc.integer({ min: -300, max: 300 }), fc.constantFrom(0, -0, 1, 255, 256, -129, 2 ** 31, 2 ** 53, NaN, Infinity));

/** Values shaped like a tensor, often consistent and often not. */
const tensorJson: fc.Arbitrary<unknown> = fc.oneof(
  dims.chain((shape) =>
    fc.record({ shape: fc.constant(shape), data: fc.array(number, { minLength: shape.reduce((a, b) => a * b, 1), maxLength: shape.reduce((a, b) => a * b, 1) }) }),
  ),
  fc.record({ shape: fc.oneof(dims, fc.anything()), data: fc.oneof(fc.array(number, { maxLength: 20 }), fc.anything()) }),
  fc.anything(),
);

const ARRAYS: Record<Dtype, (n: number) => Tensor['data']> = {
  float32: (n) => new Float32Array(n),
  float64: (n) => new Float64Array(n),
  int8: (n) => new Int8Array(n),
  uint8: (n) => new Uint8Array(n),
  int16: (n) => new Int16Array(n),
  int32: (n) => new Int32Array(n),
  int64: (n) => new BigInt64Array(n),
  bool: (n) => new Uint8Array(n),
};

const spec: fc.Arbitrary<TensorSpec> = fc.record(
  {
    name: fc.oneof(fc.constantFrom('x', 'y', 'features', '__proto__', 'constructor'), fc.string({ minLength: 1, maxLength: 6 })),
    dtype,
    shape: fc.array(fc.integer({ min: -1, max: 3 }), { maxLength: 3 }),
    range: fc.tuple(fc.integer({ min: -50, max: 50 }), fc.integer({ min: 0, max: 100 })).map(([min, w]) => ({ min, max: min + w })),
  },
  { requiredKeys: ['name', 'dtype', 'shape'] },
);
const specs = fc.uniqueArray(spec, { selector: (s) => s.name, minLength: 1, maxLength: 4 });

/** A tensor of random dtype, shape and content: typed arrays of any kind, filled with anything. */
const tensorLike: fc.Arbitrary<unknown> = fc.oneof(
  fc.record({
    dtype: garbageDtype,
    shape: fc.oneof(fc.array(fc.integer({ min: -1, max: 3 }), { maxLength: 3 }), fc.anything()),
    data: fc.tuple(dtype, fc.integer({ min: 0, max: 12 }), fc.array(number, { maxLength: 12 })).map(([d, n, xs]) => {
      const a = ARRAYS[d](n);
      xs.slice(0, n).forEach((x, i) => {
        if (a instanceof BigInt64Array) a[i] = BigInt(Number.isSafeInteger(x) ? x : 0);
        else a[i] = x;
      });
      return a;
    }),
  }),
  fc.anything(),
);

describe('tensorFromJson on arbitrary input', () => {
  it('returns a tensor or throws EF_INFER_INVALID, nothing else', () => {
    fc.assert(
      fc.property(garbageDtype, tensorJson, fc.string({ maxLength: 8 }), (d, value, field) => {
        onlyInferInvalid(() => tensorFromJson(d as Dtype, value as TensorValue, field));
      }),
      { numRuns: 2000 },
    );
  });

  it('what it accepts has the shape and values it was given, in the typed array of the dtype', () => {
    fc.assert(
      fc.property(dtype, tensorJson, (d, value) => {
        let t: Tensor;
        try {
          t = tensorFromJson(d, value as TensorValue);
        } catch {
          return;
        }
        const v = value as TensorValue;
        expect(t.shape).toEqual(v.shape);
        expect(t.data.constructor).toBe(allocTensorData(d, 0).constructor);
        const back = tensorToJson(t);
        if (d === 'float32') expect(back.data).toEqual(Array.from(Float32Array.from(v.data)));
        else if (d === 'float64') expect(back.data).toEqual(v.data);
        else expect(back.data).toEqual(v.data.map((x) => (Object.is(x, -0) ? 0 : x)));
      }),
      { numRuns: 1000 },
    );
  });
});

describe('validateInputs on arbitrary input', () => {
  it('never throws anything but EF_INFER_INVALID', () => {
    fc.assert(
      fc.property(specs, fc.oneof(fc.dictionary(fc.string({ maxLength: 6 }), tensorLike, { maxKeys: 4 }), fc.anything()), (ss, inputs) => {
        onlyInferInvalid(() => validateInputs(ss, inputs as TensorMap));
      }),
      { numRuns: 2000 },
    );
  });

  it('accepts exactly the requests that fit the signature', () => {
    // Build a request from the signature, then maybe break one thing about it.
    const request = specs.chain((ss) =>
      fc.tuple(
        fc.constant(ss),
        fc.tuple(...ss.map((s) => fc.tuple(...s.shape.map((d) => (d === -1 ? fc.integer({ min: 0, max: 3 }) : fc.constant(d)))))),
        fc.integer({ min: -1, max: ss.length - 1 }),
        fc.constantFrom('dtype', 'rank', 'value', 'nan', 'length'),
      ),
    );
    fc.assert(
      fc.property(request, ([ss, shapes, broken, how]) => {
        // Null prototype: assigning `__proto__` on a plain object would set its prototype, not add an input.
        const inputs = Object.create(null) as TensorMap;
        let expectedToFail = false;
        ss.forEach((s, i) => {
          const shape = [...shapes[i]!] as number[];
          const n = shape.reduce((a, b) => a * b, 1);
          const fill = s.range ? s.range.min : 0;
          const data = s.dtype === 'int64' ? new BigInt64Array(n).fill(BigInt(fill)) : (ARRAYS[s.dtype](n) as Float32Array).fill(s.dtype === 'bool' || s.dtype === 'uint8' ? Math.max(0, Math.min(fill, 1)) : fill);
          const t: Tensor = { dtype: s.dtype, shape, data };
          if (i === broken) {
            if (how === 'dtype') {
              t.dtype = s.dtype === 'float32' ? 'int32' : 'float32';
              expectedToFail = true;
            } else if (how === 'rank') {
              t.shape = [...shape, 1];
              expectedToFail = true;
            } else if (how === 'length') {
              t.data = ARRAYS[s.dtype](n + 1);
              expectedToFail = true;
            } else if (how === 'nan' && (s.dtype === 'float32' || s.dtype === 'float64') && n > 0) {
              (t.data as Float32Array)[n - 1] = NaN;
              expectedToFail = true;
            } else if (how === 'value' && s.range && n > 0 && s.dtype !== 'bool' && s.dtype !== 'uint8' && s.dtype !== 'int8') {
              if (s.dtype === 'int64') (t.data as BigInt64Array)[0] = BigInt(s.range.max + 1);
              else (t.data as Float32Array)[0] = s.range.max + 1;
              expectedToFail = true;
            }
          }
          inputs[s.name] = t;
        });
        // uint8/bool ranges filled from a clamped value may already fall outside a negative-only range.
        const fits = ss.every((s) => !s.range || (s.dtype !== 'bool' && s.dtype !== 'uint8') || (s.range.max >= Math.max(0, Math.min(s.range.min, 1)) && s.range.min <= Math.max(0, Math.min(s.range.min, 1))));
        const threw = onlyInferInvalid(() => validateInputs(ss, inputs));
        if (expectedToFail) expect(threw).toBe(true);
        else if (fits) expect(threw).toBe(false);
      }),
      { numRuns: 1000 },
    );
  });
});
