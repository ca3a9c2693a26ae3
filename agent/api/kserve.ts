import { EdgefleetError, type Dtype, type Manifest, type ModelRuntime } from '../../proto/index.js';
import { allocTensorData } from '../runtime/tensor.js';
import type { Tensor, TensorData, TensorMap } from '../runtime/types.js';

/**
 * The JSON side of the Open Inference Protocol (KServe v2 REST, "Inference Request JSON Object" and
 * "Inference Response JSON Object"): datatype names, request bodies into tensors, tensors into
 * response text. Everything here runs on outside input and throws EdgefleetError EF_INFER_INVALID
 * (details `{field}`, the tensor's name where there is one, as validateInputs names it) and nothing else.
 */

/** KServe v2 tensor datatypes edgefleet carries; FP16, UINT16..64 and BYTES have no dtype here. */
export const DATATYPE_TO_DTYPE: Readonly<Record<string, Dtype>> = Object.freeze(
  Object.assign(Object.create(null) as Record<string, Dtype>, {
    FP32: 'float32',
    FP64: 'float64',
    INT8: 'int8',
    UINT8: 'uint8',
    INT16: 'int16',
    INT32: 'int32',
    INT64: 'int64',
    BOOL: 'bool',
  }),
);

export const DTYPE_TO_DATATYPE: Readonly<Record<Dtype, string>> = {
  float32: 'FP32',
  float64: 'FP64',
  int8: 'INT8',
  uint8: 'UINT8',
  int16: 'INT16',
  int32: 'INT32',
  int64: 'INT64',
  bool: 'BOOL',
};

/** Model metadata `platform`, in the `<framework>_<format>` form Triton and KServe use. */
const PLATFORM: Record<ModelRuntime, string> = {
  onnx: 'onnxruntime_onnx',
  'tfjs-graph': 'tensorflow_js_graph',
  'tfjs-layers': 'tensorflow_js_layers',
};

/** Client-chosen request ids travel back in a header, so they must be header-safe: visible ASCII and space. */
const REQUEST_ID = /^[\x20-\x7e]{1,128}$/;
export const MAX_REQUEST_ID_CHARS = 128;

const MAX_RANK = 8;
/** Nesting deeper than any rank we accept is refused before it can cost a deep recursion. */
const MAX_DEPTH = MAX_RANK + 1;
const MAX_FIELD_CHARS = 256;

export interface InferRequest {
  /** The client's id, or undefined when it sent none. */
  id: string | undefined;
  inputs: TensorMap;
  /** Output names the client asked for, in its order; null for all of them. */
  outputs: string[] | null;
}

