/**
 * The tensor bundle format ("EFTB", version 1): named float tensors plus a JSON `meta` object. A
 * device's federated-learning update travels in one (its `meta` is an UpdateMeta, proto/fl.ts), so
 * the decoder treats its input as hostile: it throws nothing but EF_BUNDLE_INVALID or
 * EF_BUNDLE_TOO_LARGE, allocates only within the caller's limits, and runs in time linear in the
 * input. Specified in proto/README.md ("Tensor bundles").
 *
 *   prefix   12 bytes: magic, version, flags, reserved, header length H
 *   header   H bytes of UTF-8 JSON, zero padding to a multiple of 8
 *   data     each tensor at a 4-aligned offset, in header order (a q8 tensor padded to 4)
 *   trailer  CRC-32 of every byte before it
 */

import zlib from 'node:zlib';
import { z } from 'zod';
import { jsonNestsDeeperThan, MAX_JSON_DEPTH, summarizeIssues } from './codec.js';
import { EdgefleetError } from './errors.js';

export const BUNDLE_MAGIC = 'EFTB';
export const BUNDLE_VERSION = 1;

/** Offsets of the fixed prefix; all integers little-endian. */
export const BUNDLE_HDR = {
  magic: 0, // 4 bytes "EFTB"
  version: 4, // u8
  flags: 5, // u8, 0: no flags are defined
  reserved: 6, // u16, 0
  headerBytes: 8, // u32 H, 1..BUNDLE_MAX_HEADER_BYTES
  header: 12, // H bytes of JSON
} as const;

export const BUNDLE_MAX_HEADER_BYTES = 64 * 1024;
export const BUNDLE_MAX_NAME_CHARS = 256;
export const BUNDLE_MAX_DIMS = 8;
const TRAILER_BYTES = 4;
/** The shortest input that can hold a prefix, a one-byte header with its padding, and the trailer. */
const MIN_BUNDLE_BYTES = align8(BUNDLE_HDR.header + 1) + TRAILER_BYTES;

/** Why a bundle was refused: `details.reason` of the EdgefleetError. `too-large` goes with EF_BUNDLE_TOO_LARGE, all others with EF_BUNDLE_INVALID. */
export const BUNDLE_REJECT_REASONS = [
  'truncated',
  'too-large',
  'magic',
  'version',
  'flags',
  'reserved',
  'header',
  'checksum',
  'length',
  'padding',
  'shape',
  'non-finite',
] as const;
export type BundleRejectReason = (typeof BUNDLE_REJECT_REASONS)[number];
export interface BundleRejectDetails {
  reason: BundleRejectReason;
}

export interface BundleTensor {
  name: string;
  shape: number[];
  data: Float32Array;
}
export interface Bundle {
  tensors: BundleTensor[];
  meta: Record<string, unknown>;
}

export interface BundleLimits {
  maxBytes: number;
  maxTensors: number;
  /** Elements over all tensors: bounds what decoding allocates, since q8 data expands fourfold. */
  maxElements: number;
}
export const DEFAULT_BUNDLE_LIMITS: Readonly<BundleLimits> = Object.freeze({
  maxBytes: 64 * 1024 * 1024,
  maxTensors: 4096,
  maxElements: 16 * 1024 * 1024,
});

export type BundleEncoding = 'float32' | 'q8';
export interface EncodeOptions {
  encoding?: BundleEncoding;
  /** Uniform in [0, 1), for q8's stochastic rounding; injected so tests and simulations can seed it. */
  random?: () => number;
}

const TensorName = z
  .string()
  .min(1)
  .max(BUNDLE_MAX_NAME_CHARS)
  .regex(/^\P{Cc}*$/u, 'control characters are not allowed');
