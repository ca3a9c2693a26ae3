import type { Manifest } from '../../proto/index.js';
import type { TensorMap } from '../runtime/types.js';

/** What one inference returned, and which version answered it. */
export interface InferResult {
  requestId: string;
  model: string;
  version: number;
  outputs: TensorMap;
}

/**
 * The seam between the model lifecycle (which version of each model serves) and the front ends that
 * serve requests (the in-process API, the KServe v2 HTTP server). Implemented by the agent's model
 * manager. `infer` validates inputs against the active manifest's signature and throws
 * EdgefleetError EF_INFER_INVALID (details: { field }) or EF_MODEL_NOT_READY / EF_UNKNOWN_MODEL.
 */
export interface ModelHost {
  /** Names of the models this device has a slot for. */
  models(): string[];
  /** The manifest of the version serving `name`, or null when none serves yet. */
  active(name: string): Manifest | null;
  /** True when every model with a slot has a verified version serving. */
  ready(): boolean;
  infer(name: string, inputs: TensorMap, opts?: { requestId?: string; version?: number }): Promise<InferResult>;
  /** Records a label for an earlier request id; false when the id is not known (too old, or never seen). */
  feedback(name: string, requestId: string, label: unknown): boolean;
  /**
   * Stores a labelled sample for local training; returns its id. `featureShape` is one row's shape
   * (no batch dimension). Optional: a host without a sample store (a test host) leaves it out.
   */
  addSample?(name: string, input: Float32Array, featureShape: number[], label: unknown): number;
}
