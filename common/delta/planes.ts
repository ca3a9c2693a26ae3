import { endianness } from 'node:os';
import { FLOAT_WIDTH, type FloatKind, type TensorMode } from '../../proto/delta.js';

// Typed-array views below read the file's little-endian elements in host order.
if (endianness() !== 'LE') throw new Error('edgefleet delta patches need a little-endian host');

/** The bytes as they are when aligned for 8-byte elements, else an aligned copy (a subarray of a file buffer may start at any byte). */
function aligned(src: Uint8Array): Uint8Array {
  if (src.byteOffset % 8 === 0) return src;
  const out = new Uint8Array(src.length);
  out.set(src);
  return out;
}

function u32(b: Uint8Array): Uint32Array {
  const a = aligned(b);
  return new Uint32Array(a.buffer, a.byteOffset, a.length >> 2);
}

function u16(b: Uint8Array): Uint16Array {
  const a = aligned(b);
  return new Uint16Array(a.buffer, a.byteOffset, a.length >> 1);
}

/** Where each kind keeps its exponent: the key elements are ordered by in xor and sub modes. */
const EXPONENT: Record<FloatKind, { shift: number; mask: number } | null> = {
  f32: { shift: 23, mask: 0xff },
  f16: { shift: 10, mask: 0x1f },
  bf16: { shift: 7, mask: 0xff },
  f64: null,
};

/**
 * Where each element goes in the planes of xor and sub modes: ordered by the base element's
 * exponent, stable (a counting sort). A fine-tune moves weights by amounts that scale with their
 * magnitude, so residuals of one exponent look alike, and grouped together they code smaller
 * (about 6 % on real fine-tunes). The decoder derives the same order from the base: it costs no
 * bytes. Returned as the first slot of each exponent: element i goes to `next[key(i)]++`, which
 * walks the elements in file order and touches only a few sequential streams (one per exponent
 * in use), so it stays fast where a permutation array would jump around memory.
 */
function exponentStarts(base: Uint32Array | Uint16Array, shift: number, mask: number): Uint32Array {
  const n = base.length;
  const next = new Uint32Array(mask + 2);
  for (let i = 0; i < n; i++) next[((base[i]! >>> shift) & mask) + 1]!++;
  for (let k = 0; k <= mask; k++) next[k + 1]! += next[k]!;
  return next;
}

/**
 * Splits `n` elements into byte planes, most significant byte first, after replacing each target
 * element by its residual against the base: itself (planes), target XOR base (xor), or
 * zigzag(target − base) of the bit patterns as integers (sub; 2- and 4-byte kinds). In xor and
 * sub modes the elements of 2- and 4-byte kinds are placed in the base's exponent order.
 */
export function toPlanes(mode: TensorMode, kind: FloatKind, target: Uint8Array, base: Uint8Array | null): Uint8Array[] {
  const width = FLOAT_WIDTH[kind];
  const n = target.length / width;
  const planes = Array.from({ length: width }, () => new Uint8Array(n));
  const ex = EXPONENT[kind];
  if (width === 4) {
    const t = u32(target);
    const [p0, p1, p2, p3] = planes as [Uint8Array, Uint8Array, Uint8Array, Uint8Array];
    if (mode === 'planes' || !base) {
      for (let i = 0; i < n; i++) {
        const v = t[i]!;
        p0[i] = v >>> 24;
        p1[i] = (v >>> 16) & 0xff;
        p2[i] = (v >>> 8) & 0xff;
        p3[i] = v & 0xff;
      }
      return planes;
    }
    const b = u32(base);
    const { shift, mask } = ex!;
    const next = exponentStarts(b, shift, mask);
    const xor = mode === 'xor';
    for (let i = 0; i < n; i++) {
      const bi = b[i]!;
      const ti = t[i]!;
      let v: number;
      if (xor) v = (ti ^ bi) >>> 0;
      else {
        const d = (ti - bi) | 0;
        v = ((d << 1) ^ (d >> 31)) >>> 0;
      }
      const j = next[(bi >>> shift) & mask]!++;
      p0[j] = v >>> 24;
      p1[j] = (v >>> 16) & 0xff;
      p2[j] = (v >>> 8) & 0xff;
      p3[j] = v & 0xff;
    }
    return planes;
  }
  if (width === 2) {
    const t = u16(target);
    const [p0, p1] = planes as [Uint8Array, Uint8Array];
    if (mode === 'planes' || !base) {
      for (let i = 0; i < n; i++) {
        p0[i] = t[i]! >>> 8;
        p1[i] = t[i]! & 0xff;
      }
      return planes;
    }
    const b = u16(base);
    const { shift, mask } = ex!;
    const next = exponentStarts(b, shift, mask);
    for (let i = 0; i < n; i++) {
      const bi = b[i]!;
      let v = t[i]!;
      if (mode === 'xor') v ^= bi;
      else {
        const d = ((v - bi) << 16) >> 16;
        v = ((d << 1) ^ (d >> 15)) & 0xffff;
      }
      const j = next[(bi >>> shift) & mask]!++;
      p0[j] = v >>> 8;
      p1[j] = v & 0xff;
    }
    return planes;
  }
  // 8 bytes (f64): planes or xor only, in file order.
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 8; k++) {
      const at = i * 8 + (7 - k);
      planes[k]![i] = base && mode === 'xor' ? target[at]! ^ base[at]! : target[at]!;
    }
  }
  return planes;
}

