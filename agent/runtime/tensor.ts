import { EdgefleetError, type Dtype, type TensorSpec, type TensorValue } from '../../proto/index.js';
import type { Tensor, TensorData, TensorMap } from './types.js';

/**
 * Tensors between JSON and typed arrays, and the checks that stand between a request and a runtime.
 * Everything here runs on outside input: it throws EdgefleetError EF_INFER_INVALID (details
 * `{field}`, plus `index` for a bad value) and nothing else.
 */

/** The typed array each dtype travels in, by its Symbol.toStringTag (a realm-independent brand check). */
const ARRAY_TAG: Record<Dtype, string> = {
  float32: 'Float32Array',
  float64: 'Float64Array',
  int8: 'Int8Array',
  uint8: 'Uint8Array',
  int16: 'Int16Array',
  int32: 'Int32Array',
  int64: 'BigInt64Array',
  bool: 'Uint8Array',
};

/** Inclusive bounds of the integer dtypes; a JSON value outside is refused rather than wrapped. */
const INT_BOUNDS: Partial<Record<Dtype, readonly [number, number]>> = {
  int8: [-128, 127],
  uint8: [0, 255],
  int16: [-32768, 32767],
  int32: [-2147483648, 2147483647],
  int64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  bool: [0, 1],
};

const MAX_RANK = 8;

/** Names come from outside too; a megabyte key must not become a megabyte error message. */
const MAX_FIELD_CHARS = 256;

function invalid(name: string, message: string, index?: number): EdgefleetError {
  const field = name.length > MAX_FIELD_CHARS ? `${name.slice(0, MAX_FIELD_CHARS)}…` : name;
  return new EdgefleetError('EF_INFER_INVALID', `${field}: ${message}`, { details: index === undefined ? { field } : { field, index } });
}

/** A value from outside, for a message: primitives as themselves, anything else by its type (String() on an object can throw). */
function show(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 64 ? `${v.slice(0, 64)}…` : v);
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint' || v === undefined || v === null) return String(v);
  return Array.isArray(v) ? 'an array' : `a ${typeof v}`;
}

export function isFloatDtype(dtype: Dtype): boolean {
  return dtype === 'float32' || dtype === 'float64';
}

/** A typed array of `dtype` with `n` elements. */
export function allocTensorData(dtype: Dtype, n: number): TensorData {
  switch (dtype) {
    case 'float32':
      return new Float32Array(n);
    case 'float64':
      return new Float64Array(n);
    case 'int8':
      return new Int8Array(n);
    case 'uint8':
    case 'bool':
      return new Uint8Array(n);
    case 'int16':
      return new Int16Array(n);
    case 'int32':
      return new Int32Array(n);
    case 'int64':
      return new BigInt64Array(n);
  }
}

/** True when `data` is the typed array `dtype` travels in. */
export function isDataOf(dtype: Dtype, data: unknown): data is TensorData {
  return ArrayBuffer.isView(data) && (data as unknown as Record<symbol, unknown>)[Symbol.toStringTag] === ARRAY_TAG[dtype];
}

/**
 * Product of a shape that came from outside, or -1 when it is not a list of at most 8
 * non-negative safe integers whose product is a safe integer.
 */
function shapeSize(shape: unknown): number {
  if (!Array.isArray(shape) || shape.length > MAX_RANK) return -1;
  let n = 1;
  for (let i = 0; i < shape.length; i++) {
    const d: unknown = shape[i];
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) return -1;
    n *= d;
  }
  return Number.isSafeInteger(n) ? n : -1;
}

/**
 * A tensor from its JSON form. Integer dtypes take integers within their range (int64: safe
 * integers; bool: 0 or 1); floats take any number, and validateInputs refuses the non-finite ones.
 */
