import * as zlib from 'node:zlib';
import { EdgefleetError } from '../../proto/index.js';
import { DELTA_HEADER_BYTES, DELTA_MAGIC, DELTA_VERSION, HDR, LAYOUT, type LayoutKind } from '../../proto/delta.js';

/** Varints above this are refused: they could not be exact JavaScript numbers. */
const MAX_VARINT = Number.MAX_SAFE_INTEGER;

/** Appends unsigned LEB128. */
export function putVarint(out: number[], v: number): void {
  let x = v;
  while (x >= 0x80) {
    out.push((x % 0x80) | 0x80);
    x = Math.floor(x / 0x80);
  }
  out.push(x);
}

export function zigzag(v: number): number {
  return v >= 0 ? v * 2 : -v * 2 - 1;
}

export function unzigzag(v: number): number {
  return v % 2 === 0 ? v / 2 : -(v + 1) / 2;
}

/** A cursor over bytes already in memory; reading past the end is corruption (the length said otherwise). */
export class Cursor {
  pos = 0;
  constructor(
    readonly buf: Uint8Array,
    private readonly what: string,
  ) {}

  get left(): number {
    return this.buf.length - this.pos;
  }

  u8(): number {
    if (this.pos >= this.buf.length) throw corrupt(`${this.what} ends inside an instruction`);
    return this.buf[this.pos++]!;
  }

  varint(): number {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 8; i++) {
      const b = this.u8();
      v += (b & 0x7f) * mul;
      if (b < 0x80) {
        if (v > MAX_VARINT) throw corrupt(`${this.what}: integer too large`);
        return v;
      }
      mul *= 0x80;
    }
    throw corrupt(`${this.what}: integer longer than 8 bytes`);
  }

  bytes(n: number): Uint8Array {
    if (n > this.left) throw corrupt(`${this.what} ends inside a literal`);
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }
}

export function corrupt(message: string): EdgefleetError {
  return new EdgefleetError('EF_DELTA_CORRUPT', `patch is corrupt: ${message}`);
}

const CRC_TABLE = (() => {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
})();

const nativeCrc = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

/** CRC-32 (ISO-HDLC, as zip and PNG), continued from `value`. */
export function crc32(data: Uint8Array, value = 0): number {
  if (nativeCrc) return nativeCrc(data, value);
  let c = ~value;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

export interface PatchHeader {
  version: number;
  /** null for an image: a patch against the empty file. */
  baseSha256: string | null;
  baseSize: number;
  targetSha256: string;
  targetSize: number;
  layout: LayoutKind;
}

const ZERO_SHA = '0'.repeat(64);

function readU64(b: Buffer, at: number): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(MAX_VARINT)) throw corrupt('a size in the header is too large');
  return Number(v);
}

export function encodeHeader(h: Omit<PatchHeader, 'version'>): Buffer {
  const b = Buffer.alloc(DELTA_HEADER_BYTES);
  b.write(DELTA_MAGIC, HDR.magic, 'latin1');
  b[HDR.version] = DELTA_VERSION;
  b[HDR.flags] = 0;
  b.writeUInt16LE(DELTA_HEADER_BYTES, HDR.headerBytes);
  b.write(h.baseSha256 ?? ZERO_SHA, HDR.baseSha256, 'hex');
  b.writeBigUInt64LE(BigInt(h.baseSize), HDR.baseSize);
  b.write(h.targetSha256, HDR.targetSha256, 'hex');
  b.writeBigUInt64LE(BigInt(h.targetSize), HDR.targetSize);
  b[HDR.layout] = LAYOUT[h.layout];
  b.writeUInt32LE(crc32(b.subarray(0, HDR.crc32)), HDR.crc32);
  return b;
}

/** Parses and checks the fixed header; `b` holds at least the file's first bytes. */
export function decodeHeader(b: Buffer): PatchHeader {
  if (b.length < 4 || b.toString('latin1', 0, 4) !== DELTA_MAGIC) {
    throw new EdgefleetError(b.length < 4 ? 'EF_DELTA_TRUNCATED' : 'EF_DELTA_CORRUPT', 'not an edgefleet patch (no EFDP magic)');
  }
  if (b.length < 6) throw new EdgefleetError('EF_DELTA_TRUNCATED', 'patch ends inside its header');
  if (b[HDR.version] !== DELTA_VERSION) {
    throw new EdgefleetError('EF_DELTA_UNSUPPORTED', `patch format version ${b[HDR.version]}; this build reads version ${DELTA_VERSION}`);
  }
  if (b.length < DELTA_HEADER_BYTES) throw new EdgefleetError('EF_DELTA_TRUNCATED', 'patch ends inside its header');
  if (b.readUInt32LE(HDR.crc32) !== crc32(b.subarray(0, HDR.crc32))) throw corrupt('header checksum mismatch');
  if (b[HDR.flags] !== 0) throw new EdgefleetError('EF_DELTA_UNSUPPORTED', `patch flags ${b[HDR.flags]} are not defined in version ${DELTA_VERSION}`);
  if (b.readUInt16LE(HDR.headerBytes) !== DELTA_HEADER_BYTES) throw corrupt('header length');
  const layoutId = b[HDR.layout]!;
  const layout = (Object.keys(LAYOUT) as LayoutKind[]).find((k) => LAYOUT[k] === layoutId);
  if (!layout || b[HDR.reserved] !== 0 || b[HDR.reserved + 1] !== 0 || b[HDR.reserved + 2] !== 0) throw corrupt('reserved header bytes');
  const baseSha = b.toString('hex', HDR.baseSha256, HDR.baseSha256 + 32);
  const baseSize = readU64(b, HDR.baseSize);
  if (baseSha === ZERO_SHA && baseSize !== 0) throw corrupt('an image with a base size');
  return {
    version: DELTA_VERSION,
    baseSha256: baseSha === ZERO_SHA ? null : baseSha,
    baseSize,
    targetSha256: b.toString('hex', HDR.targetSha256, HDR.targetSha256 + 32),
    targetSize: readU64(b, HDR.targetSize),
    layout,
  };
}
