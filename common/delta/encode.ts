import { sha256Hex } from '../files.js';
import { promisify } from 'node:util';
import * as zlib from 'node:zlib';
import { CODEC, FLOAT, FLOAT_WIDTH, FRAME, PROGRAM_CHUNK_BYTES, TENSOR_CHUNK_ELEMENTS, TENSOR_MODE, type CodecName, type FloatKind, type LayoutKind, type TensorMode } from '../../proto/delta.js';
import { crc32, encodeHeader, putVarint, zigzag } from './bytes.js';
import { BaseIndex } from './generic.js';
import { entropyBytes, toPlanes } from './planes.js';
import type { TensorRange } from './types.js';

const brotli = promisify(zlib.brotliCompress);

export interface CreateOptions {
  /** Where the base's tensors are (from layoutOf); tensors are paired with the target's by name. */
  baseLayout?: TensorRange[];
  targetLayout?: TensorRange[];
  layoutKind?: LayoutKind;
  /** Brotli quality of tensor planes, 0–11: above 6 they shrink by well under 1 % and encode several times slower. */
  quality?: number;
}

export interface SectionReport {
  /** copy | generic | tensor-planes | tensor-xor | tensor-sub */
  codec: string;
  frames: number;
  targetBytes: number;
  patchBytes: number;
}

export interface PatchReport {
  patchBytes: number;
  targetBytes: number;
  layout: LayoutKind;
  sections: SectionReport[];
}

/** Float tensors smaller than this go with the generic diff: a frame of their own costs more. */
const MIN_TENSOR_BYTES = 64;

