/**
 * The feedback store on real SQLite files: the ring of recent request ids and the table of labels
 * both stay within their bounds, labels survive a reopen (ids do not), and bad labels are refused.
 * The ring's training inputs stay within their byte budget, and a label on a request whose input
 * is still held makes a sample (sample-store.test.ts tests the samples themselves).
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { FEEDBACK_DB_FILE, FeedbackStore, MAX_LABEL_BYTES } from '../../agent/api/feedback.js';
import { codeOf } from '../helpers/errors.js';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'edgefleet-feedback-'));
  dirs.push(d);
  return d;
}

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe('feedback store', () => {
  it('remembers only the last N request ids per model', () => {
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 3 });
    for (let i = 1; i <= 5; i++) store.record(`r${i}`, 'a', 1);
    store.record('b1', 'b', 7);
    // r1 and r2 were pushed out by r4 and r5; model b has its own ring.
    expect(['r1', 'r2', 'r3', 'r4', 'r5'].map((id) => store.label('a', id, 1))).toEqual([false, false, true, true, true]);
    expect(store.label('b', 'b1', 'x')).toBe(true);
    expect(store.label('b', 'r3', 'x')).toBe(false);
    expect(store.label('nope', 'r3', 'x')).toBe(false);
    store.close();
  });

  it('keeps an id that was recorded again after its first slot is overwritten', () => {
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 3 });
    store.record('dup', 'a', 1);
    store.record('x', 'a', 1);
    store.record('dup', 'a', 2);
    store.record('y', 'a', 1); // overwrites dup's first slot
    expect(store.label('a', 'dup', 'ok')).toBe(true);
    expect(store.list('a', 1)[0]).toMatchObject({ requestId: 'dup', version: 2 });
    store.close();
  });

  it('keeps at most M labels per model, the newest, and persists them across a reopen', () => {
    let now = 1_000;
    const dir = tempDir();
    const store = FeedbackStore.open(dir, { recentPerModel: 100, maxLabelsPerModel: 5, clock: () => now });
    for (let i = 0; i < 12; i++) {
      store.record(`r${i}`, 'a', 3);
      now += 10;
      expect(store.label('a', `r${i}`, { cls: i % 2, score: i / 10 })).toBe(true);
    }
    store.record('other', 'b', 1);
    store.label('b', 'other', true);
    const a = store.list('a', 100);
    expect(a.map((r) => r.requestId)).toEqual(['r11', 'r10', 'r9', 'r8', 'r7']);
    expect(a[0]).toEqual({ requestId: 'r11', model: 'a', version: 3, label: { cls: 1, score: 1.1 }, ts: 1_120, requestTs: 1_110 });
    expect(store.list('a', 2)).toHaveLength(2);
    store.close();

    const again = FeedbackStore.open(dir, { maxLabelsPerModel: 5 });
    expect(again.list('a', 100).map((r) => r.requestId)).toEqual(['r11', 'r10', 'r9', 'r8', 'r7']);
    expect(again.list('b', 100)).toMatchObject([{ requestId: 'other', label: true }]);
    // Request ids live in memory only: after a restart there is nothing to label.
    expect(again.label('a', 'r11', 0)).toBe(false);
    again.close();
    const db = new Database(join(dir, FEEDBACK_DB_FILE), { readonly: true });
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(db.pragma('user_version', { simple: true })).toBe(2);
    db.close();
  });

  it('replaces the label when a request is labelled twice', () => {
    const store = FeedbackStore.open(tempDir());
    store.record('r', 'a', 1);
    store.label('a', 'r', 'first');
    store.label('a', 'r', 'second');
    expect(store.list('a')).toMatchObject([{ requestId: 'r', label: 'second' }]);
    store.close();
  });

  it('refuses labels that are not JSON or exceed 4 KiB', () => {
    const store = FeedbackStore.open(tempDir());
    store.record('r', 'a', 1);
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    for (const bad of [undefined, 10n, cyclic, () => 1, 'x'.repeat(MAX_LABEL_BYTES), 'é'.repeat(MAX_LABEL_BYTES / 2)]) {
      expect(codeOf(() => store.label('a', 'r', bad))).toBe('EF_BAD_PAYLOAD');
    }
    expect(store.list('a')).toEqual([]);
    expect(store.label('a', 'r', 'x'.repeat(MAX_LABEL_BYTES - 2))).toBe(true);
    expect(store.label('a', 'r', null)).toBe(true);
    expect(store.list('a')[0]!.label).toBeNull();
    store.close();
  });

  it('moves a corrupt database aside and starts a new one', () => {
    const dir = tempDir();
    writeFileSync(join(dir, FEEDBACK_DB_FILE), 'this is not an SQLite file, it is long enough to have a header'.repeat(20));
    const store = FeedbackStore.open(dir);
    store.record('r', 'a', 1);
    expect(store.label('a', 'r', 1)).toBe(true);
    store.close();
    expect(readdirSync(dir).some((f) => f.startsWith(`${FEEDBACK_DB_FILE}.corrupt-`))).toBe(true);
  });

  it('records in constant time: a million records into a small ring stay cheap', () => {
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 1000 });
    for (let i = 0; i < 1_000_000; i++) store.record(`id-${i}`, 'a', 1);
    expect(store.label('a', 'id-999999', 1)).toBe(true);
    expect(store.label('a', 'id-998999', 1)).toBe(false);
    store.close();
  });

  it('refuses bounds that are not positive integers', () => {
    expect(codeOf(() => FeedbackStore.open(tempDir(), { recentPerModel: 0 }))).toBe('EF_CONFIG_INVALID');
    expect(codeOf(() => FeedbackStore.open(tempDir(), { maxSamplesPerModel: 0 }))).toBe('EF_CONFIG_INVALID');
    expect(codeOf(() => FeedbackStore.open(tempDir(), { maxSampleAgeSec: 1.5 }))).toBe('EF_CONFIG_INVALID');
    expect(codeOf(() => FeedbackStore.open(tempDir(), { recentInputBytes: -1 }))).toBe('EF_CONFIG_INVALID');
    expect(codeOf(() => FeedbackStore.open(tempDir(), { recentInputBytes: 0 }).close())).toBeNull();
  });
});

/** A request's training input of four features, as trainingInput hands it to record(). */
const row4 = (...v: number[]) => ({ data: Float32Array.from(v), featureShape: [4] });
const CE = { featureShape: [4], loss: 'sparse-categorical-crossentropy' } as const;

