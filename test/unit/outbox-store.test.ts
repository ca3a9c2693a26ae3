/**
 * The agent's outbox store on real SQLite files: bounds, priorities, exact drop counts, ages,
 * acknowledgements, sequence numbers that never go back, and a corrupt file moved aside.
 */
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { RECORD_CLASSES, type RecordClass } from '../../proto/index.js';
import { OutboxStore, type OutboxOptions } from '../../agent/outbox/store.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

afterAll(cleanup);

const DAY = 86_400;
function limits(maxBytes: number, perClass: Partial<Record<RecordClass, { maxBytes?: number; maxAgeSec?: number }>> = {}): OutboxOptions {
  return {
    maxBytes,
    synchronous: 'NORMAL',
    perClass: Object.fromEntries(
      RECORD_CLASSES.map((c) => [c, { maxBytes: perClass[c]?.maxBytes ?? maxBytes, maxAgeSec: perClass[c]?.maxAgeSec ?? 365 * DAY }]),
    ) as OutboxOptions['perClass'],
  };
}

function counts(store: OutboxStore): Record<RecordClass, number> {
  const out = Object.fromEntries(RECORD_CLASSES.map((c) => [c, 0])) as Record<RecordClass, number>;
  for (const r of store.oldest(0, new Set(), 1_000_000, Number.MAX_SAFE_INTEGER)) out[r.cls]++;
  return out;
}