export function tensorFromJson(dtype: Dtype, value: TensorValue, field = 'tensor'): Tensor {
  if (!Object.hasOwn(ARRAY_TAG, dtype)) throw invalid(field, `unknown dtype ${show(dtype)}`);
  if (typeof value !== 'object' || value === null) throw invalid(field, 'not a tensor ({shape, data})');
  const { shape, data } = value as { shape: unknown; data: unknown };
  const n = shapeSize(shape);
  if (n < 0) throw invalid(field, `shape must be at most ${MAX_RANK} non-negative integers`);
  if (!Array.isArray(data)) throw invalid(field, 'data must be an array of numbers');
  if (data.length !== n) throw invalid(field, `data has ${data.length} values, the shape [${(shape as number[]).join(',')}] holds ${n}`);
  const out = allocTensorData(dtype, n);
  const bounds = INT_BOUNDS[dtype];
  for (let i = 0; i < n; i++) {
    const v: unknown = data[i];
    if (typeof v !== 'number') throw invalid(field, `value at index ${i} is not a number`, i);
    if (bounds !== undefined && !(Number.isInteger(v) && v >= bounds[0] && v <= bounds[1])) {
      throw invalid(field, `value at index ${i} is not a ${dtype} (${v})`, i);
    }
    if (dtype === 'int64') (out as BigInt64Array)[i] = BigInt(v);
    else (out as Exclude<TensorData, BigInt64Array>)[i] = v;
  }
  return { dtype, shape: (shape as number[]).slice(), data: out };
}

/** A tensor in JSON form. int64 beyond 2^53 loses precision; non-finite floats become null in JSON.stringify. */
export function tensorToJson(t: Tensor): TensorValue {
  const d = t.data;
  const data = new Array<number>(d.length);
  if (d instanceof BigInt64Array) for (let i = 0; i < d.length; i++) data[i] = Number(d[i]);
  else for (let i = 0; i < d.length; i++) data[i] = d[i]!;
  return { shape: t.shape.slice(), data };
}

function findSpec(specs: readonly TensorSpec[], name: string): TensorSpec | undefined {
  for (let i = 0; i < specs.length; i++) if (specs[i]!.name === name) return specs[i];
  return undefined;
}

/**
 * Checks a request against the model's input signature before any runtime sees it. On the hot
 * path for every request: plain loops, nothing allocated per element, and a single comparison per
 * float value (a NaN fails every comparison, so `!(x >= lo && x <= hi)` catches it with the range).
 */
export function validateInputs(specs: readonly TensorSpec[], inputs: TensorMap): void {
  if (typeof inputs !== 'object' || inputs === null || Array.isArray(inputs)) throw invalid('inputs', 'must be a map of tensors by name');
  for (const name in inputs) {
    if (Object.hasOwn(inputs, name) && findSpec(specs, name) === undefined) throw invalid(name, 'the model has no input of this name');
  }
  for (let s = 0; s < specs.length; s++) {
    const spec = specs[s]!;
    const field = spec.name;
    if (!Object.hasOwn(inputs, field)) throw invalid(field, 'missing input');
    const t: unknown = inputs[field];
    if (typeof t !== 'object' || t === null) throw invalid(field, 'not a tensor');
    const { dtype, shape, data } = t as Record<string, unknown>;
    if (dtype !== spec.dtype) throw invalid(field, `dtype is ${show(dtype)}, the model takes ${spec.dtype}`);
    if (!isDataOf(spec.dtype, data)) throw invalid(field, `data must be a ${ARRAY_TAG[spec.dtype]} for ${spec.dtype}`);
    if (!Array.isArray(shape) || shape.length !== spec.shape.length) {
      throw invalid(field, `rank is ${Array.isArray(shape) ? shape.length : 'unknown'}, the model takes [${spec.shape.join(',')}]`);
    }
    let n = 1;
    for (let i = 0; i < shape.length; i++) {
      const d: unknown = shape[i];
      const want = spec.shape[i]!;
      if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0 || (want !== -1 && d !== want)) {
        throw invalid(field, `dimension ${i} is ${show(d)}, the model takes [${spec.shape.join(',')}] (-1: any size)`);
      }
      n *= d;
    }
    if (data.length !== n) throw invalid(field, `data has ${data.length} values, the shape holds ${n}`);
    checkValues(spec, data, field);
  }
}