describe('feedback store: labelled requests become samples', () => {
  it('stores a sample when the labelled request’s input is held, and only then', () => {
    const store = FeedbackStore.open(tempDir());
    store.record('with', 'a', 1, row4(1, 2, 3, 4));
    store.record('without', 'a', 1);
    expect(store.label('a', 'with', 2)).toBe(true);
    expect(store.label('a', 'without', 1)).toBe(true);
    // Both are labels; only the one with an input can train.
    expect(store.list('a').map((r) => r.requestId)).toEqual(['without', 'with']);
    expect(store.sampleCount('a')).toBe(1);
    const { set, keys, skipped } = store.loadSamples('a', CE);
    expect([...set.x]).toEqual([1, 2, 3, 4]);
    expect([...set.y]).toEqual([2]);
    expect(set).toMatchObject({ count: 1, featureShape: [4], labelWidth: 1 });
    expect(keys).toHaveLength(1);
    expect(skipped).toBe(0);
    store.close();
  });

  it('keeps a label that fits no loss as a label only, and withdraws the sample it replaces', () => {
    const store = FeedbackStore.open(tempDir());
    store.record('r', 'a', 1, row4(1, 2, 3, 4));
    expect(store.label('a', 'r', 'virginica')).toBe(true);
    expect(store.label('a', 'r', { speech: true })).toBe(true);
    expect(store.list('a')).toHaveLength(1);
    expect(store.sampleCount('a')).toBe(0);
    // A sample's label corrected to one that fits no loss withdraws the sample; the label stays.
    store.record('s', 'a', 1, row4(1, 2, 3, 4));
    store.label('a', 's', 1);
    expect(store.sampleCount('a')).toBe(1);
    store.label('a', 's', 'unsure');
    expect(store.sampleCount('a')).toBe(0);
    expect(store.list('a')[0]).toMatchObject({ requestId: 's', label: 'unsure' });
    store.close();
  });

  it('copies the input: the caller may reuse its buffer, and integer data becomes float32', () => {
    const store = FeedbackStore.open(tempDir());
    const buf = Float32Array.from([1, 2, 3, 4]);
    store.record('f', 'a', 1, { data: buf, featureShape: [4] });
    buf.fill(9);
    store.record('i', 'a', 1, { data: Int16Array.from([-5, 0, 5, 300]), featureShape: [2, 2] });
    store.label('a', 'f', 0);
    store.label('a', 'i', 1);
    expect([...store.loadSamples('a', CE).set.x]).toEqual([1, 2, 3, 4]);
    expect([...store.loadSamples('a', { ...CE, featureShape: [2, 2] }).set.x]).toEqual([-5, 0, 5, 300]);
    store.close();
  });

  it('does not keep an input that is not finite as float32, exceeds the budget alone, or misses its shape', () => {
    const store = FeedbackStore.open(tempDir(), { recentInputBytes: 32 });
    store.record('huge', 'a', 1, { data: Float64Array.from([1e300, 0, 0, 0]), featureShape: [4] });
    store.record('big', 'a', 1, { data: new Float32Array(9), featureShape: [9] });
    store.record('shape', 'a', 1, { data: new Float32Array(4), featureShape: [5] });
    for (const id of ['huge', 'big', 'shape']) expect(store.label('a', id, 1)).toBe(true);
    expect(store.sampleCount('a')).toBe(0);
    store.close();
  });

  it('holds inputs within the byte budget per model, dropping the oldest first; their ids stay labelable', () => {
    // Three inputs of 16 bytes fit in 48; ids r0..r5 all stay in the ring of 10.
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 10, recentInputBytes: 48 });
    for (let i = 0; i < 6; i++) store.record(`r${i}`, 'a', 1, row4(i, i, i, i));
    store.record('other', 'b', 1, row4(7, 7, 7, 7)); // another model has its own budget
    for (let i = 0; i < 6; i++) expect(store.label('a', `r${i}`, i)).toBe(true);
    expect(store.label('b', 'other', 7)).toBe(true);
    expect(store.list('a', 100)).toHaveLength(6);
    const { set } = store.loadSamples('a', CE);
    expect([...set.y]).toEqual([5, 4, 3]);
    expect(store.sampleCount('b')).toBe(1);
    store.close();
  });

  it('drops inputs beyond the budget in push order across ring wrap-arounds and requests without inputs', () => {
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 4, recentInputBytes: 32 });
    for (let i = 0; i < 23; i++) store.record(`r${i}`, 'a', 1, i % 3 === 0 ? undefined : row4(i, 0, 0, 0));
    // The ring holds r19..r22; with inputs: r19, r20, r22 — the newest two fit.
    for (let i = 19; i < 23; i++) store.label('a', `r${i}`, i);
    expect([...store.loadSamples('a', CE).set.y]).toEqual([22, 20]);
    store.close();
  });

  it('replaces a sample’s label when its request is labelled again, keeping its key, with or without the input', () => {
    const store = FeedbackStore.open(tempDir(), { recentPerModel: 10, recentInputBytes: 16 });
    store.record('r', 'a', 1, row4(1, 1, 1, 1));
    store.label('a', 'r', 1);
    const first = store.loadSamples('a', CE).keys[0];
    store.label('a', 'r', 2);
    expect(store.loadSamples('a', CE)).toMatchObject({ keys: Int32Array.of(first!), set: { count: 1 } });
    expect([...store.loadSamples('a', CE).set.y]).toEqual([2]);
    store.record('s', 'a', 1, row4(2, 2, 2, 2)); // pushes r's input out of the 16-byte budget
    store.label('a', 'r', 3);
    const after = store.loadSamples('a', CE);
    expect([...after.keys]).toEqual([first]);
    expect([...after.set.y]).toEqual([3]);
    store.close();
  });
});