export function invalid(field: string, message: string, index?: number): EdgefleetError {
  const f = field.length > MAX_FIELD_CHARS ? `${field.slice(0, MAX_FIELD_CHARS)}…` : field;
  return new EdgefleetError('EF_INFER_INVALID', `${f}: ${message}`, { details: index === undefined ? { field: f } : { field: f, index } });
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * An inference request body, already JSON.parse'd, into tensors. `maxElements` bounds what one
 * input may allocate before its data is read (the body size is a natural bound: every element
 * takes at least a byte of it).
 */
export function parseInferRequest(body: unknown, maxElements: number): InferRequest {
  if (!isObject(body)) throw invalid('body', 'must be a JSON object');
  let id: string | undefined;
  const rawId = body.id;
  if (rawId !== undefined && rawId !== '') {
    if (typeof rawId !== 'string' || !REQUEST_ID.test(rawId)) {
      throw invalid('id', `must be a string of 1 to ${MAX_REQUEST_ID_CHARS} printable ASCII characters`);
    }
    id = rawId;
  }
  const list = body.inputs;
  if (!Array.isArray(list) || list.length === 0) throw invalid('inputs', 'must be a non-empty array of tensors');
  const inputs: TensorMap = {};
  for (let i = 0; i < list.length; i++) {
    const t: unknown = list[i];
    if (!isObject(t)) throw invalid(`inputs[${i}]`, 'must be an object {name, shape, datatype, data}');
    const name = t.name;
    if (typeof name !== 'string' || name.length === 0) throw invalid(`inputs[${i}].name`, 'must be a non-empty string');
    if (Object.hasOwn(inputs, name)) throw invalid(name, 'appears twice in inputs');
    // Assigning it would set the map's prototype instead of adding a tensor.
    if (name === '__proto__') throw invalid(name, 'the model has no input of this name');
    inputs[name] = parseTensor(name, t, maxElements);
  }
  let outputs: string[] | null = null;
  if (body.outputs !== undefined) {
    const req = body.outputs;
    if (!Array.isArray(req)) throw invalid('outputs', 'must be an array of {name}');
    outputs = new Array<string>(req.length);
    for (let i = 0; i < req.length; i++) {
      const o: unknown = req[i];
      if (!isObject(o) || typeof o.name !== 'string') throw invalid(`outputs[${i}].name`, 'must be a string');
      outputs[i] = o.name;
    }
  }
  return { id, inputs, outputs };
}

function parseTensor(name: string, t: Record<string, unknown>, maxElements: number): Tensor {
  const datatype = t.datatype;
  const dtype = typeof datatype === 'string' ? DATATYPE_TO_DTYPE[datatype] : undefined;
  if (dtype === undefined) {
    throw invalid(name, `datatype ${typeof datatype === 'string' ? JSON.stringify(datatype.slice(0, 32)) : 'is missing'}; one of ${Object.keys(DATATYPE_TO_DTYPE).join(', ')}`);
  }
  const shape = t.shape;
  if (!Array.isArray(shape) || shape.length > MAX_RANK) throw invalid(name, `shape must be an array of at most ${MAX_RANK} dimensions`);
  let n = 1;
  for (let i = 0; i < shape.length; i++) {
    const d: unknown = shape[i];
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw invalid(name, `shape dimension ${i} must be a non-negative integer`);
    n *= d;
  }
  const data = t.data;
  if (!Array.isArray(data)) throw invalid(name, 'data must be an array (flat or nested) of numbers');
  if (n > maxElements) throw invalid(name, `shape [${shape.join(',')}] holds ${n} values, more than the request carries`);
  const out = allocTensorData(dtype, n);
  const filled = fill(name, dtype, out, data, 0, 0);
  if (filled !== n) throw invalid(name, `data has ${filled} values, the shape [${shape.join(',')}] holds ${n}`);
  return { dtype, shape: shape as number[], data: out };
}

/** Flattens nested `data` into `out` from `pos`, row-major; returns the position after the last value. */
function fill(name: string, dtype: Dtype, out: TensorData, data: unknown[], pos: number, depth: number): number {
  if (depth > MAX_DEPTH) throw invalid(name, `data is nested deeper than ${MAX_DEPTH}`);
  for (let i = 0; i < data.length; i++) {
    const v: unknown = data[i];
    if (Array.isArray(v)) {
      pos = fill(name, dtype, out, v, pos, depth + 1);
      continue;
    }
    if (pos >= out.length) throw invalid(name, `data has more values than the shape holds (${out.length})`);
    put(name, dtype, out, pos, v);
    pos++;
  }
  return pos;
}

/** Stores one JSON value; integers outside their dtype's range are refused rather than wrapped. */
function put(name: string, dtype: Dtype, out: TensorData, i: number, v: unknown): void {
  if (dtype === 'bool' && typeof v === 'boolean') {
    (out as Uint8Array)[i] = v ? 1 : 0;
    return;
  }
  if (typeof v !== 'number') throw invalid(name, `value at index ${i} is not a number`, i);
  switch (dtype) {
    case 'float32':
    case 'float64':
      // Non-finite values (1e400 parses as Infinity) are validateInputs' to refuse, with the rest of the range checks.
      (out as Float32Array)[i] = v;
      return;
    case 'int64':
      if (!Number.isSafeInteger(v)) throw invalid(name, `value at index ${i} is not a safe integer (${v})`, i);
      (out as BigInt64Array)[i] = BigInt(v);
      return;
    default:
      if (!Number.isInteger(v) || v < INT_MIN[dtype] || v > INT_MAX[dtype]) throw invalid(name, `value at index ${i} is not a ${dtype} (${v})`, i);
      (out as Int32Array)[i] = v;
  }
}

const INT_MIN: Record<Dtype, number> = { float32: 0, float64: 0, int64: 0, int8: -128, uint8: 0, int16: -32768, int32: -2147483648, bool: 0 };
const INT_MAX: Record<Dtype, number> = { float32: 0, float64: 0, int64: 0, int8: 127, uint8: 255, int16: 32767, int32: 2147483647, bool: 1 };

/**
 * The response body, written as text rather than through JSON.stringify: typed arrays join
 * straight into JSON numbers. A float32 read out of its array is an exact double, and the shortest
 * decimal of that double parses back to the same float32, so values round-trip bit for bit.
 */
export function encodeInferResponse(model: string, version: number, id: string, outputs: TensorMap, wanted: string[] | null): string {
  let s = `{"model_name":${JSON.stringify(model)},"model_version":"${version}","id":${JSON.stringify(id)},"outputs":[`;
  const names = wanted ?? Object.keys(outputs);
  for (let i = 0; i < names.length; i++) {
    const name = names[i]!;
    const t = outputs[name]!;
    if (i > 0) s += ',';
    s += `{"name":${JSON.stringify(name)},"datatype":"${DTYPE_TO_DATATYPE[t.dtype]}","shape":[${t.shape.join(',')}],"data":${dataJson(t)}}`;
  }
  return `${s}]}`;
}

function dataJson(t: Tensor): string {
  const d = t.data;
  if (t.dtype === 'bool') {
    let s = '[';
    for (let i = 0; i < d.length; i++) s += i === 0 ? (d[i] ? 'true' : 'false') : d[i] ? ',true' : ',false';
    return `${s}]`;
  }
  const s = `[${(d as Float32Array).join(',')}]`;
  // JSON has no NaN or Infinity: those become null, as JSON.stringify writes them. Digits, signs, "." and "e" have no N or I.
  if (s.includes('N') || s.includes('I')) return JSON.stringify(Array.from(d as Float32Array, (x) => (Number.isFinite(x) ? x : null)));
  return s;
}

/** KServe v2 model metadata from the manifest of the version serving. */
export function modelMetadata(m: Manifest): object {
  const spec = (s: Manifest['inputs'][number]): { name: string; datatype: string; shape: number[] } => ({
    name: s.name,
    datatype: DTYPE_TO_DATATYPE[s.dtype],
    shape: s.shape,
  });
  return { name: m.name, versions: [String(m.version)], platform: PLATFORM[m.runtime], inputs: m.inputs.map(spec), outputs: m.outputs.map(spec) };
}

/** Checks that every output the client asked for exists, before any response is written. */
export function checkWanted(outputs: TensorMap, wanted: string[] | null): void {
  if (wanted === null) return;
  for (let i = 0; i < wanted.length; i++) if (!Object.hasOwn(outputs, wanted[i]!)) throw invalid(wanted[i]!, 'the model has no output of this name');
}