const Shape = z.array(z.number().int().nonnegative()).max(BUNDLE_MAX_DIMS);
const TensorEntry = z.discriminatedUnion('encoding', [
  z.strictObject({ name: TensorName, shape: Shape, encoding: z.literal('float32') }),
  z.strictObject({ name: TensorName, shape: Shape, encoding: z.literal('q8'), min: z.number(), scale: z.number().nonnegative() }),
]);
// z.custom hands the parsed object back untouched: copying keys into a fresh object, as z.record does,
// would turn an own "__proto__" key from JSON.parse into a prototype.
const JsonObject = z.custom<Record<string, unknown>>((v) => typeof v === 'object' && v !== null && !Array.isArray(v), 'must be a JSON object');

/** The header JSON. */
export const BundleHeader = z.strictObject({
  tensors: z.array(TensorEntry).superRefine((entries, ctx) => {
    const seen = new Set<string>();
    for (const [i, t] of entries.entries()) {
      if (seen.has(t.name)) ctx.addIssue({ code: 'custom', path: [i, 'name'], message: `duplicate tensor name ${JSON.stringify(t.name)}` });
      seen.add(t.name);
    }
  }),
  meta: JsonObject,
});
export type BundleHeader = z.infer<typeof BundleHeader>;
type TensorEntry = z.infer<typeof TensorEntry>;

function reject(reason: BundleRejectReason, message: string): EdgefleetError {
  const details: BundleRejectDetails = { reason };
  return new EdgefleetError(reason === 'too-large' ? 'EF_BUNDLE_TOO_LARGE' : 'EF_BUNDLE_INVALID', `tensor bundle: ${message}`, { details });
}

function align4(n: number): number {
  return Math.ceil(n / 4) * 4;
}
function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

// The wire is little-endian; on such a host typed arrays can be copied and viewed as they are.
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

