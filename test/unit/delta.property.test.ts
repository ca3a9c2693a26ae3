import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { applyPatchBuffer, applyPatchFile, createPatch, layoutOf, readPatchHeader, type TensorRange } from '../../common/delta/index.js';
import { isEdgefleetError } from '../../proto/index.js';
import { DELTA_HEADER_BYTES } from '../../proto/delta.js';

const dir = mkdtempSync(join(tmpdir(), 'ef-delta-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const SILERO_V5 = 'node_modules/@ricky0123/vad-web/dist/silero_vad_v5.onnx';
const SILERO_V6 = 'node_modules/@ricky0123/vad-web/dist/silero_vad_v6.onnx';

async function roundTrip(base: Uint8Array | null, target: Uint8Array, opts = {}): Promise<Buffer> {
  const { patch } = await createPatch(base, target, opts);
  const out = await applyPatchBuffer(base, patch);
  expect(Buffer.compare(out, Buffer.from(target))).toBe(0);
  return patch;
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (e) {
    if (!isEdgefleetError(e)) throw e;
    return e.code;
  }
}

/** A deterministic PRNG, so a failing case can be replayed. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s ^ (s >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0;
    return s / 2 ** 32;
  };
}

function gauss(r: () => number): number {
  return Math.sqrt(-2 * Math.log(r() + 1e-12)) * Math.cos(2 * Math.PI * r());
}

/** A copy of `bytes` with each float32 range scaled by (1 + N(0,1)·m), written in place. */
function perturb(bytes: Uint8Array, ranges: TensorRange[], m: number, seed: number): Uint8Array {
  const out = Uint8Array.from(bytes);
  const dv = new DataView(out.buffer);
  const r = rng(seed);
  for (const t of ranges) {
    if (t.float !== 'f32') continue;
    for (let at = t.offset; at < t.offset + t.length; at += 4) dv.setFloat32(at, dv.getFloat32(at, true) * (1 + gauss(r) * m), true);
  }
  return out;
}

describe('delta round trips are bit-exact', () => {
  it('random bytes edited at random (generic path)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ minLength: 0, maxLength: 4000 }),
        fc.array(fc.tuple(fc.nat(), fc.nat({ max: 300 }), fc.uint8Array({ maxLength: 200 })), { maxLength: 8 }),
        async (base, edits) => {
          let t = Buffer.from(base);
          for (const [at, del, ins] of edits) {
            const p = t.length === 0 ? 0 : at % t.length;
            t = Buffer.concat([t.subarray(0, p), ins, t.subarray(Math.min(t.length, p + del))]);
          }
          await roundTrip(base, t);
        },
      ),
      { numRuns: 150 },
    );
  });

  it('float tensors of every kind, changed by tiny to total amounts, with odd bit patterns', async () => {
    const kinds = ['f32', 'f16', 'bf16', 'f64'] as const;
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 2 ** 31 - 1 }), fc.constantFrom(0, 1e-5, 1e-3, 1e-1, 10), fc.nat({ max: 7 }), async (seed, m, pad) => {
        const r = rng(seed);
        const ranges: TensorRange[] = [];
        const parts: Buffer[] = [Buffer.from('header'.repeat(pad))];
        let off = parts[0]!.length;
        for (const kind of kinds) {
          const width = kind === 'f64' ? 8 : kind === 'f32' ? 4 : 2;
          const n = 16 + Math.floor(r() * 300);
          const b = Buffer.alloc(n * width);
          for (let i = 0; i < n; i++) {
            const v = [0, -0, NaN, Infinity, 1e-40][i % 23] ?? gauss(r) * 0.1;
            if (width === 8) b.writeDoubleLE(v, i * 8);
            else if (width === 4) b.writeFloatLE(v, i * 4);
            else b.writeUInt16LE(Math.floor(r() * 65536), i * 2);
          }
          ranges.push({ name: kind, offset: off, length: b.length, float: kind });
          parts.push(b, Buffer.from([pad, 1, 2]));
          off += b.length + 3;
        }
        const base = Buffer.concat(parts);
        const target = Buffer.from(base);
        for (const t of ranges) {
          const width = t.float === 'f64' ? 8 : t.float === 'f32' ? 4 : 2;
          for (let at = t.offset; at < t.offset + t.length; at += width) {
            if (width === 8) target.writeDoubleLE(target.readDoubleLE(at) * (1 + gauss(r) * m), at);
            else if (width === 4) target.writeFloatLE(target.readFloatLE(at) * (1 + gauss(r) * m), at);
            else if (r() < m) target.writeUInt16LE(Math.floor(r() * 65536), at);
          }
        }
        await roundTrip(base, target, { baseLayout: ranges, targetLayout: ranges });
        await roundTrip(null, target, { targetLayout: ranges });
      }),
      { numRuns: 60 },
    );
  });

  it('layouts that lie (overlapping, out of bounds, misaligned) still give the exact target', async () => {
    const base = Buffer.alloc(1000, 7);
    const target = Buffer.alloc(1000, 9);
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ name: fc.constantFrom('a', 'b', 'c'), offset: fc.integer({ min: -10, max: 1100 }), length: fc.integer({ min: -10, max: 1100 }), float: fc.constantFrom('f32', 'f16', 'bf16', 'f64', null) }), { maxLength: 6 }),
        async (lies) => {
          await roundTrip(base, target, { baseLayout: lies as TensorRange[], targetLayout: lies as TensorRange[] });
        },
      ),
      { numRuns: 100 },
    );
  });

  it('real ONNX files: a retrain (Silero v5 to v6) and fine-tunes of three magnitudes', async () => {
    const v5 = readFileSync(SILERO_V5);
    const v6 = readFileSync(SILERO_V6);
    const l5 = layoutOf('v5.onnx', v5);
    const l6 = layoutOf('v6.onnx', v6);
    expect(l5.kind).toBe('onnx');
    const retrain = await roundTrip(v5, v6, { baseLayout: l5.ranges, targetLayout: l6.ranges, layoutKind: 'onnx' });
    expect(retrain.length).toBeLessThan(v6.length);
    for (const m of [1e-2, 1e-3, 1e-4]) {
      const tuned = perturb(v5, l5.ranges, m, 42);
      const p = await roundTrip(v5, tuned, { baseLayout: l5.ranges, targetLayout: l5.ranges, layoutKind: 'onnx' });
      expect(p.length).toBeLessThan(v5.length * 0.75);
    }
    const unchanged = await roundTrip(v5, v5, { baseLayout: l5.ranges, targetLayout: l5.ranges });
    expect(unchanged.length).toBeLessThan(DELTA_HEADER_BYTES + 32);
  });
});

