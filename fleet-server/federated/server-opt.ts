import type { ServerOptimizerSpec } from '../../proto/fl.js';

/**
 * Server optimizers: how the fleet applies a round's aggregated difference Δ to the base weights.
 * Δ is treated as a pseudo-gradient step (−Δ is the pseudo-gradient), following Reddi et al., 2021,
 * "Adaptive Federated Optimization", Algorithm 2 (FedAdam, FedYogi) and its FedAvgM baseline:
 *
 *   sgd:  m = β·m + Δ;                                w = base + η·m
 *   adam: m = β₁·m + (1−β₁)·Δ;  v = β₂·v + (1−β₂)·Δ²;  w = base + η·m / (√v + τ)
 *   yogi: m as adam;  v = v − (1−β₂)·Δ²·sign(v − Δ²);  w as adam
 *
 * As in the paper there is no bias correction: τ, large by Adam's standards (1e-3), keeps the first
 * rounds' steps bounded instead. The paper initialises v ≥ τ²; we start at exactly τ², and m at 0.
 * sgd with η = 1 and β = 0 is plain FedAvg, base + Δ.
 *
 * The moments carry from round to round of one model, so the state is persisted per model
 * (toBytes / fromBytes). Arithmetic is float64 per coordinate; the moments are stored as float32,
 * which is also what is persisted, so a restored state continues exactly as an unbroken one.
 */

export type OptimizerName = ServerOptimizerSpec['name'];

export interface ServerState {
  readonly optimizer: OptimizerName;
  /** Rounds applied so far. */
  readonly round: number;
  readonly params: number;
  /** First moment; null for sgd without momentum, which needs none. */
  readonly m: Float32Array | null;
  /** Second moment (adam, yogi); null for sgd. */
  readonly v: Float32Array | null;
}

export interface ServerStepResult {
  weights: Float32Array;
  state: ServerState;
  /**
   * Why the given state was set aside and the moments started again from zero: it belongs to
   * another optimizer or another parameter count (the operator changed the optimizer, or the model's
   * architecture changed). Moments of a different optimizer or layout mean nothing here, and failing
   * every later round of the model instead would need someone to delete the state by hand. null
   * when the state was used (or none was given).
   */
  restarted: string | null;
}

export function serverStep(spec: ServerOptimizerSpec, base: Float32Array, delta: Float32Array, given: ServerState | null): ServerStepResult {
  const n = base.length;
  if (delta.length !== n) throw new Error(`serverStep: delta has ${delta.length} values, base has ${n}`);
  const restarted =
    given === null ? null
    : given.optimizer !== spec.name ? `the state is for ${given.optimizer}, the optimizer is now ${spec.name}`
    : given.params !== n ? `the state is for ${given.params} parameters, the model has ${n}`
    : null;
  const state = restarted === null ? given : null;
  const round = (state?.round ?? 0) + 1;
  const weights = new Float32Array(n);

  if (spec.name === 'sgd') {
    const { learningRate: lr, momentum: beta } = spec;
    if (beta === 0) {
      for (let i = 0; i < n; i++) weights[i] = base[i]! + lr * delta[i]!;
      return { weights, state: { optimizer: 'sgd', round, params: n, m: null, v: null }, restarted };
    }
    const m = state?.m ? state.m.slice() : new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const mi = beta * m[i]! + delta[i]!;
      m[i] = mi;
      weights[i] = base[i]! + lr * mi;
    }
    return { weights, state: { optimizer: 'sgd', round, params: n, m, v: null }, restarted };
  }

  const { learningRate: lr, beta1, beta2, tau } = spec;
  const m = state?.m ? state.m.slice() : new Float32Array(n);
  const v = state?.v ? state.v.slice() : new Float32Array(n).fill(tau * tau);
  const yogi = spec.name === 'yogi';
  for (let i = 0; i < n; i++) {
    const d = delta[i]!;
    const d2 = d * d;
    const mi = beta1 * m[i]! + (1 - beta1) * d;
    const vPrev = v[i]!;
    const vi = yogi ? vPrev - (1 - beta2) * d2 * Math.sign(vPrev - d2) : beta2 * vPrev + (1 - beta2) * d2;
    m[i] = mi;
    v[i] = vi;
    weights[i] = base[i]! + (lr * mi) / (Math.sqrt(vi) + tau);
  }
  return { weights, state: { optimizer: spec.name, round, params: n, m, v }, restarted };
}

/*
 * Bytes: "EFSO", format version (u8), optimizer (u8: 0 sgd, 1 adam, 2 yogi), flags (u8: bit 0 m
 * present, bit 1 v present), a zero byte, round (u32), params (u32), then m and v as float32, all
 * little-endian.
 */
const MAGIC = [0x45, 0x46, 0x53, 0x4f];
const FORMAT = 1;
const HEADER = 16;
const NAMES: readonly OptimizerName[] = ['sgd', 'adam', 'yogi'];

export function toBytes(state: ServerState): Uint8Array {
  const vectors = [state.m, state.v].filter((x): x is Float32Array => x !== null);
  for (const x of vectors) if (x.length !== state.params) throw new Error('toBytes: a moment vector does not match params');
  if (!Number.isInteger(state.round) || state.round < 0 || state.round > 0xffffffff) throw new Error(`toBytes: round ${state.round} does not fit a u32`);
  const out = new Uint8Array(HEADER + 4 * state.params * vectors.length);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  view.setUint8(4, FORMAT);
  view.setUint8(5, NAMES.indexOf(state.optimizer));
  view.setUint8(6, (state.m ? 1 : 0) | (state.v ? 2 : 0));
  view.setUint32(8, state.round, true);
  view.setUint32(12, state.params, true);
  let at = HEADER;
  for (const x of vectors) {
    for (let i = 0; i < x.length; i++, at += 4) view.setFloat32(at, x[i]!, true);
  }
  return out;
}

export function fromBytes(bytes: Uint8Array): ServerState {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < HEADER || MAGIC.some((b, i) => bytes[i] !== b)) throw new Error('fromBytes: not a server optimizer state');
  if (view.getUint8(4) !== FORMAT) throw new Error(`fromBytes: unknown format version ${view.getUint8(4)}`);
  const optimizer = NAMES[view.getUint8(5)];
  if (optimizer === undefined) throw new Error(`fromBytes: unknown optimizer ${view.getUint8(5)}`);
  const flags = view.getUint8(6);
  if (flags > 3) throw new Error(`fromBytes: unknown flags ${flags}`);
  const round = view.getUint32(8, true);
  const params = view.getUint32(12, true);
  const count = (flags & 1) + ((flags >> 1) & 1);
  if (bytes.length !== HEADER + 4 * params * count) throw new Error(`fromBytes: ${bytes.length} bytes, expected ${HEADER + 4 * params * count}`);
  let at = HEADER;
  const read = (): Float32Array => {
    const x = new Float32Array(params);
    for (let i = 0; i < params; i++, at += 4) x[i] = view.getFloat32(at, true);
    return x;
  };
  const m = flags & 1 ? read() : null;
  const v = flags & 2 ? read() : null;
  return { optimizer, round, params, m, v };
}
