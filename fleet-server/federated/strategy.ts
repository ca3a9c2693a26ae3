import type { StrategySpec } from '../../proto/fl.js';
import { cryptoUniform } from '../../common/random.js';
import { dpFedAvg, fedAvg, fedAvgClipped } from './strategies/fedavg.js';
import { median, trimmedMean } from './strategies/robust.js';

/**
 * How the fleet folds a round's updates into one difference. A model's parameters are one flat
 * Float32Array (its tensors concatenated in the layout order the caller owns); an update is the
 * difference of the same length. Strategies are pure functions of the updates (and, for dp-fedavg,
 * of the noise drawn); each is checked against a plainly written reference in the tests.
 */

export interface ClientUpdate {
  delta: Float32Array;
  /** Training samples behind the update: FedAvg's weight. Positive. */
  samples: number;
}

export interface AggregateResult {
  delta: Float32Array;
  clients: number;
  /** Sum of the updates' samples, whether or not the strategy weighs by them. */
  samples: number;
  /** Per-strategy facts: `clipped` (updates scaled down), `trimmedEachSide`, `buckets`, `noiseStd`. */
  info: Record<string, number>;
}

/**
 * One round's aggregation in progress. Single use: `finish()` ends it, and `add` or `finish` after
 * that throws. `add` never changes the caller's array. A streaming fold is done with it when `add`
 * returns, so a decoder may reuse its buffer; a non-streaming one (median, trimmed mean) keeps it
 * until `finish()`, must be given a fresh array per update, and throws if given memory it holds.
 */
export interface Fold {
  add(u: ClientUpdate): void;
  readonly count: number;
  finish(): AggregateResult;
}

export interface Strategy {
  readonly spec: StrategySpec;
  /** True when a fold's memory is O(params) whatever the number of clients; false when it keeps every update's array. */
  readonly streaming: boolean;
  begin(params: number): Fold;
}

export interface StrategyOptions {
  /**
   * Uniform [0, 1) source for dp-fedavg's noise and the robust rules' bucket order. Defaults to `cryptoUniform()` (the OS CSPRNG):
   * noise drawn from a predictable PRNG can be regenerated and subtracted by whoever can reproduce
   * the stream, which voids the guarantee. Pass a seeded `mulberry32` only in tests and simulations.
   * The accountant's ε assumes ideal real-valued noise; floating-point Gaussian samples fall short
   * of that in their lowest bits (Mironov, 2012, "On Significance of the Least Significant Bits for
   * Differential Privacy"), as in TensorFlow Privacy and Opacus.
   */
  random?: () => number;
}

export function strategyFor(spec: StrategySpec, opts: StrategyOptions = {}): Strategy {
  switch (spec.name) {
    case 'fedavg':
      return fedAvg(spec);
    case 'fedavg-clipped':
      return fedAvgClipped(spec);
    case 'dp-fedavg':
      return dpFedAvg(spec, opts.random ?? cryptoUniform());
    case 'median':
      return median(spec, opts.random ?? cryptoUniform());
    case 'trimmed-mean':
      return trimmedMean(spec, opts.random ?? cryptoUniform());
  }
}

/** The reference use of a strategy: every update at once. */
export function aggregate(strategy: Strategy, params: number, updates: Iterable<ClientUpdate>): AggregateResult {
  const fold = strategy.begin(params);
  for (const u of updates) fold.add(u);
  return fold.finish();
}
