/**
 * The labelled-sample store on real SQLite files with an injected clock: count and age bounds,
 * the v1 → v2 migration, samples across a reopen, loadSamples' filtering by shape and loss, what
 * addSample refuses (and that it then writes nothing), and the in-process API in front of it.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { FEEDBACK_DB_FILE, FeedbackStore, MAX_LABEL_BYTES } from '../../agent/api/feedback.js';
import { InferenceClient } from '../../agent/api/inproc.js';
import { trainingFeatureShape, trainingInput } from '../../agent/learner/sample-store.js';
import { splitHoldout } from '../../agent/learner/samples.js';
import type { ModelHost } from '../../agent/models/host.js';
import { Manifest, type ManifestInput } from '../../proto/index.js';
import { codeOf } from '../helpers/errors.js';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'edgefleet-samples-'));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const CE = { featureShape: [4], loss: 'sparse-categorical-crossentropy' } as const;
const MSE = { featureShape: [4], loss: 'mean-squared-error' } as const;
const f4 = (...v: number[]) => Float32Array.from(v.length ? v : [0, 0, 0, 0]);

/** The clock a test moves by hand. */
function clock(start = 1_700_000_000_000): { now: () => number; advance: (ms: number) => void } {
  let t = start;
  return { now: () => t, advance: (ms) => (t += ms) };
}