function checkValues(spec: TensorSpec, data: TensorData, field: string): void {
  const range = spec.range;
  if (isFloatDtype(spec.dtype)) {
    // Without a range the bounds are the largest finite doubles, so ±Infinity fails the test too.
    const lo = range ? Math.max(range.min, -Number.MAX_VALUE) : -Number.MAX_VALUE;
    const hi = range ? Math.min(range.max, Number.MAX_VALUE) : Number.MAX_VALUE;
    const d = data as Float32Array | Float64Array;
    for (let i = 0; i < d.length; i++) {
      const x = d[i]!;
      if (!(x >= lo && x <= hi)) {
        if (!Number.isFinite(x)) throw invalid(field, `value at index ${i} is ${x}`, i);
        throw invalid(field, `value at index ${i} is ${x}, outside [${range!.min}, ${range!.max}]`, i);
      }
    }
    return;
  }
  if (!range) return;
  // Integer data is always finite; bigint compares with number without conversion.
  const d = data as ArrayLike<number | bigint>;
  for (let i = 0; i < d.length; i++) {
    const x = d[i]!;
    if (x < range.min || x > range.max) throw invalid(field, `value at index ${i} is ${x}, outside [${range.min}, ${range.max}]`, i);
  }
}

/** NaN and ±Infinity in a tensor; 0 for integer dtypes. */
export function nonFiniteCount(t: Tensor): number {
  if (!isFloatDtype(t.dtype)) return 0;
  const d = t.data as Float32Array | Float64Array;
  let n = 0;
  for (let i = 0; i < d.length; i++) if (!Number.isFinite(d[i]!)) n++;
  return n;
}

export interface ToleranceResult {
  ok: boolean;
  /** Largest |actual - expected|; Infinity where a value is NaN on one side only, or the shapes differ. */
  maxAbsErr: number;
  /** First element out of tolerance, -1 when none (or when the shapes differ). */
  index: number;
}

/**
 * Element by element, |actual - expected| <= abs + rel * |expected| (the manifest's golden rule).
 * NaN matches only NaN and an infinity only itself: a model that starts returning NaN where its
 * publisher saw numbers fails, however loose the tolerance.
 */
export function withinTolerance(actual: Tensor, expected: TensorValue, tol: { abs: number; rel: number }): ToleranceResult {
  const a = actual.data;
  const e = expected.data;
  let sameShape = actual.shape.length === expected.shape.length && a.length === e.length;
  for (let i = 0; sameShape && i < actual.shape.length; i++) sameShape = actual.shape[i] === expected.shape[i];
  if (!sameShape) return { ok: false, maxAbsErr: Infinity, index: -1 };
  let maxAbsErr = 0;
  let index = -1;
  for (let i = 0; i < e.length; i++) {
    const x = Number(a[i]);
    const y = e[i]!;
    let err: number;
    let bad: boolean;
    if (Number.isNaN(x) || Number.isNaN(y)) {
      bad = Number.isNaN(x) !== Number.isNaN(y);
      err = bad ? Infinity : 0;
    } else if (x === y) {
      // Equal infinities included, where x - y would be NaN.
      err = 0;
      bad = false;
    } else {
      err = Math.abs(x - y);
      bad = !(err <= tol.abs + tol.rel * Math.abs(y));
    }
    if (err > maxAbsErr) maxAbsErr = err;
    if (bad && index < 0) index = i;
  }
  return { ok: index < 0, maxAbsErr, index };
}

/** Index (0 … k-1) of the largest of the k values from `offset`: the winning class of one row of scores. */
export function argmaxAt(data: ArrayLike<number>, offset: number, k: number): number {
  let best = 0;
  for (let j = 1; j < k; j++) if ((data[offset + j] as number) > (data[offset + best] as number)) best = j;
  return best;
}
