import { createHash, randomBytes } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import * as zlib from 'node:zlib';
import { EdgefleetError } from '../../proto/index.js';
import { CODEC, DELTA_HEADER_BYTES, DELTA_LIMITS, FLOAT, FLOAT_WIDTH, FRAME, TENSOR_MODE, type FloatKind, type TensorMode } from '../../proto/delta.js';
import { Cursor, corrupt, crc32, decodeHeader, unzigzag, type PatchHeader } from './bytes.js';
import { fromPlanes, popcount } from './planes.js';

/**
 * The reference decoder. It reads the patch front to back once, reads the base at the offsets
 * the patch names, and writes the target front to back, so memory stays bounded by one frame
 * (at most DELTA_LIMITS) whatever the model's size. Nothing is trusted until checked: the base
 * by its sha256 before the first byte is produced, every length against its limit and what is
 * left, the frames by their CRC-32, and the result by the target sha256 the patch names.
 */


/** Random access to the bytes of a patch or a base. */
export interface ByteSource {
  readonly size: number;
  read(position: number, length: number): Promise<Uint8Array>;
}

export function memorySource(b: Uint8Array): ByteSource {
  return { size: b.length, read: (p, n) => Promise.resolve(b.subarray(p, p + n)) };
}

export async function fileSource(fh: FileHandle): Promise<ByteSource> {
  const size = (await fh.stat()).size;
  return {
    size,
    async read(position, length) {
      const buf = Buffer.allocUnsafe(length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, got, length - got, position + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      return buf.subarray(0, got);
    },
  };
}

export interface ApplyOptions {
  /** A target larger than this is refused before anything is written. */
  maxTargetBytes?: number;
  /** The base's sha256 when the caller already knows it (a content-addressed blob); else it is hashed. */
  baseSha256?: string;
}

export interface ApplyResult {
  sha256: string;
  size: number;
  header: PatchHeader;
}

/**
 * Reads and writes go in windows this large: each asynchronous file operation costs a thread-pool
 * round trip, and with 1 MiB windows those round trips, not decoding, bounded the throughput.
 */
const IO_WINDOW = 4 << 20;

/** A source read through one window: the decoder reads the base mostly front to back. */
function windowed(src: ByteSource): ByteSource {
  let start = 0;
  let win: Uint8Array = new Uint8Array(0);
  return {
    size: src.size,
    async read(position, length) {
      if (position >= start && position + length <= start + win.length) return win.subarray(position - start, position - start + length);
      if (length >= IO_WINDOW) return src.read(position, length);
      win = await src.read(position, Math.min(IO_WINDOW, src.size - position));
      start = position;
      return win.subarray(0, length);
    },
  };
}

/** Sequential reads of the patch through a window, with the running CRC of frame bytes. */
class PatchReader {
  private buf = new Uint8Array(0);
  private at = 0;
  private next: number;
  crc = 0;

  constructor(private readonly src: ByteSource) {
    this.next = DELTA_HEADER_BYTES;
  }

  private async fill(n: number): Promise<void> {
    if (this.buf.length - this.at >= n) return;
    const want = Math.max(n - (this.buf.length - this.at), IO_WINDOW);
    const more = await this.src.read(this.next, Math.min(want, Math.max(0, this.src.size - this.next)));
    this.next += more.length;
    const rest = this.buf.subarray(this.at);
    const joined = new Uint8Array(rest.length + more.length);
    joined.set(rest);
    joined.set(more, rest.length);
    this.buf = joined;
    this.at = 0;
    if (this.buf.length < n) throw new EdgefleetError('EF_DELTA_TRUNCATED', 'patch ends before its end marker');
  }

  async bytes(n: number): Promise<Uint8Array> {
    await this.fill(n);
    const b = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    this.crc = crc32(b, this.crc);
    return b;
  }

  async u8(): Promise<number> {
    return (await this.bytes(1))[0]!;
  }

  async varint(what: string): Promise<number> {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 8; i++) {
      const b = await this.u8();
      v += (b & 0x7f) * mul;
      if (b < 0x80) {
        if (v > Number.MAX_SAFE_INTEGER) break;
        return v;
      }
      mul *= 0x80;
    }
    throw corrupt(`${what}: integer out of range`);
  }

  /** Bytes of the patch not yet read. */
  get left(): number {
    return this.src.size - this.next + (this.buf.length - this.at);
  }
}