describe('sample store', () => {
  it('keeps at most maxSamplesPerModel per model, the newest, with stable increasing keys', () => {
    const store = FeedbackStore.open(tempDir(), { maxSamplesPerModel: 5 });
    const seqs = Array.from({ length: 12 }, (_, i) => store.addSample('a', f4(i, i, i, i), [4], i % 3));
    store.addSample('b', f4(), [4], 0);
    expect(new Set(seqs).size).toBe(12);
    expect(seqs).toEqual([...seqs].sort((x, y) => x - y));
    expect(store.sampleCount('a')).toBe(5);
    expect(store.sampleCount('b')).toBe(1);
    const { set, keys } = store.loadSamples('a', CE);
    expect([...keys]).toEqual(seqs.slice(7).reverse());
    expect([...set.x.filter((_, i) => i % 4 === 0)]).toEqual([11, 10, 9, 8, 7]);
    expect([...set.y]).toEqual([2, 1, 0, 2, 1]);
    // The keys drive the holdout split: the same samples land on the same side on every load.
    const split = (k: Int32Array) => splitHoldout(store.loadSamples('a', CE).set, k, 0.4).holdout.x.join();
    expect(split(keys)).toBe(split(store.loadSamples('a', CE).keys));
    store.close();
  });

  it('deletes samples older than maxSampleAgeSec: not counted at once, deleted on insert, load and open', () => {
    const dir = tempDir();
    const c = clock();
    const store = FeedbackStore.open(dir, { maxSampleAgeSec: 60, clock: c.now });
    store.addSample('a', f4(1), [1], 1);
    c.advance(30_000);
    store.addSample('a', f4(2), [1], 2);
    const last = store.addSample('b', f4(3), [1], 3);
    c.advance(31_000); // the first is 61 s old
    expect(store.sampleCount('a')).toBe(1);
    expect([...store.loadSamples('a', { ...CE, featureShape: [1] }).set.y]).toEqual([2]);
    store.close();
    c.advance(60_000);
    const rows = () => {
      const db = new Database(join(dir, FEEDBACK_DB_FILE), { readonly: true });
      const n = (db.prepare('SELECT COUNT(*) AS n FROM samples').get() as { n: number }).n;
      db.close();
      return n;
    };
    expect(rows()).toBe(2);
    const again = FeedbackStore.open(dir, { maxSampleAgeSec: 60, clock: c.now });
    expect(rows()).toBe(0);
    expect(again.sampleCount('b')).toBe(0);
    // A key is never reused, even once every row is gone: it names one sample for good.
    expect(again.addSample('b', f4(4), [1], 4)).toBe(last + 1);
    again.close();
  });

  it('keeps samples across a reopen; request ids and held inputs do not survive it', () => {
    const dir = tempDir();
    const store = FeedbackStore.open(dir);
    store.record('r', 'a', 1, { data: f4(1, 2, 3, 4), featureShape: [4] });
    store.label('a', 'r', { class: 3 });
    store.addSample('a', f4(5, 6, 7, 8), [4], 1);
    store.close();
    const again = FeedbackStore.open(dir);
    const { set } = again.loadSamples('a', CE);
    expect([...set.x]).toEqual([5, 6, 7, 8, 1, 2, 3, 4]);
    expect([...set.y]).toEqual([1, 3]);
    expect(again.label('a', 'r', 0)).toBe(false);
    again.close();
  });

  it('migrates a v1 file to v2, keeping its labels', () => {
    const dir = tempDir();
    const v1 = new Database(join(dir, FEEDBACK_DB_FILE));
    v1.pragma('journal_mode = WAL');
    // The DDL of schema 1, as agents before samples wrote it.
    v1.exec(`
      CREATE TABLE IF NOT EXISTS labels (
        seq INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        request_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        label TEXT NOT NULL,
        ts INTEGER NOT NULL,
        request_ts INTEGER NOT NULL,
        UNIQUE (model, request_id)
      );
      CREATE INDEX IF NOT EXISTS labels_model_seq ON labels (model, seq);
      PRAGMA user_version = 1;
    `);
    v1.prepare('INSERT INTO labels (model, request_id, version, label, ts, request_ts) VALUES (?, ?, ?, ?, ?, ?)').run('a', 'old', 4, '"cat"', 20, 10);
    v1.close();
    const store = FeedbackStore.open(dir);
    expect(store.list('a')).toEqual([{ requestId: 'old', model: 'a', version: 4, label: 'cat', ts: 20, requestTs: 10 }]);
    expect(store.addSample('a', f4(), [4], 1)).toBeGreaterThan(0);
    store.close();
    const db = new Database(join(dir, FEEDBACK_DB_FILE), { readonly: true });
    expect(db.pragma('user_version', { simple: true })).toBe(2);
    const indexes = (db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'samples'").all() as { name: string }[]).map((r) => r.name);
    expect(indexes).toEqual(expect.arrayContaining(['samples_model_seq', 'samples_model_ts']));
    db.close();
  });

  it('refuses a file from a newer schema', () => {
    const dir = tempDir();
    const db = new Database(join(dir, FEEDBACK_DB_FILE));
    db.pragma('user_version = 3');
    db.close();
    expect(codeOf(() => FeedbackStore.open(dir))).toBe('EF_CONFIG_INVALID');
  });

  it('loads only rows of the model’s shape whose label fits the loss, and counts the others', () => {
    const store = FeedbackStore.open(tempDir());
    store.addSample('a', f4(1, 1, 1, 1), [4], 1); // class 1; squared error of width 1
    store.addSample('a', f4(2, 2, 2, 2), [4], { class: 2, note: 'kept' });
    store.addSample('a', f4(3, 3, 3, 3), [2, 2], 0); // another shape
    store.addSample('a', f4(4, 4, 4, 4), [4], [0.5, -1]); // width 2
    store.addSample('a', f4(5, 5, 5, 5), [4], 1.5); // not a class
    store.addSample('a', f4(6, 6, 6, 6), [4], -2); // not a class
    store.addSample('a', f4(7, 7, 7, 7), [4], 7);

    const ce = store.loadSamples('a', CE);
    expect([...ce.set.y]).toEqual([7, 2, 1]);
    expect(ce.set.y).toBeInstanceOf(Int32Array);
    expect(ce.skipped).toBe(4);
    expect(store.loadSamples('a', { ...CE, classes: 3 })).toMatchObject({ set: { count: 2 }, skipped: 5 });

    const w1 = store.loadSamples('a', MSE);
    expect([...w1.set.y]).toEqual([7, -2, 1.5, 1]);
    expect(w1.set.y).toBeInstanceOf(Float32Array);
    const w2 = store.loadSamples('a', { ...MSE, labelWidth: 2 });
    expect(w2.set).toMatchObject({ count: 1, labelWidth: 2 });
    expect([...w2.set.y]).toEqual([0.5, -1]);
    expect([...w2.set.x]).toEqual([4, 4, 4, 4]);

    expect([...store.loadSamples('a', { ...CE, featureShape: [2, 2] }).set.x]).toEqual([3, 3, 3, 3]);
    // -1 matches any size; the newest fitting row fixes it, and the rows after must match it.
    expect(store.loadSamples('a', { ...CE, featureShape: [-1] }).set).toMatchObject({ count: 3, featureShape: [4] });
    expect(store.loadSamples('a', { ...CE, featureShape: [-1, -1] }).set).toMatchObject({ count: 1, featureShape: [2, 2] });
    expect(store.loadSamples('a', { ...CE, featureShape: [3] })).toMatchObject({ set: { count: 0, featureShape: [3] }, skipped: 7 });
    // Newest first, up to the limit; rows after the limit are not looked at.
    const two = store.loadSamples('a', { ...CE, limit: 2 });
    expect([...two.set.y]).toEqual([7, 2]);
    expect(two.skipped).toBe(4);
    expect(store.loadSamples('a', { ...CE, limit: 0 }).set.count).toBe(0);
    expect(store.loadSamples('nobody', CE)).toMatchObject({ set: { count: 0 }, skipped: 0 });
    store.close();
  });

  it('skips damaged rows instead of throwing', () => {
    const dir = tempDir();
    const store = FeedbackStore.open(dir);
    store.addSample('a', f4(1, 1, 1, 1), [4], 1);
    const db = new Database(join(dir, FEEDBACK_DB_FILE));
    const put = db.prepare('INSERT INTO samples (model, request_id, input, feature_shape, label, ts) VALUES (?, NULL, ?, ?, ?, ?)');
    put.run('a', Buffer.alloc(12), '[4]', '1', Date.now()); // short blob
    put.run('a', Buffer.alloc(16), '[4', '1', Date.now()); // shape not JSON
    put.run('a', Buffer.alloc(16), '[4]', '{"class":', Date.now()); // label not JSON
    put.run('a', 'text, not bytes', '[4]', '1', Date.now());
    db.close();
    const { set, skipped } = store.loadSamples('a', CE);
    expect(set.count).toBe(1);
    expect(skipped).toBe(4);
    store.close();
  });

  it('refuses bad samples with a catalog code and writes nothing', () => {
    const store = FeedbackStore.open(tempDir());
    const cases: [string, () => unknown][] = [
      ['EF_INFER_INVALID', () => store.addSample('a', f4(1, 2, 3), [4], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', f4(1, 2, 3, Number.NaN), [4], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', f4(1, 2, Number.POSITIVE_INFINITY, 4), [4], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', f4(), [0, 4], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', f4(), [2.5], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', f4(), [1, 1, 1, 1, 1, 1, 1, 1, 4], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', new Float32Array((1 << 20) + 1), [(1 << 20) + 1], 1)],
      ['EF_INFER_INVALID', () => store.addSample('a', [1, 2, 3, 4] as unknown as Float32Array, [4], 1)],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], [1, 'x'.repeat(MAX_LABEL_BYTES)])],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], 10n)],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], undefined)],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], 'cat')],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], [])],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], [1, null])],
      ['EF_BAD_PAYLOAD', () => store.addSample('a', f4(), [4], 1e39)], // finite, but not as float32
      ['EF_BAD_PAYLOAD', () => store.addSample('', f4(), [4], 1)],
    ];
    for (const [code, fn] of cases) expect(codeOf(fn)).toBe(code);
    expect(store.sampleCount('a')).toBe(0);
    expect(store.addSample('a', f4(), [4], [0.25, 1e38])).toBeGreaterThan(0);
    store.close();
  });

  it('refuses bad load options as a training failure', () => {
    const store = FeedbackStore.open(tempDir());
    expect(codeOf(() => store.loadSamples('a', { ...CE, featureShape: [0] }))).toBe('EF_TRAINING_FAILED');
    expect(codeOf(() => store.loadSamples('a', { ...MSE, labelWidth: 0 }))).toBe('EF_TRAINING_FAILED');
    store.close();
  });
});