const nativeCrc = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;
let crcTable: Int32Array | undefined;
/** CRC-32 (ISO-HDLC, as zip and PNG). zlib.crc32 needs Node 20.15; the table is for older 20.x. */
function crc32(data: Uint8Array): number {
  if (nativeCrc) return nativeCrc(data, 0);
  crcTable ??= Int32Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c;
  });
  let c = -1;
  for (let i = 0; i < data.length; i++) c = crcTable[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

function firstNonFinite(a: Float32Array): number {
  for (let i = 0; i < a.length; i++) {
    const v = a[i]!;
    // v - v is NaN exactly for NaN and ±Infinity, and cheaper than Number.isFinite in this loop.
    if (v - v !== 0) return i;
  }
  return -1;
}

/**
 * Per-tensor affine 8-bit quantization with stochastic rounding: q = floor((x − min)/scale + u),
 * u uniform in [0, 1), so E[min + q·scale] = x (unbiased, which keeps the average of many devices'
 * updates unbiased too) and |min + q·scale − x| < scale.
 */
export function quantizeQ8(x: Float32Array, random: () => number): { q: Uint8Array; min: number; scale: number } {
  const q = new Uint8Array(x.length);
  if (x.length === 0) return { q, min: 0, scale: 0 };
  let min = Infinity;
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) {
    const v = x[i]!;
    if (v - v !== 0) throw reject('non-finite', `value ${v} at element ${i}`);
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const scale = (max - min) / 255;
  if (scale === 0) return { q, min, scale };
  for (let i = 0; i < x.length; i++) {
    const r = Math.floor((x[i]! - min) / scale + random());
    q[i] = r < 0 ? 0 : r > 255 ? 255 : r;
  }
  return { q, min, scale };
}

export function dequantizeQ8(q: Uint8Array, min: number, scale: number): Float32Array {
  // 256 possible values: computing them once makes the loop a table lookup.
  const table = new Float32Array(256);
  for (let k = 0; k < 256; k++) table[k] = min + k * scale;
  const out = new Float32Array(q.length);
  for (let i = 0; i < q.length; i++) out[i] = table[q[i]!]!;
  return out;
}

interface Planned {
  entry: TensorEntry;
  bytes: Uint8Array;
}

/**
 * Writes a bundle. Refuses (EF_BUNDLE_INVALID) what the decoder would refuse: a value that is not
 * finite (`non-finite`), a shape that is not 0–8 non-negative integers or does not match the data's
 * length (`shape`), a name that is empty, too long, has control characters or repeats, or a meta
 * that is not a JSON object nesting at most MAX_JSON_DEPTH levels (`header`). A header over 64 KiB
 * is EF_BUNDLE_TOO_LARGE. The decoder's limits are the receiver's and are not applied here.
 */
export function encodeBundle(bundle: Bundle, opts: EncodeOptions = {}): Buffer {
  const encoding = opts.encoding ?? 'float32';
  const random = opts.random ?? Math.random;
  const planned: Planned[] = [];
  for (const t of bundle.tensors) {
    const where = `tensor ${JSON.stringify(t.name)}`;
    if (!Shape.safeParse(t.shape).success) throw reject('shape', `${where}: shape ${JSON.stringify(t.shape)} is not 0–${BUNDLE_MAX_DIMS} non-negative integers`);
    if (t.data.length !== elementCount(t.shape)) throw reject('shape', `${where}: ${t.data.length} values for shape [${t.shape.join(', ')}]`);
    const bad = firstNonFinite(t.data);
    if (bad >= 0) throw reject('non-finite', `${where}: value ${t.data[bad]} at element ${bad}`);
    if (encoding === 'q8') {
      const { q, min, scale } = quantizeQ8(t.data, random);
      planned.push({ entry: { name: t.name, shape: [...t.shape], encoding, min, scale }, bytes: q });
    } else {
      planned.push({ entry: { name: t.name, shape: [...t.shape], encoding }, bytes: float32Bytes(t.data) });
    }
  }
  const header = headerBytes(planned.map((p) => p.entry), bundle.meta);
  const dataStart = align8(BUNDLE_HDR.header + header.length);
  let total = dataStart;
  for (const p of planned) total += align4(p.bytes.length);
  total += TRAILER_BYTES;

  // Buffer.alloc zero-fills, which writes every padding byte.
  const out = Buffer.alloc(total);
  out.write(BUNDLE_MAGIC, BUNDLE_HDR.magic, 'latin1');
  out[BUNDLE_HDR.version] = BUNDLE_VERSION;
  out.writeUInt32LE(header.length, BUNDLE_HDR.headerBytes);
  out.set(header, BUNDLE_HDR.header);
  let at = dataStart;
  for (const p of planned) {
    out.set(p.bytes, at);
    at += align4(p.bytes.length);
  }
  out.writeUInt32LE(crc32(out.subarray(0, at)), at);
  return out;
}

function float32Bytes(data: Float32Array): Uint8Array {
  if (LITTLE_ENDIAN) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(data.length * 4);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) dv.setFloat32(i * 4, data[i]!, true);
  return out;
}

function headerBytes(entries: TensorEntry[], meta: Record<string, unknown>): Buffer {
  let json: string;
  try {
    json = JSON.stringify({ tensors: entries, meta });
  } catch (e) {
    // BigInt, a cycle, or nesting deep enough to exhaust the stack.
    throw reject('header', `meta has no JSON form (${e instanceof Error ? e.message : String(e)})`);
  }
  // Checked on the text as the decoder will see it, so the encoder never writes a header it refuses.
  if (jsonNestsDeeperThan(json, MAX_JSON_DEPTH)) throw reject('header', `meta nests deeper than ${MAX_JSON_DEPTH - 1} levels`);
  const parsed = BundleHeader.safeParse(JSON.parse(json));
  if (!parsed.success) throw reject('header', summarizeIssues(parsed.error.issues));
  const bytes = Buffer.from(json, 'utf8');
  if (bytes.length > BUNDLE_MAX_HEADER_BYTES) {
    throw reject('too-large', `header is ${bytes.length} bytes; the format allows ${BUNDLE_MAX_HEADER_BYTES} (fewer tensors, shorter names or a smaller meta)`);
  }
  return bytes;
}