/** Buffered sequential writes of the target, hashed and counted on the way. */
class TargetWriter {
  private readonly hash = createHash('sha256');
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  produced = 0;

  constructor(
    private readonly limit: number,
    private readonly sink: (b: Uint8Array) => Promise<void>,
  ) {}

  async write(b: Uint8Array): Promise<void> {
    if (this.produced + b.length > this.limit) throw corrupt(`it produces more than the ${this.limit} target bytes its header names`);
    this.produced += b.length;
    this.hash.update(b);
    this.pending.push(b);
    this.pendingBytes += b.length;
    if (this.pendingBytes >= IO_WINDOW) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const all = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    await this.sink(all);
  }

  digest(): string {
    return this.hash.digest('hex');
  }
}

/** A plain Uint8Array view: Buffers and Uint8Arrays mixed in one hot loop make V8's element access megamorphic (several times slower). */
function plain(b: Uint8Array): Uint8Array {
  return b.constructor === Uint8Array ? b : new Uint8Array(b.buffer, b.byteOffset, b.length);
}

function unpack(codec: number, bytes: Uint8Array, rawLen: number, what: string): Uint8Array {
  return plain(unpackAny(codec, bytes, rawLen, what));
}

function unpackAny(codec: number, bytes: Uint8Array, rawLen: number, what: string): Uint8Array {
  if (codec === CODEC.zero) {
    if (bytes.length !== 0) throw corrupt(`${what}: a zero payload with bytes`);
    return new Uint8Array(rawLen);
  }
  if (codec === CODEC.raw) {
    if (bytes.length !== rawLen) throw corrupt(`${what}: raw payload of ${bytes.length} bytes, ${rawLen} expected`);
    return bytes;
  }
  if (codec !== CODEC.brotli) throw corrupt(`${what}: unknown codec ${codec}`);
  let out: Buffer;
  try {
    // Synchronous on purpose: a plane takes a millisecond or two to decode, and the asynchronous
    // zlib API spends more than that on its stream machinery and thread-pool round trips
    // (measured: about half the decoder's throughput). The event loop gets a turn between frames.
    out = zlib.brotliDecompressSync(bytes, { maxOutputLength: Math.max(1, rawLen), chunkSize: Math.max(64, rawLen + 1) });
  } catch (e) {
    throw corrupt(`${what}: ${(e as Error).message}`);
  }
  if (out.length !== rawLen) throw corrupt(`${what}: decompressed to ${out.length} bytes, ${rawLen} expected`);
  return out;
}

function kindOf(id: number): FloatKind {
  const k = (Object.keys(FLOAT) as FloatKind[]).find((x) => FLOAT[x] === id);
  if (!k) throw corrupt(`unknown element type ${id}`);
  return k;
}

function modeOf(id: number): TensorMode {
  const m = (Object.keys(TENSOR_MODE) as TensorMode[]).find((x) => TENSOR_MODE[x] === id);
  if (!m) throw corrupt(`unknown tensor mode ${id}`);
  return m;
}

/** A brotli payload may exceed its raw size by a little (incompressible input); never by more. */
const slack = (rawLen: number): number => rawLen + (rawLen >> 3) + 1024;

async function readBase(base: ByteSource, from: number, len: number): Promise<Uint8Array> {
  if (from < 0 || from + len > base.size) throw corrupt(`it reads base bytes ${from}..${from + len} of ${base.size}`);
  const b = plain(await base.read(from, len));
  if (b.length !== len) throw new EdgefleetError('EF_DELTA_WRONG_BASE', 'the base file changed while the patch was applied');
  return b;
}

