import { endianness } from 'node:os';
import type { TensorMode } from '../../proto/delta.js';

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

/**
 * Splits `n` elements of `width` bytes into byte planes, most significant byte first, after
 * replacing each target element by its residual against the base: itself (planes), target XOR
 * base (xor), or zigzag(target − base) of the bit patterns as integers (sub; widths 2 and 4).
 */
export function toPlanes(mode: TensorMode, width: number, target: Uint8Array, base: Uint8Array | null): Uint8Array[] {
  const n = target.length / width;
  const planes = Array.from({ length: width }, () => new Uint8Array(n));
  if (width === 4) {
    const t = u32(target);
    const b = base && mode !== 'planes' ? u32(base) : null;
    const [p0, p1, p2, p3] = planes as [Uint8Array, Uint8Array, Uint8Array, Uint8Array];
    for (let i = 0; i < n; i++) {
      let v = t[i]!;
      if (b) {
        if (mode === 'xor') v = (v ^ b[i]!) >>> 0;
        else {
          const d = (v - b[i]!) | 0;
          v = ((d << 1) ^ (d >> 31)) >>> 0;
        }
      }
      p0[i] = v >>> 24;
      p1[i] = (v >>> 16) & 0xff;
      p2[i] = (v >>> 8) & 0xff;
      p3[i] = v & 0xff;
    }
    return planes;
  }
  if (width === 2) {
    const t = u16(target);
    const b = base && mode !== 'planes' ? u16(base) : null;
    const [p0, p1] = planes as [Uint8Array, Uint8Array];
    for (let i = 0; i < n; i++) {
      let v = t[i]!;
      if (b) {
        if (mode === 'xor') v ^= b[i]!;
        else {
          const d = ((v - b[i]!) << 16) >> 16;
          v = ((d << 1) ^ (d >> 15)) & 0xffff;
        }
      }
      p0[i] = v >>> 8;
      p1[i] = v & 0xff;
    }
    return planes;
  }
  // width 8 (f64): planes or xor only.
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 8; k++) {
      const at = i * 8 + (7 - k);
      planes[k]![i] = base && mode === 'xor' ? target[at]! ^ base[at]! : target[at]!;
    }
  }
  return planes;
}

/** The inverse of toPlanes: the target bytes from planes (and the base for xor and sub). */
export function fromPlanes(mode: TensorMode, width: number, planes: Uint8Array[], base: Uint8Array | null): Uint8Array {
  const n = planes[0]!.length;
  const out = new Uint8Array(n * width);
  if (width === 4) {
    const o = new Uint32Array(out.buffer);
    const b = mode !== 'planes' && base ? u32(base) : null;
    const [p0, p1, p2, p3] = planes as [Uint8Array, Uint8Array, Uint8Array, Uint8Array];
    for (let i = 0; i < n; i++) {
      const v = ((p0[i]! << 24) | (p1[i]! << 16) | (p2[i]! << 8) | p3[i]!) >>> 0;
      if (!b) o[i] = v;
      else if (mode === 'xor') o[i] = v ^ b[i]!;
      else o[i] = (b[i]! + ((v >>> 1) ^ -(v & 1))) | 0;
    }
    return out;
  }
  if (width === 2) {
    const o = new Uint16Array(out.buffer);
    const b = mode !== 'planes' && base ? u16(base) : null;
    const [p0, p1] = planes as [Uint8Array, Uint8Array];
    for (let i = 0; i < n; i++) {
      const v = (p0[i]! << 8) | p1[i]!;
      if (!b) o[i] = v;
      else if (mode === 'xor') o[i] = v ^ b[i]!;
      else o[i] = b[i]! + ((v >>> 1) ^ -(v & 1));
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