// fatal: invalid UTF-8 is refused rather than replaced; ignoreBOM: a BOM stays in the text, so JSON.parse refuses it.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Reads a bundle, checking cheap things before expensive ones and every limit before allocating.
 * q8 tensors come back dequantized. A float32 tensor whose bytes sit at a 4-aligned address is a
 * view on `bytes` (no copy): it aliases the input, which must not be changed while the tensor is
 * in use; otherwise it is a copy.
 */
export function decodeBundle(bytes: Uint8Array, limits: Partial<BundleLimits> = {}): Bundle {
  // `??` rather than a spread: an explicit `undefined` must not lift a cap.
  const maxBytes = limits.maxBytes ?? DEFAULT_BUNDLE_LIMITS.maxBytes;
  const maxTensors = limits.maxTensors ?? DEFAULT_BUNDLE_LIMITS.maxTensors;
  const maxElements = limits.maxElements ?? DEFAULT_BUNDLE_LIMITS.maxElements;
  const len = bytes.length;
  if (len < MIN_BUNDLE_BYTES) throw reject('truncated', `${len} bytes; a bundle has at least ${MIN_BUNDLE_BYTES}`);
  if (len > maxBytes) throw reject('too-large', `${len} bytes exceeds the cap of ${maxBytes}`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, len);
  for (let i = 0; i < BUNDLE_MAGIC.length; i++) {
    if (bytes[BUNDLE_HDR.magic + i] !== BUNDLE_MAGIC.charCodeAt(i)) throw reject('magic', `no ${BUNDLE_MAGIC} magic`);
  }
  const version = bytes[BUNDLE_HDR.version]!;
  if (version !== BUNDLE_VERSION) throw reject('version', `format version ${version}; this build reads version ${BUNDLE_VERSION}`);
  if (bytes[BUNDLE_HDR.flags] !== 0) throw reject('flags', `flags ${bytes[BUNDLE_HDR.flags]} are not defined in version ${BUNDLE_VERSION}`);
  if (dv.getUint16(BUNDLE_HDR.reserved, true) !== 0) throw reject('reserved', 'reserved bytes are not zero');
  const h = dv.getUint32(BUNDLE_HDR.headerBytes, true);
  if (h < 1 || h > BUNDLE_MAX_HEADER_BYTES) throw reject('header', `header length ${h} is outside 1..${BUNDLE_MAX_HEADER_BYTES}`);
  const dataStart = align8(BUNDLE_HDR.header + h);
  if (dataStart + TRAILER_BYTES > len) throw reject('truncated', `header of ${h} bytes does not fit in ${len}`);
  const crcAt = len - TRAILER_BYTES;
  if (dv.getUint32(crcAt, true) !== crc32(bytes.subarray(0, crcAt))) throw reject('checksum', 'CRC-32 mismatch');

  const header = parseHeader(bytes.subarray(BUNDLE_HDR.header, BUNDLE_HDR.header + h));
  const entries = header.tensors;
  if (entries.length > maxTensors) throw reject('too-large', `${entries.length} tensors exceeds the cap of ${maxTensors}`);
  let elements = 0;
  for (const e of entries) elements += elementCount(e.shape);
  // Shapes are safe integers, at most 8 of them, so the sum stays finite (< 2^424 per tensor) and the comparison is sound.
  if (elements > maxElements) throw reject('too-large', `${elements} elements exceeds the cap of ${maxElements}`);

  let expected = dataStart;
  for (const e of entries) expected += align4(elementCount(e.shape) * (e.encoding === 'q8' ? 1 : 4));
  expected += TRAILER_BYTES;
  if (expected !== len) throw reject('length', `the header describes ${expected} bytes; the bundle has ${len}`);

  if (!allZero(bytes, BUNDLE_HDR.header + h, dataStart)) throw reject('padding', 'padding after the header is not zero');
  const offsets: number[] = [];
  let at = dataStart;
  for (const e of entries) {
    offsets.push(at);
    const n = elementCount(e.shape);
    if (e.encoding === 'q8' && !allZero(bytes, at + n, at + align4(n))) throw reject('padding', `padding after tensor ${JSON.stringify(e.name)} is not zero`);
    at += align4(e.encoding === 'q8' ? n : n * 4);
  }

  const tensors = entries.map((e, i): BundleTensor => {
    const n = elementCount(e.shape);
    const from = offsets[i]!;
    const data = e.encoding === 'q8' ? dequantizeQ8(bytes.subarray(from, from + n), e.min, e.scale) : readFloat32(bytes, from, n);
    // Finite min and scale still overflow float32 when min + q·scale passes 3.4e38, so q8 is checked too.
    const bad = firstNonFinite(data);
    if (bad >= 0) throw reject('non-finite', `tensor ${JSON.stringify(e.name)}: value ${data[bad]} at element ${bad}`);
    return { name: e.name, shape: e.shape, data };
  });
  return { tensors, meta: header.meta };
}