describe('outbox store', () => {
  it('stays within its bounds through a simulated week offline, drops lowest priority first and counts every drop', async () => {
    let now = Date.UTC(2026, 0, 1);
    const dir = tempDir();
    const maxBytes = 2 * 1024 * 1024;
    const { store } = OutboxStore.open(dir, limits(maxBytes, { event: { maxBytes: 1024 * 1024 } }), () => now);
    const inserted = Object.fromEntries(RECORD_CLASSES.map((c) => [c, 0])) as Record<RecordClass, number>;
    let peakFile = 0;
    // One week, one tick a minute: 1 event, 10 metrics and 5 prediction samples each minute.
    for (let minute = 0; minute < 7 * 24 * 60; minute++) {
      now += 60_000;
      const batch: Promise<number>[] = [];
      const add = (cls: RecordClass, n: number, body: unknown): void => {
        for (let i = 0; i < n; i++) batch.push(store.enqueue(cls, cls, body));
        inserted[cls] += n;
      };
      add('event', 1, { minute, kind: 'lifecycle' });
      add('metric', 10, { minute, latencyP95Ms: 12.5, values: [1, 2, 3, 4, 5, 6, 7, 8] });
      add('sample', 5, { minute, input: 'x'.repeat(200), output: [0.1, 0.9] });
      await Promise.all(batch);
      if (minute % 1000 === 0) peakFile = Math.max(peakFile, store.fileBytes());
      expect(store.totalBytes()).toBeLessThanOrEqual(maxBytes);
    }
    peakFile = Math.max(peakFile, store.fileBytes());
    const left = counts(store);
    const dropped = store.droppedCounts();
    // Exact accounting: everything inserted is either still here or counted as dropped.
    for (const c of RECORD_CLASSES) expect(left[c] + dropped[c], c).toBe(inserted[c]);
    // Priorities: no event was dropped; samples went first, so far fewer of them are left than metrics.
    expect(dropped.event).toBe(0);
    expect(dropped.sample).toBeGreaterThan(0);
    expect(left.sample).toBeLessThan(left.metric);
    expect(store.backlog().dropped).toEqual(Object.fromEntries(Object.entries(dropped).filter(([, n]) => n > 0)));
    // The file on disk stays bounded too (pages of dropped records are reused).
    expect(peakFile).toBeLessThan(maxBytes * 3);
    store.close();
  }, 60_000);

  it('drops records past their class age and counts them', async () => {
    let now = 1_000_000;
    const { store } = OutboxStore.open(tempDir(), limits(1 << 30, { sample: { maxAgeSec: 3600 } }), () => now);
    await store.enqueue('sample', 's', 1);
    await store.enqueue('event', 'e', 1);
    now += 3601 * 1000;
    await store.enqueue('sample', 's', 2);
    expect(store.expire()).toBe(1);
    expect(counts(store)).toMatchObject({ sample: 1, event: 1 });
    expect(store.droppedCounts().sample).toBe(1);
    store.close();
  });

  it('deletes only acknowledged records of the batch they were sent in', async () => {
    const { store } = OutboxStore.open(tempDir(), limits(1 << 30));
    const seqs = await Promise.all(Array.from({ length: 10 }, (_, i) => store.enqueue('metric', 'm', i)));
    const sent = new Set(seqs.slice(0, 5));
    // The ack names everything, but only the five sent in this batch may go.
    expect(store.acknowledge([[seqs[0] as number, seqs[9] as number]], sent)).toBe(5);
    expect(store.backlog().records).toBe(5);
    store.close();
  });

  it('never deletes a record an acknowledgement does not cover (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.integer({ min: 1, max: 60 }), fc.integer({ min: 0, max: 10 })), { maxLength: 8 }),
        fc.uniqueArray(fc.integer({ min: 1, max: 50 }), { maxLength: 50 }),
        async (rawRanges, allowedList) => {
          const { store } = OutboxStore.open(tempDir(), limits(1 << 30));
          const seqs = await Promise.all(Array.from({ length: 40 }, (_, i) => store.enqueue('event', 'e', i)));
          const ranges = rawRanges.map(([lo, len]) => [lo, lo + len] as const);
          const allowed = new Set(allowedList);
          const deleted = store.acknowledge(ranges, allowed);
          const expected = seqs.filter((s) => allowed.has(s) && ranges.some(([lo, hi]) => s >= lo && s <= hi));
          const left = new Set(store.oldest(0, new Set(), 1000, Number.MAX_SAFE_INTEGER).map((r) => r.seq));
          store.close();
          expect(deleted).toBe(expected.length);
          for (const s of seqs) expect(left.has(s)).toBe(!expected.includes(s));
        },
      ),
      { numRuns: 40 },
    );
  });

  it('keeps sequence numbers rising across restarts, deletions and a corrupt database', async () => {
    const dir = tempDir();
    const first = OutboxStore.open(dir, limits(1 << 30)).store;
    const a = await Promise.all([first.enqueue('event', 'e', 1), first.enqueue('event', 'e', 2)]);
    first.acknowledge([[1, 1_000_000]], new Set(a));
    first.close();
    const second = OutboxStore.open(dir, limits(1 << 30)).store;
    const b = await second.enqueue('event', 'e', 3);
    expect(b).toBeGreaterThan(Math.max(...a));
    second.close();

    writeFileSync(join(dir, 'outbox.db'), 'this is not a database, it is what a bad SD card leaves behind'.repeat(100));
    const { store: third, movedAside } = OutboxStore.open(dir, limits(1 << 30));
    expect(movedAside).not.toBeNull();
    expect(existsSync(movedAside as string)).toBe(true);
    expect(readdirSync(dir).some((f) => f.startsWith('outbox.db.corrupt-'))).toBe(true);
    const c = await third.enqueue('event', 'e', 4);
    // A fresh database never hands out a number the fleet may already hold.
    expect(c).toBeGreaterThan(b);
    third.close();
  });

  it('refuses a record too large to ever be sent, and stores nothing', async () => {
    const { store } = OutboxStore.open(tempDir(), limits(1 << 30));
    await expect(store.enqueue('sample', 'huge', 'x'.repeat(300 * 1024))).rejects.toMatchObject({ code: 'EF_PAYLOAD_TOO_LARGE' });
    let deep: unknown = 1;
    for (let i = 0; i < 100; i++) deep = [deep];
    await expect(store.enqueue('event', 'deep', deep)).rejects.toMatchObject({ code: 'EF_BAD_PAYLOAD' });
    expect(store.backlog().records).toBe(0);
    store.close();
  });
});