async function compress(data: Uint8Array, quality: number): Promise<Buffer> {
  return brotli(data, {
    params: {
      [zlib.constants.BROTLI_PARAM_MODE]: zlib.constants.BROTLI_MODE_GENERIC,
      [zlib.constants.BROTLI_PARAM_QUALITY]: quality,
      [zlib.constants.BROTLI_PARAM_LGWIN]: 22,
      [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length,
    },
  });
}

/** A stored payload: nothing (all zero), the bytes, or brotli, whichever is smallest. */
async function pack(data: Uint8Array, quality: number, estimate?: number): Promise<{ codec: CodecName; bytes: Uint8Array }> {
  let zero = true;
  for (let i = 0; i < data.length; i++) {
    if (data[i] !== 0) {
      zero = false;
      break;
    }
  }
  if (zero) return { codec: 'zero', bytes: new Uint8Array(0) };
  // Close to 8 bits a byte: brotli would only add its framing.
  if (estimate !== undefined && estimate > data.length * 0.995) return { codec: 'raw', bytes: data };
  const c = await compress(data, quality);
  return c.length < data.length ? { codec: 'brotli', bytes: c } : { codec: 'raw', bytes: data };
}

class Writer {
  readonly parts: Uint8Array[] = [];
  size = 0;
  crc = 0;

  push(b: Uint8Array): void {
    this.parts.push(b);
    this.size += b.length;
    this.crc = crc32(b, this.crc);
  }

  pushBytes(bytes: number[]): void {
    this.push(Uint8Array.from(bytes));
  }
}

class Sections {
  private readonly by = new Map<string, SectionReport>();

  add(codec: string, targetBytes: number, patchBytes: number): void {
    const s = this.by.get(codec) ?? { codec, frames: 0, targetBytes: 0, patchBytes: 0 };
    s.frames++;
    s.targetBytes += targetBytes;
    s.patchBytes += patchBytes;
    this.by.set(codec, s);
  }

  list(): SectionReport[] {
    return [...this.by.values()];
  }
}

/**
 * Builds PROGRAM frames: copy and add instructions with their literals inline, flushed as one
 * frame (brotli when that is smaller) every PROGRAM_CHUNK_BYTES and before each TENSOR frame.
 */
class Program {
  private ops: number[] = [];
  private chunks: Uint8Array[] = [];
  private rawSize = 0;
  private targetBytes = 0;
  private copied = 0;
  private pending: { from: number; len: number } | null = null;
  /** The base offset right after the previous copy: copies are stored relative to it. */
  private expected = 0;

  constructor(
    private readonly target: Uint8Array,
    private readonly out: Writer,
    private readonly sections: Sections,
    private readonly quality: number,
  ) {}

  copy(from: number, len: number): void {
    if (this.pending && this.pending.from + this.pending.len === from) {
      this.pending.len += len;
      return;
    }
    this.flushCopy();
    this.pending = { from, len };
  }

  private flushCopy(): void {
    const p = this.pending;
    if (!p) return;
    this.pending = null;
    putVarint(this.ops, p.len * 2 + 1);
    putVarint(this.ops, zigzag(p.from - this.expected));
    this.expected = p.from + p.len;
    this.targetBytes += p.len;
    this.copied += p.len;
  }

  async add(start: number, end: number): Promise<void> {
    this.flushCopy();
    for (let at = start; at < end; ) {
      const n = Math.min(end - at, PROGRAM_CHUNK_BYTES);
      putVarint(this.ops, n * 2);
      this.chunks.push(Uint8Array.from(this.ops));
      this.ops = [];
      this.chunks.push(this.target.subarray(at, at + n));
      this.rawSize += n;
      this.targetBytes += n;
      at += n;
      if (this.rawSize >= PROGRAM_CHUNK_BYTES) await this.flush();
    }
  }

  async flush(): Promise<void> {
    this.flushCopy();
    if (this.ops.length > 0) {
      this.chunks.push(Uint8Array.from(this.ops));
      this.ops = [];
    }
    if (this.chunks.length === 0) return;
    const raw = Buffer.concat(this.chunks);
    const literal = this.targetBytes - this.copied;
    const packed = raw.length < 64 ? { codec: 'raw' as const, bytes: raw } : await pack(raw, this.quality);
    const head: number[] = [FRAME.program, CODEC[packed.codec === 'zero' ? 'raw' : packed.codec]];
    putVarint(head, raw.length);
    const body = packed.codec === 'zero' ? raw : packed.bytes;
    putVarint(head, body.length);
    this.out.pushBytes(head);
    this.out.push(body);
    const frameBytes = head.length + body.length;
    // Attribute the frame to copy and generic by what it produced.
    if (this.copied > 0) this.sections.add('copy', this.copied, literal === 0 ? frameBytes : Math.min(frameBytes, head.length));
    if (literal > 0) this.sections.add('generic', literal, this.copied > 0 ? frameBytes - head.length : frameBytes);
    this.chunks = [];
    this.rawSize = 0;
    this.targetBytes = 0;
    this.copied = 0;
  }
}

interface Pair {
  t: TensorRange;
  float: FloatKind;
  /** The base tensor it replaces, same kind and length; null when the target's is new. */
  b: TensorRange | null;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

/** The float tensors of the target worth a TENSOR frame, each with its base counterpart if any. */
function pairTensors(base: Uint8Array, target: Uint8Array, opts: CreateOptions): Pair[] {
  const byName = new Map<string, TensorRange>();
  for (const r of opts.baseLayout ?? []) byName.set(r.name, r);
  const pairs: Pair[] = [];
  let last = 0;
  for (const t of opts.targetLayout ?? []) {
    // Layouts come from parsers of outside input: anything out of order or out of bounds is skipped.
    if (t.float === null || t.length < MIN_TENSOR_BYTES || t.offset < last || t.offset + t.length > target.length || t.length % FLOAT_WIDTH[t.float] !== 0) continue;
    last = t.offset + t.length;
    const b = byName.get(t.name);
    const ok = b !== undefined && b.float === t.float && b.length === t.length && b.offset >= 0 && b.offset + b.length <= base.length;
    pairs.push({ t, float: t.float, b: ok ? b : null });
  }
  return pairs;
}

async function tensorFrames(pair: Pair, base: Uint8Array, target: Uint8Array, out: Writer, sections: Sections, quality: number): Promise<void> {
  const width = FLOAT_WIDTH[pair.float];
  const perFrame = TENSOR_CHUNK_ELEMENTS * width;
  for (let off = 0; off < pair.t.length; off += perFrame) {
    const len = Math.min(perFrame, pair.t.length - off);
    const t = target.subarray(pair.t.offset + off, pair.t.offset + off + len);
    const b = pair.b ? base.subarray(pair.b.offset + off, pair.b.offset + off + len) : null;
    const modes: TensorMode[] = b ? (width === 8 ? ['xor', 'planes'] : ['sub', 'xor', 'planes']) : ['planes'];
    // Pick the mode by order-0 entropy of its planes, then store each plane as cheaply as it goes.
    let best: { mode: TensorMode; parts: Uint8Array[]; est: number[]; total: number } | null = null;
    for (const mode of modes) {
      const r = toPlanes(mode, pair.float, t, b);
      const parts = r.mask ? [r.mask, ...r.planes] : r.planes;
      const est = parts.map(entropyBytes);
      const total = est.reduce((a, x) => a + x, 0);
      if (!best || total < best.total) best = { mode, parts, est, total };
    }
    const chosen = best!;
    const packed = await Promise.all(chosen.parts.map((p, i) => pack(p, quality, chosen.est[i])));
    const head: number[] = [FRAME.tensor, FLOAT[pair.float], TENSOR_MODE[chosen.mode]];
    if (chosen.mode !== 'planes') putVarint(head, pair.b!.offset + off);
    putVarint(head, len / width);
    out.pushBytes(head);
    let bytes = head.length;
    for (const p of packed) {
      const ph: number[] = [CODEC[p.codec]];
      putVarint(ph, p.bytes.length);
      out.pushBytes(ph);
      out.push(p.bytes);
      bytes += ph.length + p.bytes.length;
    }
    sections.add(`tensor-${chosen.mode}`, len, bytes);
  }
}

/**
 * A patch that turns `base` into `target`, bit-identical. With layouts, float tensors of the
 * target go in TENSOR frames (against their base counterpart when one has the same name, kind
 * and length); everything else goes through the generic diff. `base` null (or empty) makes an
 * image: the target alone, coded the same way.
 */
export async function createPatch(base: Uint8Array | null, target: Uint8Array, opts: CreateOptions = {}): Promise<{ patch: Buffer; report: PatchReport }> {
  const b = base ?? new Uint8Array(0);
  const quality = opts.quality ?? 6;
  const out = new Writer();
  const sections = new Sections();
  // Program frames (structure, text, literals) are small and gain more from the higher quality.
  const program = new Program(target, out, sections, Math.max(quality, 9));
  const pairs = pairTensors(b, target, opts);
  const skip = pairs.flatMap((p) => (p.b ? [p.b] : [])).sort((x, y) => x.offset - y.offset);
  const index = b.length > 0 ? new BaseIndex(b, skip) : null;
  let disp = 0;
  const generic = async (start: number, end: number): Promise<void> => {
    if (start >= end) return;
    if (!index) return program.add(start, end);
    const ops: ({ copy: true; from: number; len: number } | { copy: false; start: number; end: number })[] = [];
    disp = index.diff(target, start, end, { copy: (from, len) => ops.push({ copy: true, from, len }), add: (s, e) => ops.push({ copy: false, start: s, end: e }) }, disp);
    for (const op of ops) {
      if (op.copy) program.copy(op.from, op.len);
      else await program.add(op.start, op.end);
    }
  };
  let at = 0;
  for (const pair of pairs) {
    await generic(at, pair.t.offset);
    at = pair.t.offset + pair.t.length;
    if (pair.b && sameBytes(target.subarray(pair.t.offset, at), b.subarray(pair.b.offset, pair.b.offset + pair.b.length))) {
      program.copy(pair.b.offset, pair.b.length);
      disp = pair.b.offset - pair.t.offset;
      continue;
    }
    await program.flush();
    await tensorFrames(pair, b, target, out, sections, quality);
  }
  await generic(at, target.length);
  await program.flush();
  const header = encodeHeader({
    baseSha256: b.length > 0 ? sha256Hex(b) : null,
    baseSize: b.length,
    targetSha256: sha256Hex(target),
    targetSize: target.length,
    layout: opts.layoutKind ?? 'none',
  });
  const end = Buffer.alloc(5);
  end[0] = FRAME.end;
  end.writeUInt32LE(crc32(Uint8Array.of(FRAME.end), out.crc), 1);
  const patch = Buffer.concat([header, ...out.parts, end]);
  return { patch, report: { patchBytes: patch.length, targetBytes: target.length, layout: opts.layoutKind ?? 'none', sections: sections.list() } };
}