/** The inverse of toPlanes: the target bytes from planes (and the base for xor and sub). */
export function fromPlanes(mode: TensorMode, kind: FloatKind, planes: Uint8Array[], base: Uint8Array | null): Uint8Array {
  const width = FLOAT_WIDTH[kind];
  const n = planes[0]!.length;
  const out = new Uint8Array(n * width);
  const ex = EXPONENT[kind];
  if (width === 4) {
    const o = new Uint32Array(out.buffer);
    const [p0, p1, p2, p3] = planes as [Uint8Array, Uint8Array, Uint8Array, Uint8Array];
    if (mode === 'planes' || !base) {
      for (let i = 0; i < n; i++) o[i] = (p0[i]! << 24) | (p1[i]! << 16) | (p2[i]! << 8) | p3[i]!;
      return out;
    }
    const b = u32(base);
    const { shift, mask } = ex!;
    const next = exponentStarts(b, shift, mask);
    if (mode === 'xor') {
      for (let i = 0; i < n; i++) {
        const bi = b[i]!;
        const j = next[(bi >>> shift) & mask]!++;
        o[i] = ((p0[j]! << 24) | (p1[j]! << 16) | (p2[j]! << 8) | p3[j]!) ^ bi;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const bi = b[i]!;
        const j = next[(bi >>> shift) & mask]!++;
        const v = (p0[j]! << 24) | (p1[j]! << 16) | (p2[j]! << 8) | p3[j]!;
        o[i] = (bi + ((v >>> 1) ^ -(v & 1))) | 0;
      }
    }
    return out;
  }
  if (width === 2) {
    const o = new Uint16Array(out.buffer);
    const [p0, p1] = planes as [Uint8Array, Uint8Array];
    if (mode === 'planes' || !base) {
      for (let i = 0; i < n; i++) o[i] = (p0[i]! << 8) | p1[i]!;
      return out;
    }
    const b = u16(base);
    const { shift, mask } = ex!;
    const next = exponentStarts(b, shift, mask);
    for (let i = 0; i < n; i++) {
      const bi = b[i]!;
      const j = next[(bi >>> shift) & mask]!++;
      const v = (p0[j]! << 8) | p1[j]!;
      o[i] = mode === 'xor' ? v ^ bi : bi + ((v >>> 1) ^ -(v & 1));
    }
    return out;
  }
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 8; k++) {
      const at = i * 8 + (7 - k);
      out[at] = base && mode === 'xor' ? planes[k]![i]! ^ base[at]! : planes[k]![i]!;
    }
  }
  return out;
}

/** Order-0 entropy of `p` in bytes: what an ideal entropy coder would need for it. */
export function entropyBytes(p: Uint8Array): number {
  const h = new Uint32Array(256);
  for (let i = 0; i < p.length; i++) h[p[i]!]!++;
  let bits = 0;
  const n = p.length;
  for (let s = 0; s < 256; s++) {
    const c = h[s]!;
    if (c > 0) bits += c * Math.log2(n / c);
  }
  return bits / 8;
}
