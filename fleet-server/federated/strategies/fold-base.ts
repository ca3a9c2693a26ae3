import type { AggregateResult, ClientUpdate, Fold } from '../strategy.js';

/**
 * What every fold shares: argument checks, the client and sample counts, and single use. Nothing is
 * ignored silently: a δ of the wrong length, a non-positive sample count or a second `finish()`
 * throws rather than producing a quietly wrong candidate.
 */
export abstract class FoldBase implements Fold {
  #count = 0;
  #samples = 0;
  #done = false;

  protected constructor(
    protected readonly params: number,
    protected readonly label: string,
  ) {
    if (!Number.isSafeInteger(params) || params < 1) throw new Error(`${label}: params must be a positive integer, got ${params}`);
  }

  get count(): number {
    return this.#count;
  }

  add(u: ClientUpdate): void {
    if (this.#done) throw new Error(`${this.label}: add() after finish()`);
    if (!(u.delta instanceof Float32Array)) throw new Error(`${this.label}: delta must be a Float32Array`);
    if (u.delta.length !== this.params) throw new Error(`${this.label}: delta has ${u.delta.length} values, the model has ${this.params}`);
    if (!Number.isFinite(u.samples) || u.samples <= 0) throw new Error(`${this.label}: samples must be positive and finite, got ${u.samples}`);
    this.take(u);
    this.#count++;
    this.#samples += u.samples;
  }

  finish(): AggregateResult {
    if (this.#done) throw new Error(`${this.label}: finish() called twice`);
    if (this.#count === 0) throw new Error(`${this.label}: no updates to aggregate`);
    this.#done = true;
    const { delta, info } = this.result(this.#count);
    return { delta, clients: this.#count, samples: this.#samples, info };
  }

  protected abstract take(u: ClientUpdate): void;
  protected abstract result(clients: number): { delta: Float32Array; info: Record<string, number> };
}

/** ‖δ‖₂, accumulated in float64 so a million float32 squares do not lose the small ones. */
export function l2Norm(d: Float32Array): number {
  let s = 0;
  for (let i = 0; i < d.length; i++) {
    const v = d[i]!;
    s += v * v;
  }
  return Math.sqrt(s);
}

/**
 * The caller rejects NaN and ±Inf before aggregation; a non-finite result means one slipped through,
 * and a candidate built from it must not be published.
 */
export function assertFinite(out: Float32Array, label: string): void {
  let s = 0;
  for (let i = 0; i < out.length; i++) s += out[i]! * 0;
  if (s !== 0) throw new Error(`${label}: the aggregate is not finite (an update held NaN or ±Inf)`);
}
