/**
 * The kernel behind the coordinate-wise robust strategies: for every coordinate, the mean of the
 * values whose rank among the clients lies in [r0, r1). The median is ranks [⌊(n−1)/2⌋, ⌊n/2⌋+1)
 * (one value, or the two middle ones); the trimmed mean is [k, n−k).
 *
 * Layout: the updates stay client-major (one array per client), so reading one coordinate across
 * clients is a stride of a whole model. Coordinates are therefore processed in blocks: a block of
 * each client's row is copied into one scratch buffer small enough for L2, and each coordinate's
 * column is read from there.
 *
 * Selection: quickselect (Hoare, 1961) with median-of-3 pivots that keeps only the sum of the ranks
 * wanted. A part lying wholly inside [r0, r1) is summed without further partitioning and a part
 * wholly outside is dropped, so the trimmed mean costs little more than two selections. Partitions
 * are branch-free (the comparison result moves an index rather than choosing a path): on random
 * data a branching partition mispredicts half its comparisons and measured about 4× slower. The
 * first partition of each column reads straight from the block scratch, fusing the transpose into
 * it. Tried and measured no better on 100 clients: adaptive pivots, a 5-sample pivot, dual-pivot
 * first passes, Floyd–Rivest sampling, out-of-place partitions, reading rows without the block copy.
 */

/** Below this many values a part is insertion-sorted rather than partitioned again. */
const SMALL = 6;
/** Scratch budget per block: block width × clients × 4 bytes stays near this many bytes. */
const BLOCK_BYTES = 128 * 1024;

function median3(x: number, y: number, z: number): number {
  return x < y ? (y < z ? y : x < z ? z : x) : x < z ? x : y < z ? z : y;
}

/**
 * a[lo, hi) holds exactly the values of ranks lo … hi−1 (in any order); returns the sum of those
 * whose rank is in [r0, r1), rearranging a[lo, hi). `depth` bounds the partitioning levels: clients
 * choose their values, and a run of bad pivots must not turn into quadratic time, so past it the
 * part is sorted natively instead (introselect, Musser, 1997).
 */
function rankSum(a: Float32Array, lo: number, hi: number, r0: number, r1: number, depth: number): number {
  if (r0 <= lo && hi <= r1) {
    let s = 0;
    for (let i = lo; i < hi; i++) s += a[i]!;
    return s;
  }
  if (r1 <= lo || hi <= r0) return 0;
  if (hi - lo <= SMALL || depth === 0) {
    if (depth === 0) a.subarray(lo, hi).sort();
    else {
      for (let i = lo + 1; i < hi; i++) {
        const v = a[i]!;
        let j = i - 1;
        for (; j >= lo && a[j]! > v; j--) a[j + 1] = a[j]!;
        a[j + 1] = v;
      }
    }
    let s = 0;
    const from = r0 > lo ? r0 : lo;
    const to = r1 < hi ? r1 : hi;
    for (let i = from; i < to; i++) s += a[i]!;
    return s;
  }
  const p = median3(a[lo]!, a[(lo + hi) >>> 1]!, a[hi - 1]!);
  // Branch-free Lomuto: values below p gather at the front.
  let m = lo;
  for (let i = lo; i < hi; i++) {
    const v = a[i]!;
    a[i] = a[m]!;
    a[m] = v;
    m += +(v < p);
  }
  if (m === lo) {
    // p is the least value here: split off every copy of it, so a run of equal values (a frozen
    // layer's zeros) ends in one more pass instead of shrinking by one per pass.
    for (let i = lo; i < hi; i++) {
      const v = a[i]!;
      a[i] = a[m]!;
      a[m] = v;
      m += +(v <= p);
    }
    const from = r0 > lo ? r0 : lo;
    const to = r1 < m ? r1 : m;
    return (to > from ? p * (to - from) : 0) + rankSum(a, m, hi, r0, r1, depth - 1);
  }
  return rankSum(a, lo, m, r0, r1, depth - 1) + rankSum(a, m, hi, r0, r1, depth - 1);
}

/**
 * out[i] = mean of the values of rank r0 … r1−1 among rows[0][i], rows[1][i], …. Every row has
 * `params` values; 0 ≤ r0 < r1 ≤ rows.length. Throws if an input holds NaN or ±Inf.
 */
export function rankMeans(rows: readonly Float32Array[], params: number, r0: number, r1: number): Float32Array {
  const n = rows.length;
  if (!(n > 0 && 0 <= r0 && r0 < r1 && r1 <= n)) throw new Error(`rankMeans: ranks [${r0}, ${r1}) of ${n} clients`);
  const out = new Float32Array(params);
  const width = Math.max(16, Math.min(4096, Math.floor(BLOCK_BYTES / 4 / n)));
  const block = new Float32Array(width * n);
  const col = new Float32Array(n);
  const inv = 1 / (r1 - r0);
  const mid = n >>> 1;
  const depth = 2 * Math.ceil(Math.log2(n + 1)) + 4;
  // v − v is 0 for a finite v and NaN for NaN or ±Inf; summing it costs no memory traffic.
  let nonFinite = 0;
  for (let start = 0; start < params; start += width) {
    const w = Math.min(width, params - start);
    for (let c = 0; c < n; c++) block.set(rows[c]!.subarray(start, start + w), c * w);
    for (let j = 0; j < w; j++) {
      const p = median3(block[j]!, block[mid * w + j]!, block[(n - 1) * w + j]!);
      let l = 0;
      let r = n - 1;
      for (let c = 0, at = j; c < n; c++, at += w) {
        const v = block[at]!;
        nonFinite += v - v;
        const below = +(v < p);
        col[l] = v;
        col[r] = v;
        l += below;
        r += below - 1;
      }
      out[start + j] = (rankSum(col, 0, l, r0, r1, depth) + rankSum(col, l, n, r0, r1, depth)) * inv;
    }
  }
  if (nonFinite !== 0) throw new Error('rankMeans: an update holds NaN or ±Inf');
  return out;
}