const SHA = 'a'.repeat(64);
function manifest(training: ManifestInput['training']): Manifest {
  return Manifest.parse({
    schema: 1,
    name: 'iris',
    version: 1,
    runtime: 'tfjs-layers',
    entry: 'model.json',
    files: [{ path: 'model.json', sha256: SHA, size: 1 }],
    inputs: [
      { name: 'features', dtype: 'float32', shape: [-1, 4] },
      { name: 'ids', dtype: 'int64', shape: [-1, 1] },
    ],
    outputs: [{ name: 'probabilities', dtype: 'float32', shape: [-1, 3] }],
    ...(training ? { training } : {}),
    createdAt: 0,
    expiresAt: null,
  } satisfies ManifestInput);
}

describe('training inputs from requests and the in-process API', () => {
  const trains = manifest({ loss: 'sparse-categorical-crossentropy' });
  const features = { dtype: 'float32' as const, shape: [1, 4], data: f4(1, 2, 3, 4) };
  const ids = { dtype: 'int64' as const, shape: [1, 1], data: BigInt64Array.of(1n) };

  it('takes one row of the training input of a model that trains', () => {
    expect(trainingFeatureShape(trains)).toEqual([4]);
    expect(trainingInput(trains, { features, ids })).toEqual({ data: features.data, featureShape: [4] });
    expect(trainingInput(manifest(undefined), { features, ids })).toBeUndefined();
    expect(trainingInput(trains, { features: { ...features, shape: [2, 2] }, ids })).toBeUndefined(); // a batch of two
    expect(trainingInput(manifest({ loss: 'mean-squared-error', input: 'ids' }), { features, ids })).toBeUndefined(); // int64
  });

  it('InferenceClient.addSample converts to float32, checks the row shape, and stores', () => {
    const store = FeedbackStore.open(tempDir());
    const host = {
      models: () => ['iris'],
      active: () => trains,
      addSample: (name: string, input: Float32Array, shape: number[], label: unknown) => store.addSample(name, input, shape, label),
    } as Partial<ModelHost> as ModelHost;
    const client = new InferenceClient(host);
    expect(client.addSample('iris', { shape: [1, 4], data: [1, 2, 3, 4] }, 0)).toBeGreaterThan(0);
    expect(client.addSample('iris', { shape: [1, 4], data: Int16Array.of(5, 6, 7, 8) }, 1)).toBeGreaterThan(0);
    expect(client.addSample('iris', features, 2)).toBeGreaterThan(0);
    expect([...store.loadSamples('iris', CE).set.x]).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]);
    for (const bad of [
      { shape: [1, 3], data: [1, 2, 3] }, // not the model's row shape
      { shape: [2, 4], data: new Array<number>(8).fill(0) }, // a batch
      { shape: [1, 4], data: [1, 2, 3] }, // data and shape disagree
      { shape: [1, 4], data: [1, 2, 3, Number.NaN] },
      { shape: [1, 4], data: BigInt64Array.of(1n, 2n, 3n, 4n) },
      { shape: [1, 4], dtype: 'bool' as const, data: Uint8Array.of(1, 0, 1, 0) },
      { shape: [1, 4], dtype: 'float32' as const, data: Int8Array.of(1, 2, 3, 4) }, // dtype and data disagree
    ]) {
      expect(codeOf(() => client.addSample('iris', bad, 1))).toBe('EF_INFER_INVALID');
    }
    expect(store.sampleCount('iris')).toBe(3);
    store.close();
  });
});
