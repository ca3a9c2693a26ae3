import type { StrategySpec } from '../../../proto/fl.js';
import { normalSampler } from '../../../common/random.js';
import type { ClientUpdate, Strategy } from '../strategy.js';
import { FoldBase, assertFinite, l2Norm } from './fold-base.js';

/**
 * The streaming strategies: FedAvg, FedAvg of clipped updates and DP-FedAvg are all one scaled sum,
 * Σ sᵢ·δᵢ / D, differing only in the scale sᵢ, the denominator D and the noise. A fold holds one
 * Float64Array of the model's size whatever the number of clients.
 *
 * Float64 accumulation: a float32 running sum of a thousand updates loses the low bits of every
 * small one and depends on the order of adds; float64 makes the result order-independent to well
 * within float32 output precision. It costs under 10% against a plain float32 sum loop (both are
 * memory-bound; scripts/bench/fedavg-aggregate.ts measures the two in one run).
 */

type FedAvgSpec = Extract<StrategySpec, { name: 'fedavg' }>;
type ClippedSpec = Extract<StrategySpec, { name: 'fedavg-clipped' }>;
type DpSpec = Extract<StrategySpec, { name: 'dp-fedavg' }>;

/** acc += s·d. Kept monomorphic (always Float64Array += number × Float32Array) so V8 compiles one tight loop. */
function addScaled(acc: Float64Array, d: Float32Array, s: number): void {
  const n = acc.length;
  for (let i = 0; i < n; i++) acc[i]! += s * d[i]!;
}

/** min(1, bound/‖δ‖): the factor that brings δ within the bound (Abadi et al., 2016, per-example clipping). */
function clipFactor(d: Float32Array, bound: number): number {
  const norm = l2Norm(d);
  return norm > bound ? bound / norm : 1;
}

abstract class SumFold extends FoldBase {
  protected readonly acc: Float64Array;
  protected denominator = 0;
  protected clipped = 0;

  protected constructor(params: number, label: string) {
    super(params, label);
    this.acc = new Float64Array(params);
  }

  protected divide(denominator: number): Float32Array {
    const out = new Float32Array(this.params);
    const inv = 1 / denominator;
    const acc = this.acc;
    for (let i = 0; i < out.length; i++) out[i] = acc[i]! * inv;
    assertFinite(out, this.label);
    return out;
  }
}

class FedAvgFold extends SumFold {
  constructor(params: number) {
    super(params, 'fedavg');
  }
  protected take(u: ClientUpdate): void {
    addScaled(this.acc, u.delta, u.samples);
    this.denominator += u.samples;
  }
  protected result(): { delta: Float32Array; info: Record<string, number> } {
    return { delta: this.divide(this.denominator), info: {} };
  }
}

class ClippedFold extends SumFold {
  constructor(
    params: number,
    private readonly normBound: number,
  ) {
    super(params, 'fedavg-clipped');
  }
  protected take(u: ClientUpdate): void {
    const f = clipFactor(u.delta, this.normBound);
    if (f < 1) this.clipped++;
    addScaled(this.acc, u.delta, u.samples * f);
    this.denominator += u.samples;
  }
  protected result(): { delta: Float32Array; info: Record<string, number> } {
    return { delta: this.divide(this.denominator), info: { clipped: this.clipped } };
  }
}

/**
 * DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"):
 * unweighted, so every client's sensitivity is clipNorm whatever it claims as its sample count;
 * Gaussian noise of std noiseMultiplier·clipNorm on the sum, then ÷ n.
 */
class DpFold extends SumFold {
  constructor(
    params: number,
    private readonly spec: DpSpec,
    private readonly random: () => number,
  ) {
    super(params, 'dp-fedavg');
  }
  protected take(u: ClientUpdate): void {
    const f = clipFactor(u.delta, this.spec.clipNorm);
    if (f < 1) this.clipped++;
    addScaled(this.acc, u.delta, f);
  }
  protected result(clients: number): { delta: Float32Array; info: Record<string, number> } {
    const sumStd = this.spec.noiseMultiplier * this.spec.clipNorm;
    if (sumStd > 0) {
      const normal = normalSampler(this.random);
      const acc = this.acc;
      for (let i = 0; i < acc.length; i++) acc[i]! += sumStd * normal();
    }
    return { delta: this.divide(clients), info: { clipped: this.clipped, noiseStd: sumStd / clients } };
  }
}

export function fedAvg(spec: FedAvgSpec): Strategy {
  return { spec, streaming: true, begin: (params) => new FedAvgFold(params) };
}

export function fedAvgClipped(spec: ClippedSpec): Strategy {
  return { spec, streaming: true, begin: (params) => new ClippedFold(params, spec.normBound) };
}

export function dpFedAvg(spec: DpSpec, random: () => number): Strategy {
  return { spec, streaming: true, begin: (params) => new DpFold(params, spec, random) };
}
