import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { z } from 'zod';
import { BINARY_FRAME_MAGIC, MAX_JSON_DEPTH, nestsDeeperThan, summarizeIssues } from './codec.js';
import { EdgefleetError } from './errors.js';
import type { Decoded } from './codec.js';

/**
 * Everything an agent reports upstream goes through its outbox as records of one of these classes.
 * The priority decides what is dropped first when the outbox is full: events and health verdicts
 * outrank metrics and statistics, which outrank prediction samples.
 */
export const RECORD_CLASSES = ['event', 'health', 'metric', 'stats', 'sample'] as const;
export type RecordClass = (typeof RECORD_CLASSES)[number];
export const CLASS_PRIORITY: Record<RecordClass, number> = { event: 3, health: 3, metric: 2, stats: 2, sample: 1 };

const Seq = z.number().int().min(1).max(Number.MAX_SAFE_INTEGER);

export const TelemetryRecord = z
  .object({
    /** Per-device sequence number: monotonic for the device's lifetime, never reused. */
    seq: Seq,
    cls: z.enum(RECORD_CLASSES),
    /** Creation time on the device, ms since the epoch (device clocks may be off). */
    ts: z.number().int().nonnegative(),
    /** Record type, e.g. `agent.started`, `outbox.dropped`, `resources`. */
    type: z.string().min(1).max(64),
    body: z.unknown(),
  })
  .strict();
export type TelemetryRecord = z.infer<typeof TelemetryRecord>;

/** What the agent still holds, sent with every batch so the fleet can show a device's backlog. */
export const Backlog = z
  .object({
    records: z.number().int().nonnegative(),
    bytes: z.number().int().nonnegative(),
    /** Age of the oldest record not yet acknowledged, in seconds; null when none. */
    oldestAgeSec: z.number().nonnegative().nullable(),
    /** Records dropped to keep within bounds since the outbox was created, per class. */
    dropped: z.partialRecord(z.enum(RECORD_CLASSES), z.number().int().nonnegative()),
  })
  .strict();
export type Backlog = z.infer<typeof Backlog>;

/** `up/telemetry`: a batch of records, as a compressed binary frame (see encodeTelemetryBatch). */
export const TelemetryBatch = z
  .object({
    /** Batch id, echoed by the acknowledgement. */
    batch: z.string().min(1).max(64),
    records: z.array(TelemetryRecord).min(1).max(5000),
    backlog: Backlog,
  })
  .strict()
  .refine((b) => new Set(b.records.map((r) => r.seq)).size === b.records.length, 'sequence numbers in a batch are unique');
export type TelemetryBatch = z.infer<typeof TelemetryBatch>;

/**
 * `down/ack`: the fleet has stored these sequence numbers (inclusive ranges) of batch `batch`.
 * The agent deletes a record only when an acknowledgement names it and the batch it was sent in.
 */
export const TelemetryAck = z
  .object({
    batch: z.string().min(1).max(64),
    ranges: z
      .array(z.tuple([Seq, Seq]).refine(([a, b]) => a <= b, 'a range runs from low to high'))
      .min(1)
      .max(5000),
  })
  .strict();
export type TelemetryAck = z.infer<typeof TelemetryAck>;

/** Binary frame types (second byte after BINARY_FRAME_MAGIC). */
export const FRAME_TELEMETRY_BATCH = 0x01;
const FRAME_VERSION = 0x01;
/** Largest batch after decompression; a frame that inflates beyond it is refused (a zip bomb). */
export const MAX_TELEMETRY_INFLATED_BYTES = 8 * 1024 * 1024;

/** A record whose body is already JSON text (as the agent stores it), so it is not parsed only to be written again. */
export type RawTelemetryRecord = Omit<TelemetryRecord, 'body'> & { bodyJson: string };

/** `[0xEF, 0x01, 0x01, ...deflate-raw(JSON)]`: a batch is mostly repetitive JSON, which deflates well. */
export function encodeTelemetryBatch(batch: Omit<TelemetryBatch, 'records'> & { records: readonly (TelemetryRecord | RawTelemetryRecord)[] }): Buffer {
  const records = batch.records.map((r) => {
    const body = 'bodyJson' in r ? r.bodyJson : JSON.stringify(r.body ?? null);
    return `{"seq":${r.seq},"cls":${JSON.stringify(r.cls)},"ts":${r.ts},"type":${JSON.stringify(r.type)},"body":${body}}`;
  });
  const json = `{"batch":${JSON.stringify(batch.batch)},"records":[${records.join(',')}],"backlog":${JSON.stringify(batch.backlog)}}`;
  const body = deflateRawSync(Buffer.from(json, 'utf8'), { level: 1 });
  return Buffer.concat([Buffer.from([BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, FRAME_VERSION]), body]);
}

/** Decodes and validates a telemetry frame; never throws. */
export function decodeTelemetryBatch(payload: Buffer | Uint8Array, maxBytes: number): Decoded<TelemetryBatch> {
  const bad = (message: string): Decoded<TelemetryBatch> => ({ ok: false, error: new EdgefleetError('EF_BAD_PAYLOAD', message) });
  if (payload.length > maxBytes) {
    return { ok: false, error: new EdgefleetError('EF_PAYLOAD_TOO_LARGE', `${payload.length} bytes, limit ${maxBytes}`) };
  }
  if (payload.length < 4 || payload[0] !== BINARY_FRAME_MAGIC || payload[1] !== FRAME_TELEMETRY_BATCH) return bad('not a telemetry frame');
  if (payload[2] !== FRAME_VERSION) return bad(`unknown telemetry frame version ${payload[2]}`);
  let json: unknown;
  try {
    const inflated = inflateRawSync(payload.subarray(3), { maxOutputLength: MAX_TELEMETRY_INFLATED_BYTES });
    json = JSON.parse(inflated.toString('utf8'));
  } catch (e) {
    return bad(`frame does not inflate to JSON: ${(e as Error).message.slice(0, 120)}`);
  }
  // Bodies are stored with JSON.stringify, which recurses: a tiny frame nested thousands deep would throw there.
  if (nestsDeeperThan(json, MAX_JSON_DEPTH)) return bad(`batch nests deeper than ${MAX_JSON_DEPTH} levels`);
  const parsed = TelemetryBatch.safeParse(json);
  if (!parsed.success) return bad(summarizeIssues(parsed.error.issues, 5));
  return { ok: true, value: parsed.data };
}

/** Collapses sorted-or-not sequence numbers into inclusive ranges. */
export function toRanges(seqs: readonly number[]): [number, number][] {
  const sorted = [...seqs].sort((a, b) => a - b);
  const out: [number, number][] = [];
  for (const s of sorted) {
    const last = out[out.length - 1];
    if (last && s <= last[1] + 1) last[1] = Math.max(last[1], s);
    else out.push([s, s]);
  }
  return out;
}
