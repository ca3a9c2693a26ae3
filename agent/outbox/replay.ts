import { randomBytes } from 'node:crypto';
import { MAX_PAYLOAD_BYTES, encodeTelemetryBatch, type TelemetryAck } from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { OutboxStore, StoredRecord } from './store.js';

export interface ReplayOptions {
  /** Records per batch, and body bytes per batch (before compression). */
  batchMaxRecords: number;
  batchMaxBytes: number;
  /** Batches sent and not yet acknowledged, at most. */
  windowBatches: number;
  /** A batch not acknowledged within this is sent again (its records become eligible again). */
  ackTimeoutMs: number;
  /** Every `liveEvery`-th batch carries the newest records instead of the oldest (see README, "Outbox"). */
  liveEvery: number;
  /** Cap on compressed bytes per second for metered links; 0 for none. */
  bytesPerSec: number;
}

export const DEFAULT_REPLAY: ReplayOptions = {
  batchMaxRecords: 500,
  batchMaxBytes: 128 * 1024,
  windowBatches: 8,
  ackTimeoutMs: 15_000,
  liveEvery: 4,
  bytesPerSec: 0,
};

export type Publish = (payload: Buffer) => Promise<void>;

interface InFlight {
  seqs: Set<number>;
  timer: NodeJS.Timeout;
}

/**
 * Sends the outbox to the fleet while the link is up: batches in sequence order, QoS 1, a window of
 * batches in flight, each record deleted only when an acknowledgement names it and the batch it went
 * in. Anything unacknowledged when the link drops, or when its ack times out, is simply eligible
 * again: the fleet deduplicates on (device, sequence), so a resend is harmless.
 *
 * Fairness between a long backlog and fresh records: every `liveEvery`-th batch takes the newest
 * unsent records, the others take the oldest, so live data keeps flowing at a quarter of the link
 * (by default) while a week of backlog drains.
 */
export class Replayer {
  private readonly inflight = new Map<string, InFlight>();
  private readonly sending = new Set<number>();
  private running = false;
  private pumping = false;
  private batchCount = 0;
  /** The highest sequence number handed to an "oldest" batch in this connection. */
  private cursor = 0;
  private tokens = 0;
  private lastRefill = 0;
  private waitTimer: NodeJS.Timeout | null = null;
  private readonly off: () => void;
  stats = { batchesSent: 0, recordsSent: 0, recordsAcked: 0, acksRejected: 0, resends: 0, bytesSent: 0 };

  constructor(
    private readonly store: OutboxStore,
    private readonly publish: Publish,
    private readonly log: Logger,
    private readonly opts: ReplayOptions = DEFAULT_REPLAY,
    private readonly now: () => number = Date.now,
  ) {
    this.off = store.onCommit(() => this.pump());
  }

  /** The link is up: start sending. */
  start(): void {
    this.running = true;
    this.cursor = 0;
    this.pump();
  }

  /** The link is down: forget what is in flight (it will be sent again). */
  pause(): void {
    this.running = false;
    for (const f of this.inflight.values()) clearTimeout(f.timer);
    this.inflight.clear();
    this.sending.clear();
    if (this.waitTimer) clearTimeout(this.waitTimer);
    this.waitTimer = null;
  }

  close(): void {
    this.pause();
    this.off();
  }

  get inFlightBatches(): number {
    return this.inflight.size;
  }

  /** An acknowledgement from the fleet. Returns false (and deletes nothing) when it matches no batch in flight. */
  acknowledge(ack: TelemetryAck): boolean {
    const f = this.inflight.get(ack.batch);
    if (!f) {
      this.stats.acksRejected++;
      return false;
    }
    clearTimeout(f.timer);
    this.inflight.delete(ack.batch);
    const n = this.store.acknowledge(ack.ranges, f.seqs);
    this.stats.recordsAcked += n;
    // Whatever the ack did not name stays in the outbox and goes again later.
    for (const s of f.seqs) this.sending.delete(s);
    this.pump();
    return true;
  }

  private pump(): void {
    if (!this.running || this.pumping) return;
    this.pumping = true;
    try {
      while (this.running && this.inflight.size < this.opts.windowBatches) {
        const delay = this.throttleDelay();
        if (delay > 0) {
          this.wait(delay);
          return;
        }
        const records = this.nextBatch();
        if (records.length === 0) return;
        this.send(records);
      }
    } finally {
      this.pumping = false;
    }
  }

  private nextBatch(): StoredRecord[] {
    const live = this.opts.liveEvery > 0 && this.batchCount % this.opts.liveEvery === this.opts.liveEvery - 1;
    const { batchMaxRecords: n, batchMaxBytes: bytes } = this.opts;
    let records = live ? this.store.newest(this.sending, n, bytes) : this.store.oldest(this.cursor, this.sending, n, bytes);
    if (!live && records.length === 0 && this.cursor > 0) {
      // Past the end: start over from the beginning for records that came back (a timed-out batch).
      this.cursor = 0;
      records = this.store.oldest(0, this.sending, n, bytes);
    }
    if (!live && records.length > 0) this.cursor = (records[records.length - 1] as StoredRecord).seq;
    this.batchCount++;
    return records;
  }

  private send(records: StoredRecord[]): void {
    const batch = randomBytes(8).toString('hex');
    const payload = encodeTelemetryBatch({
      batch,
      records,
      backlog: this.store.backlog(records),
    });
    if (payload.length > MAX_PAYLOAD_BYTES.telemetry && records.length > 1) {
      // Incompressible bodies: send the halves separately.
      const half = Math.ceil(records.length / 2);
      this.send(records.slice(0, half));
      this.send(records.slice(half));
      return;
    }
    const seqs = new Set(records.map((r) => r.seq));
    for (const s of seqs) {
      if (this.sending.has(s)) this.stats.resends++;
      this.sending.add(s);
    }
    const timer = setTimeout(() => {
      // No ack in time: give the records back; they will be sent again.
      this.inflight.delete(batch);
      for (const s of seqs) this.sending.delete(s);
      this.cursor = 0;
      this.pump();
    }, this.opts.ackTimeoutMs);
    timer.unref();
    this.inflight.set(batch, { seqs, timer });
    this.tokens -= payload.length;
    this.stats.batchesSent++;
    this.stats.recordsSent += records.length;
    this.stats.bytesSent += payload.length;
    this.publish(payload).catch((err: unknown) => {
      this.log.debug({ err, batch }, 'telemetry batch not sent; it will go again');
    });
  }

  /** Token bucket over compressed bytes: how long to wait before the next batch may go. */
  private throttleDelay(): number {
    const rate = this.opts.bytesPerSec;
    if (rate <= 0) return 0;
    const t = this.now();
    if (this.lastRefill === 0) this.tokens = rate;
    else this.tokens = Math.min(rate, this.tokens + ((t - this.lastRefill) / 1000) * rate);
    this.lastRefill = t;
    return this.tokens >= 0 ? 0 : Math.ceil((-this.tokens / rate) * 1000);
  }

  private wait(ms: number): void {
    if (this.waitTimer) return;
    this.waitTimer = setTimeout(() => {
      this.waitTimer = null;
      this.pump();
    }, ms);
    this.waitTimer.unref();
  }
}
