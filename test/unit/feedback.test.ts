/**
 * The feedback store on real SQLite files: the ring of recent request ids and the table of labels
 * both stay within their bounds, labels survive a reopen (ids do not), and bad labels are refused.
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { FEEDBACK_DB_FILE, FeedbackStore, MAX_LABEL_BYTES } from '../../agent/api/feedback.js';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'edgefleet-feedback-'));
  dirs.push(d);
  return d;
}
/** The catalog code `fn` throws, or null when it does not throw. */
function codeOf(fn: () => unknown): string | null {
  try {
    fn();
    return null;
  } catch (err) {
    return (err as { code?: string }).code ?? 'no code';
  }
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
    expect(db.pragma('user_version', { simple: true })).toBe(1);
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
  });
});