/** Checks the header against the base and applies every frame into `sink`. */
export async function applyPatch(patch: ByteSource, base: ByteSource | null, sink: (b: Uint8Array) => Promise<void>, opts: ApplyOptions = {}): Promise<ApplyResult> {
  const header = decodeHeader(Buffer.from(await patch.read(0, DELTA_HEADER_BYTES)));
  if (opts.maxTargetBytes !== undefined && header.targetSize > opts.maxTargetBytes) {
    throw new EdgefleetError('EF_DELTA_TOO_LARGE', `the patch would produce ${header.targetSize} bytes; the cap is ${opts.maxTargetBytes}`);
  }
  const b = base ? windowed(base) : memorySource(new Uint8Array(0));
  // An image needs no base: one given anyway is not read.
  if (header.baseSha256 !== null) {
    if (b.size !== header.baseSize) throw new EdgefleetError('EF_DELTA_WRONG_BASE', `the patch was made against a base of ${header.baseSize} bytes; this one has ${b.size}`);
    const have = opts.baseSha256 ?? (await hashSource(b));
    if (have !== header.baseSha256) throw new EdgefleetError('EF_DELTA_WRONG_BASE', `the patch was made against base ${header.baseSha256.slice(0, 12)}…, not ${have.slice(0, 12)}…`);
  }
  const r = new PatchReader(patch);
  const out = new TargetWriter(header.targetSize, sink);
  let expected = 0;
  for (;;) {
    const type = await r.u8();
    if (type === FRAME.end) break;
    if (type === FRAME.program) {
      const codec = await r.u8();
      const rawLen = await r.varint('program length');
      if (rawLen > DELTA_LIMITS.maxProgramBytes) throw new EdgefleetError('EF_DELTA_TOO_LARGE', `a program frame of ${rawLen} bytes exceeds ${DELTA_LIMITS.maxProgramBytes}`);
      const encLen = await r.varint('program payload length');
      if (encLen > slack(rawLen)) throw corrupt(`program payload of ${encLen} bytes for ${rawLen}`);
      if (encLen > r.left) throw new EdgefleetError('EF_DELTA_TRUNCATED', 'patch ends inside a program frame');
      const program = new Cursor(unpack(codec, await r.bytes(encLen), rawLen, 'program frame'), 'program frame');
      while (program.left > 0) {
        const op = program.varint();
        const len = Math.floor(op / 2);
        if (len === 0) throw corrupt('an empty instruction');
        if (op % 2 === 1) {
          const from = expected + unzigzag(program.varint());
          for (let done = 0; done < len; ) {
            const n = Math.min(len - done, 1 << 20);
            await out.write(await readBase(b, from + done, n));
            done += n;
          }
          expected = from + len;
        } else {
          await out.write(program.bytes(len));
        }
      }
      continue;
    }
    if (type === FRAME.tensor) {
      const kind = kindOf(await r.u8());
      const mode = modeOf(await r.u8());
      const width = FLOAT_WIDTH[kind];
      if (mode === 'sub' && width === 8) throw corrupt('sub mode on 8-byte elements');
      const from = mode === 'planes' ? 0 : await r.varint('tensor base offset');
      const count = await r.varint('tensor element count');
      if (count === 0 || count > DELTA_LIMITS.maxTensorElements) throw new EdgefleetError('EF_DELTA_TOO_LARGE', `a tensor frame of ${count} elements (limit ${DELTA_LIMITS.maxTensorElements})`);
      if (mode !== 'planes' && from + count * width > b.size) throw corrupt(`it reads base bytes ${from}..${from + count * width} of ${b.size}`);
      // Xor and sub: first the mask of changed elements, whose count is every plane's length.
      const part = async (rawLen: number, what: string): Promise<Uint8Array> => {
        const codec = await r.u8();
        const encLen = await r.varint(`${what} length`);
        if (encLen > slack(rawLen)) throw corrupt(`${what} payload of ${encLen} bytes for ${rawLen}`);
        if (encLen > r.left) throw new EdgefleetError('EF_DELTA_TRUNCATED', 'patch ends inside a tensor frame');
        return unpack(codec, await r.bytes(encLen), rawLen, what);
      };
      const mask = mode === 'planes' ? null : await part((count + 7) >> 3, 'tensor mask');
      const m = mask ? popcount(mask) : count;
      const planes: Uint8Array[] = [];
      for (let p = 0; p < width; p++) planes.push(await part(m, 'tensor plane'));
      const base = mode === 'planes' ? null : await readBase(b, from, count * width);
      let bytes: Uint8Array;
      try {
        bytes = fromPlanes(mode, kind, count, { mask, planes }, base);
      } catch (e) {
        if (e instanceof RangeError) throw corrupt(`tensor frame: its mask does not match its planes`);
        throw e;
      }
      await out.write(bytes);
      continue;
    }
    throw corrupt(`unknown frame type ${type}`);
  }
  const crc = r.crc;
  const trailer = await r.bytes(4);
  if (Buffer.from(trailer).readUInt32LE(0) !== crc) throw corrupt('frame checksum mismatch');
  if (r.left !== 0) throw corrupt(`${r.left} bytes after the end marker`);
  if (out.produced !== header.targetSize) throw corrupt(`it produced ${out.produced} of the ${header.targetSize} target bytes`);
  await out.flush();
  const sha256 = out.digest();
  if (sha256 !== header.targetSha256) throw new EdgefleetError('EF_DELTA_TARGET_MISMATCH', `the result hashes to ${sha256.slice(0, 12)}…, not the target ${header.targetSha256.slice(0, 12)}… the patch names`);
  return { sha256, size: out.produced, header };
}