describe('bad patches are refused and produce nothing', () => {
  const base = readFileSync(SILERO_V5);
  const layout = layoutOf('m.onnx', base).ranges;
  const target = perturb(base, layout.slice(0, 12), 1e-3, 7);
  const made = createPatch(base, target, { baseLayout: layout, targetLayout: layout, layoutKind: 'onnx' });

  it('every single changed byte is refused with a coded error', async () => {
    const { patch } = await made;
    await fc.assert(
      fc.asyncProperty(fc.nat({ max: patch.length - 1 }), fc.integer({ min: 1, max: 255 }), async (at, x) => {
        const bad = Buffer.from(patch);
        bad[at]! ^= x;
        const code = await codeOf(applyPatchBuffer(base, bad));
        expect(['EF_DELTA_CORRUPT', 'EF_DELTA_TRUNCATED', 'EF_DELTA_UNSUPPORTED', 'EF_DELTA_TOO_LARGE', 'EF_DELTA_WRONG_BASE', 'EF_DELTA_TARGET_MISMATCH']).toContain(code);
      }),
      { numRuns: 300 },
    );
  });

  it('a truncated patch is refused as truncated, an extended one as corrupt', async () => {
    const { patch } = await made;
    await fc.assert(
      fc.asyncProperty(fc.nat({ max: patch.length - 1 }), async (len) => {
        expect(await codeOf(applyPatchBuffer(base, patch.subarray(0, len)))).toBe('EF_DELTA_TRUNCATED');
      }),
      { numRuns: 200 },
    );
    expect(await codeOf(applyPatchBuffer(base, Buffer.concat([patch, Buffer.from([0])])))).toBe('EF_DELTA_CORRUPT');
  });

  it('a wrong base is refused before anything is produced', async () => {
    const { patch } = await made;
    expect(await codeOf(applyPatchBuffer(target, patch))).toBe('EF_DELTA_WRONG_BASE');
    expect(await codeOf(applyPatchBuffer(base.subarray(1), patch))).toBe('EF_DELTA_WRONG_BASE');
    expect(await codeOf(applyPatchBuffer(null, patch))).toBe('EF_DELTA_WRONG_BASE');
  });

  it('a target over the cap is refused; hostile lengths allocate nothing', async () => {
    const { patch } = await made;
    expect(await codeOf(applyPatchBuffer(base, patch, { maxTargetBytes: target.length - 1 }))).toBe('EF_DELTA_TOO_LARGE');
    // A frame announcing 2^50 bytes right after the header.
    const hostile = Buffer.concat([patch.subarray(0, DELTA_HEADER_BYTES), Buffer.from([1, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01])]);
    expect(await codeOf(applyPatchBuffer(base, hostile))).toBe('EF_DELTA_TOO_LARGE');
    const tensor = Buffer.concat([patch.subarray(0, DELTA_HEADER_BYTES), Buffer.from([2, 1, 0, 0xff, 0xff, 0xff, 0x7f])]);
    expect(await codeOf(applyPatchBuffer(base, tensor))).toBe('EF_DELTA_TOO_LARGE');
  });

  it('the header says what the patch is for', async () => {
    const { patch } = await made;
    const h = readPatchHeader(patch);
    expect(h).toMatchObject({ baseSize: base.length, targetSize: target.length, layout: 'onnx' });
  });

  it('applyPatchFile leaves nothing behind on failure and the exact target on success', async () => {
    const { patch } = await made;
    const basePath = join(dir, 'base.onnx');
    const good = join(dir, 'good.efdp');
    const bad = join(dir, 'bad.efdp');
    writeFileSync(basePath, base);
    writeFileSync(good, patch);
    const broken = Buffer.from(patch);
    broken[broken.length - 20]! ^= 1;
    writeFileSync(bad, broken);
    const out = join(dir, 'out.onnx');
    expect(await codeOf(applyPatchFile(basePath, bad, out))).toBe('EF_DELTA_CORRUPT');
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    const r = await applyPatchFile(basePath, good, out);
    expect(readFileSync(out).equals(Buffer.from(target))).toBe(true);
    expect(r.size).toBe(target.length);
  });
});
