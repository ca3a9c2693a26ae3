/**
 * The generic binary diff: copy/add against the whole base, found with a rolling hash over
 * 16-byte windows of the base sampled every 8 bytes (so every common run of 23 bytes or more
 * is found), plus a check at each position of the last copy's displacement, which catches
 * same-layout files with short changes (an edited dimension, a renamed node). Literals are left
 * to the entropy coder of the program frame that carries them.
 */

const W = 16;
const STEP = 8;
const P = 0x01000193; // FNV prime as the rolling multiplier
/** P^(W-1) mod 2^32, to remove the byte leaving the window. */
const P_OUT = (() => {
  let v = 1;
  for (let i = 0; i < W - 1; i++) v = Math.imul(v, P);
  return v;
})();
/** Copies shorter than this cost more than the literal they replace. */
const MIN_COPY = 8;

export interface DiffSink {
  copy(baseOffset: number, length: number): void;
  /** Target bytes [start, end) are literal. */
  add(start: number, end: number): void;
}

function hashAt(b: Uint8Array, at: number): number {
  let h = 0;
  for (let k = 0; k < W; k++) h = (Math.imul(h, P) + b[at + k]!) | 0;
  return h;
}

function roll(h: number, out: number, inb: number): number {
  return (Math.imul((h - Math.imul(out, P_OUT)) | 0, P) + inb) | 0;
}

/** Mixes the rolling hash before masking it into the table. */
function slot(h: number, mask: number): number {
  return (Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 12) & mask;
}

export class BaseIndex {
  private readonly table: Int32Array;
  private readonly mask: number;

  /**
   * `skip`: base ranges not worth indexing, sorted (the float tensors, which TENSOR frames handle):
   * on a model the rest is a few percent of the file, so the index, and the time to build it,
   * shrink by as much. Matches may still run into skipped bytes; they only cannot start there.
   */
  constructor(
    private readonly base: Uint8Array,
    skip: readonly { offset: number; length: number }[] = [],
  ) {
    const indexed = base.length - skip.reduce((a, r) => a + r.length, 0);
    const entries = Math.max(1, Math.ceil(indexed / STEP));
    let size = 1024;
    while (size < entries * 2 && size < 1 << 24) size *= 2;
    this.table = new Int32Array(size).fill(-1);
    this.mask = size - 1;
    let from = 0;
    for (const r of [...skip, { offset: base.length, length: 0 }]) {
      this.indexRegion(from, Math.min(r.offset, base.length));
      from = Math.max(from, r.offset + r.length);
    }
  }

  private indexRegion(start: number, end: number): void {
    const base = this.base;
    if (end - start < W) return;
    let h = hashAt(base, start);
    for (let i = start; ; i++) {
      if (i % STEP === 0) {
        const s = slot(h, this.mask);
        if (this.table[s] === -1) this.table[s] = i; // keep the first: earlier bytes are likelier to be the counterpart
      }
      if (i + W >= end) break;
      h = roll(h, base[i]!, base[i + W]!);
    }
  }

  private matchLength(t: Uint8Array, at: number, end: number, from: number): number {
    const b = this.base;
    const max = Math.min(end - at, b.length - from);
    let n = 0;
    while (n < max && t[at + n] === b[from + n]) n++;
    return n;
  }

  /**
   * Diffs target bytes [start, end) against the base. `disp` is the displacement (base offset
   * minus target offset) of the previous copy, carried across calls; the new one is returned.
   */
  diff(t: Uint8Array, start: number, end: number, sink: DiffSink, disp: number): number {
    const b = this.base;
    let lit = start;
    let pos = start;
    let h = pos + W <= end ? hashAt(t, pos) : 0;
    while (pos < end) {
      let from = -1;
      let len = 0;
      const cont = pos + disp;
      if (cont >= 0 && cont < b.length && t[pos] === b[cont]) {
        len = this.matchLength(t, pos, end, cont);
        if (len >= MIN_COPY) from = cont;
      }
      if (from < 0 && pos + W <= end) {
        const cand = this.table[slot(h, this.mask)]!;
        if (cand >= 0) {
          len = this.matchLength(t, pos, end, cand);
          if (len >= W) from = cand;
        }
      }
      if (from >= 0) {
        let at = pos;
        while (at > lit && from > 0 && t[at - 1] === b[from - 1]) {
          at--;
          from--;
          len++;
        }
        if (at > lit) sink.add(lit, at);
        sink.copy(from, len);
        disp = from - at;
        pos = at + len;
        lit = pos;
        if (pos + W <= end) h = hashAt(t, pos);
        continue;
      }
      if (pos + W < end) h = roll(h, t[pos]!, t[pos + W]!);
      pos++;
    }
    if (lit < end) sink.add(lit, end);
    return disp;
  }
}
