import type { Dtype, Manifest } from '../../proto/index.js';

export type TensorData = Float32Array | Float64Array | Int8Array | Uint8Array | Int16Array | Int32Array | BigInt64Array;

/** A tensor as the runtimes exchange it: row-major typed data. `bool` is carried as Uint8Array. */
export interface Tensor {
  dtype: Dtype;
  shape: number[];
  data: TensorData;
}

export type TensorMap = Record<string, Tensor>;

/** A model loaded into a runtime, ready to run. One per (name, version) in memory. */
export interface LoadedModel {
  readonly manifest: Manifest;
  /** Which backend runs it: `onnxruntime-node`, `tfjs-node`, `tfjs-wasm`, ... */
  readonly backend: string;
  /** Runs one request. Inputs are assumed already validated against the manifest's signature. */
  run(inputs: TensorMap): Promise<TensorMap>;
  dispose(): Promise<void>;
}
