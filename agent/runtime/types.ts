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
  /**
   * TF.js layers models only: reads and replaces weights by name (the weightsManifest's names), for
   * a device's personalized variant. Replacing throws EF_RUNTIME_FAILED for an unknown name or a
   * wrong size, and then changes nothing.
   */
  weights?: {
    read(names: readonly string[]): { name: string; data: Float32Array }[];
    write(weights: readonly { name: string; data: Float32Array }[]): void;
  };
}
