/**
 * The replayer against a real outbox and a recording link: the live/backlog policy, the bandwidth
 * cap, acknowledgements, and what happens to batches in flight when the link drops.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { decodeTelemetryBatch, toRanges, type TelemetryBatch } from '../../proto/index.js';
import { silentLogger } from '../../common/log.js';
import { OutboxStore, type OutboxOptions } from '../../agent/outbox/store.js';
import { DEFAULT_REPLAY, Replayer } from '../../agent/outbox/replay.js';
import { cleanup, tempDir, waitFor } from '../helpers/fleet.js';

afterAll(cleanup);

const roomy: OutboxOptions = {
  maxBytes: 1 << 30,
  synchronous: 'NORMAL',
  perClass: { event: { maxBytes: 1 << 30, maxAgeSec: 1e6 }, health: { maxBytes: 1 << 30, maxAgeSec: 1e6 }, metric: { maxBytes: 1 << 30, maxAgeSec: 1e6 }, stats: { maxBytes: 1 << 30, maxAgeSec: 1e6 }, sample: { maxBytes: 1 << 30, maxAgeSec: 1e6 } },
};

function recorder(): { batches: TelemetryBatch[]; bytes: number[]; publish: (p: Buffer) => Promise<void> } {
  const batches: TelemetryBatch[] = [];
  const bytes: number[] = [];
  return {
    batches,
    bytes,
    publish: (payload) => {
      const d = decodeTelemetryBatch(payload, 1 << 24);
      if (!d.ok) throw d.error;
      batches.push(d.value);
      bytes.push(payload.length);
      return Promise.resolve();
    },
  };
}

const ackAll = (r: Replayer, b: TelemetryBatch): boolean => r.acknowledge({ batch: b.batch, ranges: toRanges(b.records.map((x) => x.seq)) });

describe('replayer', () => {
  it('sends oldest first, but every fourth batch carries the newest records', async () => {
    const { store } = OutboxStore.open(tempDir(), roomy);
    const old = await Promise.all(Array.from({ length: 2000 }, (_, i) => store.enqueue('metric', 'old', i)));
    const link = recorder();
    const r = new Replayer(store, link.publish, silentLogger(), { ...DEFAULT_REPLAY, batchMaxRecords: 100, windowBatches: 1 });
    r.start();
    const fresh = await store.enqueue('event', 'fresh', 'now');
    for (let i = 0; i < 4; i++) {
      await waitFor(`batch ${i + 1}`, () => link.batches.length === i + 1);
      ackAll(r, link.batches[i] as TelemetryBatch);
    }
    const [b1, b2, b3, b4] = link.batches as [TelemetryBatch, TelemetryBatch, TelemetryBatch, TelemetryBatch];
    expect(b1.records[0]?.seq).toBe(old[0]);
    expect(b2.records[0]?.seq).toBe(old[100]);
    expect(b3.records[0]?.seq).toBe(old[200]);
    expect(b4.records.map((x) => x.seq)).toContain(fresh);
    // The account sent with a batch leaves that batch out.
    expect(b1.backlog.records).toBe(2000 - 100);
    r.close();
    store.close();
  });

  it('keeps within a bandwidth cap', async () => {
    const { store } = OutboxStore.open(tempDir(), roomy);
    await Promise.all(Array.from({ length: 3000 }, (_, i) => store.enqueue('sample', 's', { i, noise: Math.random().toString(36).repeat(4) })));
    let now = 1_000_000;
    const link = recorder();
    const rate = 20_000;
    const r = new Replayer(store, link.publish, silentLogger(), { ...DEFAULT_REPLAY, batchMaxRecords: 50, windowBatches: 100, bytesPerSec: rate }, () => now);
    r.start();
    await new Promise((res) => setTimeout(res, 100));
    const sent = (): number => link.bytes.reduce((a, b) => a + b, 0);
    const firstSecond = sent();
    // With no time passing, no more than one second's worth (plus the batch that overdrew it) went out.
    expect(firstSecond).toBeGreaterThan(0);
    expect(firstSecond).toBeLessThanOrEqual(rate + Math.max(...link.bytes));
    now += 1000;
    await waitFor('the next second’s allowance is spent', () => sent() > firstSecond, 5000);
    expect(sent()).toBeLessThanOrEqual(2 * rate + 2 * Math.max(...link.bytes));
    r.close();
    store.close();
  });

  it('deletes nothing for a foreign ack, and resends what was in flight when the link dropped', async () => {
    const { store } = OutboxStore.open(tempDir(), roomy);
    const seqs = await Promise.all(Array.from({ length: 10 }, (_, i) => store.enqueue('event', 'e', i)));
    const link = recorder();
    const r = new Replayer(store, link.publish, silentLogger());
    r.start();
    await waitFor('one batch', () => link.batches.length === 1);
    expect(r.acknowledge({ batch: 'not-ours', ranges: [[1, 1e9]] })).toBe(false);
    expect(store.backlog().records).toBe(10);
    r.pause(); // the link drops; the ack for the batch never comes
    r.start();
    await waitFor('sent again', () => link.batches.length === 2);
    expect((link.batches[1] as TelemetryBatch).records.map((x) => x.seq)).toEqual(seqs);
    // An ack for the first batch is now stale; only the batch in flight counts.
    expect(ackAll(r, link.batches[0] as TelemetryBatch)).toBe(false);
    expect(ackAll(r, link.batches[1] as TelemetryBatch)).toBe(true);
    expect(store.backlog().records).toBe(0);
    r.close();
    store.close();
  });
});