async function hashSource(s: ByteSource): Promise<string> {
  const h = createHash('sha256');
  for (let at = 0; at < s.size; at += 1 << 20) h.update(await s.read(at, Math.min(1 << 20, s.size - at)));
  return h.digest('hex');
}

/** In memory, for small files and tests. */
export async function applyPatchBuffer(base: Uint8Array | null, patch: Uint8Array, opts: ApplyOptions = {}): Promise<Buffer> {
  const parts: Uint8Array[] = [];
  await applyPatch(memorySource(patch), base ? memorySource(base) : null, (b) => {
    parts.push(Uint8Array.from(b));
    return Promise.resolve();
  }, opts);
  return Buffer.concat(parts);
}

/**
 * Applies the patch at `patchPath` to the file at `basePath` (null for an image) and writes the
 * target to `outPath`, only once it is verified: the bytes go to a temporary file beside it,
 * fsynced and renamed into place. On any failure nothing is left at `outPath`.
 */
export async function applyPatchFile(basePath: string | null, patchPath: string, outPath: string, opts: ApplyOptions = {}): Promise<ApplyResult> {
  const tmp = join(dirname(outPath), `.${basename(outPath)}.${randomBytes(6).toString('hex')}.tmp`);
  const pf = await open(patchPath, 'r');
  let bf: FileHandle | null = null;
  let of: FileHandle | null = null;
  try {
    bf = basePath === null ? null : await open(basePath, 'r');
    of = await open(tmp, 'wx', 0o600);
    const o = of;
    const result = await applyPatch(await fileSource(pf), bf ? await fileSource(bf) : null, async (b) => {
      await o.write(b);
    }, opts);
    await of.sync();
    await of.close();
    of = null;
    await rename(tmp, outPath);
    return result;
  } catch (e) {
    await of?.close().catch(() => undefined);
    of = null;
    await unlink(tmp).catch(() => undefined);
    throw e;
  } finally {
    await pf.close();
    await bf?.close();
  }
}
