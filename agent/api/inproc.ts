import { EdgefleetError, type Dtype, type Manifest } from '../../proto/index.js';
import { trainingFeatureShape } from '../learner/sample-store.js';
import type { InferResult, ModelHost } from '../models/host.js';
import { isDataOf, tensorFromJson } from '../runtime/tensor.js';
import type { Tensor, TensorData, TensorMap } from '../runtime/types.js';

/**
 * The in-process API for applications that embed the agent: the same ModelHost the HTTP server
 * serves, without the JSON. Typed arrays pass through untouched (no copy); only plain number
 * arrays are converted, to the dtype the serving manifest gives the input.
 */

/** An input as an application holds it: `dtype` may be left out when the data's type, or the model, says it. */
export interface InputTensor {
  shape: number[];
  data: TensorData | number[];
  dtype?: Dtype;
}

export type InferInputs = Record<string, InputTensor> | TensorMap;

export interface InferOptions {
  /** Default: one the host generates. */
  requestId?: string;
  /** Only this version may answer; EF_UNKNOWN_MODEL when another serves. */
  version?: number;
}

/** The dtype a typed array implies; null for Uint8Array (uint8 or bool) and plain arrays, which need the model's word. */
function impliedDtype(data: TensorData | number[]): Dtype | null {
  if (data instanceof Float32Array) return 'float32';
  if (data instanceof Float64Array) return 'float64';
  if (data instanceof Int32Array) return 'int32';
  if (data instanceof BigInt64Array) return 'int64';
  if (data instanceof Int8Array) return 'int8';
  if (data instanceof Int16Array) return 'int16';
  return null;
}

export class InferenceClient {
  constructor(private readonly host: ModelHost) {}

  /** Throws EdgefleetError as ModelHost.infer does (EF_INFER_INVALID with details.field, EF_UNKNOWN_MODEL, ...). */
  async infer(name: string, inputs: InferInputs, opts?: InferOptions): Promise<InferResult> {
    let tensors: TensorMap | null = inputs as TensorMap;
    // Fast path: everything is already a Tensor, passed on as the same object.
    for (const key in inputs) {
      if (typeof (inputs as Record<string, InputTensor>)[key]?.dtype !== 'string' || Array.isArray(inputs[key]!.data)) {
        tensors = null;
        break;
      }
    }
    if (tensors === null) tensors = this.toTensors(name, inputs);
    return this.host.infer(name, tensors, opts);
  }

  /** Labels an earlier request; false when its id is not known (too old, or never seen). */
  feedback(name: string, requestId: string, label: unknown): boolean {
    return this.host.feedback(name, requestId, label);
  }

  /**
   * Stores a labelled sample for local training, beside those labelled requests make; returns its
   * id. The input is shaped as one request of one row, `[1, ...features]`, numeric (int64 and bool
   * are refused) and stored as float32; when the serving version trains, its row must fit that
   * version's training input. Labels: a class index (or `{"class": n}`) or finite numbers.
   * EF_INFER_INVALID for the input, EF_BAD_PAYLOAD for the label, EF_UNKNOWN_MODEL; nothing is
   * stored when it throws. Samples never leave the device.
   */
  addSample(name: string, input: InputTensor | Tensor, label: unknown): number {
    if (!this.host.addSample) throw new EdgefleetError('EF_INTERNAL', 'this host keeps no samples');
    const bad = (message: string): EdgefleetError => new EdgefleetError('EF_INFER_INVALID', `input: ${message}`, { details: { field: 'input' } });
    if (typeof input !== 'object' || input === null) throw bad('not a tensor');
    // The dtype only says how to read plain numbers here: everything is stored as float32.
    const dtype = input.dtype ?? impliedDtype(input.data) ?? (input.data instanceof Uint8Array ? 'uint8' : 'float32');
    const t = Array.isArray(input.data) ? tensorFromJson(dtype, { shape: input.shape, data: input.data }, 'input') : input;
    if (dtype === 'int64' || dtype === 'bool' || !isDataOf(dtype, t.data)) throw bad(`a sample is float or integer data of its dtype, not ${dtype}`);
    if (!Array.isArray(t.shape) || t.shape[0] !== 1) throw bad('a sample is one row: shape [1, ...features]');
    const featureShape = t.shape.slice(1);
    const manifest = this.host.active(name);
    const want = manifest && trainingFeatureShape(manifest);
    if (want && !(want.length === featureShape.length && want.every((d, i) => d === -1 || d === featureShape[i]))) {
      throw bad(`the row shape is [${featureShape.join(',')}]; ${name} trains on [${want.join(',')}] (-1: any size)`);
    }
    // Float32 data is not copied: it is written to the store before this returns.
    const data = t.data instanceof Float32Array ? t.data : new Float32Array(t.data as Exclude<TensorData, BigInt64Array>);
    return this.host.addSample(name, data, featureShape, label);
  }

  private toTensors(name: string, inputs: InferInputs): TensorMap {
    let manifest: Manifest | null | undefined;
    const out: TensorMap = {};
    for (const key in inputs) {
      if (!Object.hasOwn(inputs, key)) continue;
      const t: InputTensor | undefined = inputs[key];
      if (typeof t !== 'object' || t === null) throw new EdgefleetError('EF_INFER_INVALID', `${key}: not a tensor`, { details: { field: key } });
      let dtype = t.dtype ?? impliedDtype(t.data);
      if (dtype === null) {
        manifest ??= this.host.active(name);
        if (manifest === null) throw this.absent(name);
        const spec = manifest.inputs.find((s) => s.name === key);
        // Not an input of the model: let the host's validation name it.
        dtype = spec?.dtype ?? (t.data instanceof Uint8Array ? 'uint8' : 'float32');
      }
      out[key] = Array.isArray(t.data) ? tensorFromJson(dtype, { shape: t.shape, data: t.data }, key) : ({ dtype, shape: t.shape, data: t.data } satisfies Tensor);
    }
    return out;
  }

  private absent(name: string): EdgefleetError {
    return this.host.models().includes(name)
      ? new EdgefleetError('EF_MODEL_NOT_READY', `model ${name} has no verified version serving`)
      : new EdgefleetError('EF_UNKNOWN_MODEL', `no model ${name}`);
  }
}