function parseHeader(raw: Uint8Array): BundleHeader {
  let json: unknown;
  try {
    const text = utf8.decode(raw);
    // JSON.parse reads any depth, but whatever the caller does with meta next may recurse.
    if (jsonNestsDeeperThan(text, MAX_JSON_DEPTH)) throw reject('header', `header nests deeper than ${MAX_JSON_DEPTH} levels`);
    json = JSON.parse(text);
  } catch (e) {
    if (e instanceof EdgefleetError) throw e;
    throw reject('header', 'header is not UTF-8 JSON');
  }
  const parsed = BundleHeader.safeParse(json);
  if (!parsed.success) throw reject('header', summarizeIssues(parsed.error.issues));
  return parsed.data;
}

function allZero(bytes: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (bytes[i] !== 0) return false;
  return true;
}

function readFloat32(bytes: Uint8Array, at: number, n: number): Float32Array {
  const address = bytes.byteOffset + at;
  // MQTT and socket Buffers are often slices at odd offsets of a larger chunk: those are copied.
  if (LITTLE_ENDIAN && address % 4 === 0) return new Float32Array(bytes.buffer, address, n);
  const out = new Float32Array(n);
  if (LITTLE_ENDIAN) {
    new Uint8Array(out.buffer).set(bytes.subarray(at, at + n * 4));
  } else {
    const dv = new DataView(bytes.buffer, address, n * 4);
    for (let i = 0; i < n; i++) out[i] = dv.getFloat32(i * 4, true);
  }
  return out;
}

/**
 * The `meta` of a bundle read from its header alone, without the tensors or the checksum: a
 * receiver routes a payload (which round is it for?) before the full check, which needs the
 * route's answer. Never throws; null when the header cannot be read.
 */
export function peekBundleMeta(bytes: Uint8Array): Record<string, unknown> | null {
  if (bytes.length < BUNDLE_HDR.header) return null;
  const len = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(BUNDLE_HDR.headerBytes, true);
  if (len > BUNDLE_MAX_HEADER_BYTES || BUNDLE_HDR.header + len > bytes.length) return null;
  try {
    const header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(BUNDLE_HDR.header, BUNDLE_HDR.header + len))) as { meta?: unknown };
    return typeof header.meta === 'object' && header.meta !== null && !Array.isArray(header.meta) ? (header.meta as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

/** The joint L2 norm of a set of tensors (a federated update's, as its norm bound judges it). */
export function tensorsL2Norm(tensors: readonly { data: Float32Array }[]): number {
  let s = 0;
  for (const t of tensors) for (let i = 0; i < t.data.length; i++) s += t.data[i]! * t.data[i]!;
  return Math.sqrt(s);
}
