/**
 * Rényi-DP accountant for the sampled Gaussian mechanism, as TensorFlow Privacy's rdp_accountant and
 * Google's dp_accounting compute it.
 *
 * One round of dp-fedavg adds N(0, (z·C)²) noise to a sum of updates clipped to C, each client taking
 * part with probability q: the sampled Gaussian mechanism with noise multiplier z. Its RDP at an
 * integer order α is (Mironov, Talwar and Zhang, 2019, "Rényi Differential Privacy of the Sampled
 * Gaussian Mechanism")
 *
 *   ε(α) = log A_α / (α − 1),   A_α = Σ_{i=0..α} C(α,i) · (1−q)^{α−i} · q^i · exp((i² − i) / (2z²))
 *
 * summed in log space (the terms overflow a double long before α = 256). RDP composes by addition
 * over steps and rounds (Mironov, 2017, Proposition 1). Only integer orders are supported: the
 * fractional-order series is not needed when the integers 2 … 64 and a few larger orders are on
 * the grid, which costs a few percent of ε at most.
 *
 * Conversion to (ε, δ)-DP at the best order, as dp_accounting does:
 *   ε = rdp + log((α−1)/α) − (log δ + log α)/(α − 1)
 * (Canonne, Kamath and Steinke, 2020, "The Discrete Gaussian for Differential Privacy", Prop. 12;
 * Balle et al., 2020, "Hypothesis Testing Interpretations and Renyi Differential Privacy", Thm. 21),
 * never worse than the classic rdp + log(1/δ)/(α − 1) (Mironov, 2017, Proposition 3), and 0 when
 * the KL bound δ ≥ √(1 − e^−rdp) already holds.
 */

export interface PrivacyRound {
  noiseMultiplier: number;
  /** Probability that a given client takes part in a step, in [0, 1]. */
  samplingRate: number;
  /** Steps with these parameters; default 1. */
  steps?: number;
}

export const DEFAULT_ORDERS: readonly number[] = [...Array.from({ length: 63 }, (_, i) => i + 2), 80, 96, 128, 256];

function checkOrders(orders: readonly number[]): void {
  for (const a of orders) {
    if (!Number.isInteger(a) || a < 2 || a > 10_000) throw new Error(`privacy: orders must be integers in [2, 10000], got ${a}`);
  }
}

/** log A_α for integer α, 0 < q < 1, z > 0. */
function logA(q: number, z: number, alpha: number): number {
  const logQ = Math.log(q);
  const log1mQ = Math.log1p(-q);
  const terms = new Float64Array(alpha + 1);
  let logBinom = 0;
  let max = -Infinity;
  for (let i = 0; i <= alpha; i++) {
    if (i > 0) logBinom += Math.log((alpha - i + 1) / i);
    const t = logBinom + i * logQ + (alpha - i) * log1mQ + (i * i - i) / (2 * z * z);
    terms[i] = t;
    if (t > max) max = t;
  }
  let sum = 0;
  for (let i = 0; i <= alpha; i++) sum += Math.exp(terms[i]! - max);
  return max + Math.log(sum);
}

function checkRound(r: PrivacyRound): number {
  const steps = r.steps ?? 1;
  if (!(r.noiseMultiplier >= 0)) throw new Error(`privacy: noiseMultiplier must be ≥ 0, got ${r.noiseMultiplier}`);
  if (!(r.samplingRate >= 0 && r.samplingRate <= 1)) throw new Error(`privacy: samplingRate must be in [0, 1], got ${r.samplingRate}`);
  if (!(steps >= 0 && Number.isFinite(steps))) throw new Error(`privacy: steps must be finite and ≥ 0, got ${steps}`);
  return steps;
}

/** RDP of `steps` compositions of the sampled Gaussian mechanism at each order. Infinity when z = 0 and q > 0. */
export function rdp(round: PrivacyRound, orders: readonly number[] = DEFAULT_ORDERS): number[] {
  const steps = checkRound(round);
  checkOrders(orders);
  const { noiseMultiplier: z, samplingRate: q } = round;
  return orders.map((alpha) => {
    if (q === 0 || steps === 0) return 0;
    if (z === 0) return Infinity;
    // q = 1 is the plain Gaussian mechanism: α/(2z²) exactly (Mironov, 2017, Table II).
    const perStep = q === 1 ? alpha / (2 * z * z) : logA(q, z, alpha) / (alpha - 1);
    // log A_α ≥ 0 mathematically; rounding can leave a hair below it.
    return Math.max(0, perStep) * steps;
  });
}

/** (ε, δ) at the best order for the composition of `rounds`. */
export function epsilon(rounds: readonly PrivacyRound[], delta: number, orders: readonly number[] = DEFAULT_ORDERS): { epsilon: number; order: number } {
  if (!(delta > 0 && delta < 1)) throw new Error(`privacy: delta must be in (0, 1), got ${delta}`);
  checkOrders(orders);
  if (orders.length === 0) throw new Error('privacy: no orders');
  const total = new Array<number>(orders.length).fill(0);
  for (const r of rounds) rdp(r, orders).forEach((x, i) => (total[i]! += x));
  let best = Infinity;
  let bestOrder = orders[0]!;
  orders.forEach((alpha, i) => {
    const r = total[i]!;
    let eps: number;
    if (delta * delta + Math.expm1(-r) > 0) eps = 0;
    else {
      const tight = r + Math.log1p(-1 / alpha) - (Math.log(delta) + Math.log(alpha)) / (alpha - 1);
      const classic = r - Math.log(delta) / (alpha - 1);
      eps = Math.min(tight, classic);
    }
    if (eps < best) {
      best = eps;
      bestOrder = alpha;
    }
  });
  return { epsilon: Math.max(0, best), order: bestOrder };
}

/**
 * The smallest noise multiplier (to a relative 1e-4, rounded up) whose ε after `rounds` rounds at
 * sampling rate q stays within targetEpsilon, by bisection: ε falls monotonically as z grows.
 */
export function noiseForEpsilon(targetEpsilon: number, delta: number, samplingRate: number, rounds: number): number {
  if (!(targetEpsilon > 0)) throw new Error(`privacy: targetEpsilon must be > 0, got ${targetEpsilon}`);
  const eps = (z: number): number => epsilon([{ noiseMultiplier: z, samplingRate, steps: rounds }], delta).epsilon;
  if (eps(0) <= targetEpsilon) return 0;
  let lo = 0;
  let hi = 1;
  while (eps(hi) > targetEpsilon) {
    lo = hi;
    hi *= 2;
    if (hi > 1e6) throw new Error(`privacy: ε ≤ ${targetEpsilon} is out of reach`);
  }
  while (hi - lo > 1e-4 * hi) {
    const mid = (lo + hi) / 2;
    if (eps(mid) > targetEpsilon) lo = mid;
    else hi = mid;
  }
  return hi;
}
