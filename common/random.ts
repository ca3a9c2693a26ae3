import { randomBytes } from 'node:crypto';

/**
 * mulberry32: a small seeded PRNG, uniform in [0, 1). The same seed gives the same sequence on every
 * machine: training data order, simulated devices' behaviour, test data.
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A standard normal sampler over a uniform source (Marsaglia's polar method; the spare value is
 * kept for the next call). With `mulberry32` it is reproducible; differential-privacy noise on a
 * device or the fleet must come from a cryptographic source (`cryptoUniform`).
 */
export function normalSampler(uniform: () => number): () => number {
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const s = spare;
      spare = null;
      return s;
    }
    for (;;) {
      const u = 2 * uniform() - 1;
      const v = 2 * uniform() - 1;
      const s = u * u + v * v;
      if (s > 0 && s < 1) {
        const m = Math.sqrt((-2 * Math.log(s)) / s);
        spare = v * m;
        return u * m;
      }
    }
  };
}

/** Uniform in [0, 1) from the operating system's CSPRNG, 53 bits per draw, read 8 KiB at a time. */
export function cryptoUniform(): () => number {
  let pool = new BigUint64Array(0);
  let at = 0;
  return () => {
    if (at === pool.length) {
      // A copy, so the view is aligned whatever pool the bytes came from.
      pool = new BigUint64Array(Uint8Array.from(randomBytes(8192)).buffer);
      at = 0;
    }
    return Number(pool[at++]! >> 11n) / 2 ** 53;
  };
}
