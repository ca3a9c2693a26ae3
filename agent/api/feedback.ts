import { existsSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { EdgefleetError } from '../../proto/index.js';

/**
 * Labels that applications attach to earlier inferences, kept for federated learning later.
 *
 * Two bounded halves. In memory, per model, a ring of the last `recentPerModel` request ids with
 * the version that answered and when: `record()` runs on every inference, so it is O(1) and
 * touches no disk. On disk (SQLite, WAL), the labelled requests, at most `maxLabelsPerModel` per
 * model, oldest deleted first. A label can only be attached to an id still in the ring: ids do not
 * survive a restart, labels do.
 */

export const FEEDBACK_DB_FILE = 'feedback.db';
export const MAX_LABEL_BYTES = 4096;
const SCHEMA_VERSION = 1;

export interface FeedbackOptions {
  /** Request ids remembered per model, to be labelled later. Default 10 000. */
  recentPerModel?: number;
  /** Labelled requests kept per model; the oldest go first. Default 10 000. */
  maxLabelsPerModel?: number;
  /** ms since the epoch. */
  clock?: () => number;
}

export interface FeedbackRecord {
  requestId: string;
  model: string;
  version: number;
  label: unknown;
  /** When the label came (ms). */
  ts: number;
  /** When the request was answered (ms). */
  requestTs: number;
}

/** A fixed ring of request ids, with an index from id to slot. */
class Ring {
  readonly ids: (string | undefined)[];
  readonly versions: Int32Array;
  readonly ts: Float64Array;
  readonly index = new Map<string, number>();
  next = 0;

  constructor(readonly size: number) {
    this.ids = new Array<string | undefined>(size);
    this.versions = new Int32Array(size);
    this.ts = new Float64Array(size);
  }

  push(id: string, version: number, ts: number): void {
    const slot = this.next;
    const old = this.ids[slot];
    // The evicted id may have been recorded again since (a client reusing its ids); only drop an index entry that is ours.
    if (old !== undefined && this.index.get(old) === slot) this.index.delete(old);
    this.ids[slot] = id;
    this.versions[slot] = version;
    this.ts[slot] = ts;
    this.index.set(id, slot);
    this.next = slot + 1 === this.size ? 0 : slot + 1;
  }
}

interface Row {
  request_id: string;
  model: string;
  version: number;
  label: string;
  ts: number;
  request_ts: number;
}

export class FeedbackStore {
  private readonly rings = new Map<string, Ring>();
  private readonly recentPerModel: number;
  private readonly clock: () => number;
  private readonly insert: Database.Statement<[string, string, number, string, number, number]>;
  private readonly trim: Database.Statement<[string, string, number]>;
  private readonly select: Database.Statement<[string, number], Row>;
  private readonly labelTx: Database.Transaction<(model: string, requestId: string, version: number, label: string, ts: number, requestTs: number) => void>;

  private constructor(
    private readonly db: Database.Database,
    opts: FeedbackOptions,
  ) {
    this.recentPerModel = opts.recentPerModel ?? 10_000;
    const maxLabels = opts.maxLabelsPerModel ?? 10_000;
    this.clock = opts.clock ?? Date.now;
    // Labelling the same request again replaces its label; it keeps its place in the age order.
    this.insert = db.prepare(`
      INSERT INTO labels (model, request_id, version, label, ts, request_ts) VALUES (?, ?, ?, ?, ?, ?)
      ON CONFLICT (model, request_id) DO UPDATE SET label = excluded.label, ts = excluded.ts`);
    // Everything at or below the seq of the (M+1)-th newest row goes; one index range scan per label.
    this.trim = db.prepare(`
      DELETE FROM labels WHERE model = ? AND seq <= (
        SELECT seq FROM labels WHERE model = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)`);
    this.select = db.prepare('SELECT request_id, model, version, label, ts, request_ts FROM labels WHERE model = ? ORDER BY seq DESC LIMIT ?');
    this.labelTx = db.transaction((model: string, requestId: string, version: number, label: string, ts: number, requestTs: number) => {
      this.insert.run(model, requestId, version, label, ts, requestTs);
      this.trim.run(model, model, maxLabels);
    });
  }

  /** Opens (creating if needed) `<stateDir>/feedback.db`; a file SQLite cannot read is moved aside and a new one started. */
  static open(stateDir: string, opts: FeedbackOptions = {}): FeedbackStore {
    positiveInt(opts.recentPerModel ?? 1, 'recentPerModel');
    positiveInt(opts.maxLabelsPerModel ?? 1, 'maxLabelsPerModel');
    const file = join(stateDir, FEEDBACK_DB_FILE);
    let db: Database.Database;
    try {
      db = openDb(file);
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      if (code !== 'SQLITE_NOTADB' && code !== 'SQLITE_CORRUPT') throw err;
      const aside = `${file}.corrupt-${Date.now()}`;
      renameSync(file, aside);
      for (const ext of ['-wal', '-shm']) if (existsSync(file + ext)) renameSync(file + ext, aside + ext);
      db = openDb(file);
    }
    return new FeedbackStore(db, opts);
  }

  /** Remembers that `requestId` was answered by `version` of `model`. Called on every inference: O(1), no I/O. */
  record(requestId: string, model: string, version: number): void {
    let ring = this.rings.get(model);
    if (ring === undefined) {
      ring = new Ring(this.recentPerModel);
      this.rings.set(model, ring);
    }
    ring.push(requestId, version, this.clock());
  }

  /**
   * Stores a label for a recent request. False when the id is not (or no longer) remembered.
   * The label is any JSON value of at most 4 KiB serialised; anything else is EF_BAD_PAYLOAD.
   */
  label(model: string, requestId: string, label: unknown): boolean {
    const ring = this.rings.get(model);
    const slot = ring?.index.get(requestId);
    if (ring === undefined || slot === undefined) return false;
    const text = serialise(label);
    this.labelTx(model, requestId, ring.versions[slot]!, text, this.clock(), ring.ts[slot]!);
    return true;
  }

  /** The newest `limit` labelled requests of `model`, newest first. */
  list(model: string, limit = 100): FeedbackRecord[] {
    return this.select.all(model, Math.max(0, Math.floor(limit))).map((r) => ({
      requestId: r.request_id,
      model: r.model,
      version: r.version,
      label: JSON.parse(r.label) as unknown,
      ts: r.ts,
      requestTs: r.request_ts,
    }));
  }

  close(): void {
    this.rings.clear();
    if (this.db.open) this.db.close();
  }
}

function serialise(label: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(label);
  } catch (err) {
    // A cycle or a bigint: not JSON.
    throw new EdgefleetError('EF_BAD_PAYLOAD', 'the label is not JSON', { cause: err, details: { field: 'label' } });
  }
  if (text === undefined) throw new EdgefleetError('EF_BAD_PAYLOAD', 'the label is not JSON', { details: { field: 'label' } });
  if (text.length > MAX_LABEL_BYTES || Buffer.byteLength(text) > MAX_LABEL_BYTES) {
    throw new EdgefleetError('EF_BAD_PAYLOAD', `the label exceeds ${MAX_LABEL_BYTES} bytes as JSON`, { details: { field: 'label' } });
  }
  return text;
}

function positiveInt(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 1) throw new EdgefleetError('EF_CONFIG_INVALID', `feedback: ${what} must be a positive integer`);
}

/** The schema is versioned with user_version and migrated one version at a time (only v1 so far). */
function openDb(file: string): Database.Database {
  const db = new Database(file);
  try {
    db.pragma('journal_mode = WAL');
    // A label lost with the last second before a power cut is acceptable; an fsync per label on an SD card is not.
    db.pragma('synchronous = NORMAL');
    const version = db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) throw new EdgefleetError('EF_CONFIG_INVALID', `${file} has schema ${version}, newer than this agent knows (${SCHEMA_VERSION})`);
    if (version < 1) {
      db.exec(`
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
    }
    return db;
  } catch (err) {
    db.close();
    throw err;
  }
}
