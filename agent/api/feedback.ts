import { existsSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { EdgefleetError } from '../../proto/index.js';
import { firstNonFinite, shapeSize, SampleTable, serialiseLabel, type LoadedSamples, type LoadSamplesOptions, type SampleInput } from '../learner/sample-store.js';

/**
 * Labels that applications attach to earlier inferences, and the samples they make for local
 * training (agent/learner/sample-store.ts). Nothing here leaves the device.
 *
 * Two bounded halves. In memory, per model, a ring of the last `recentPerModel` request ids with
 * the version that answered and when, and, for a model that trains, a float32 copy of the
 * request's training input, all inputs of a model within `recentInputBytes` (the oldest dropped
 * first; their ids stay labelable). `record()` runs on every inference: no disk, and O(1) besides
 * the copy. On disk (SQLite, WAL), the labelled requests, at most `maxLabelsPerModel` per model,
 * oldest deleted first; a label on a request whose input is still in the ring also stores a
 * sample, in the same transaction. A label can only be attached to an id still in the ring: ids
 * and inputs do not survive a restart, labels and samples do.
 */

export const FEEDBACK_DB_FILE = 'feedback.db';
export { MAX_LABEL_BYTES } from '../learner/sample-store.js';
const SCHEMA_VERSION = 2;

export interface FeedbackOptions {
  /** Request ids remembered per model, to be labelled later. Default 10 000. */
  recentPerModel?: number;
  /** Labelled requests kept per model; the oldest go first. Default 10 000. */
  maxLabelsPerModel?: number;
  /** Samples kept per model; the oldest go first. Default 10 000. */
  maxSamplesPerModel?: number;
  /** Samples older than this are deleted. Default 30 days. */
  maxSampleAgeSec?: number;
  /** Bytes of recent requests' inputs held in memory per model; 0 keeps none. Default 16 MiB. */
  recentInputBytes?: number;
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

/**
 * A fixed ring of request ids, with an index from id to slot, and the inputs of the newest of them
 * within a byte budget. Push number k sits in slot k % size; no push before `oldestInput` still
 * holds an input, so dropping the oldest inputs walks forward from there: O(1) amortised.
 */
interface HeldInput {
  data: Float32Array;
  featureShape: number[];
}

class Ring {
  readonly ids: (string | undefined)[];
  readonly versions: Int32Array;
  readonly ts: Float64Array;
  readonly inputs: (HeldInput | undefined)[];
  readonly index = new Map<string, number>();
  inputBytes = 0;
  private pushed = 0;
  private oldestInput = 0;

  constructor(
    readonly size: number,
    private readonly inputBudget: number,
  ) {
    this.ids = new Array<string | undefined>(size);
    this.versions = new Int32Array(size);
    this.ts = new Float64Array(size);
    this.inputs = new Array<HeldInput | undefined>(size);
  }

  push(id: string, version: number, ts: number, input: HeldInput | undefined): void {
    const slot = this.pushed % this.size;
    const old = this.ids[slot];
    // The evicted id may have been recorded again since (a client reusing its ids); only drop an index entry that is ours.
    if (old !== undefined && this.index.get(old) === slot) this.index.delete(old);
    this.dropInput(slot);
    this.ids[slot] = id;
    this.versions[slot] = version;
    this.ts[slot] = ts;
    this.index.set(id, slot);
    this.inputs[slot] = input;
    this.inputBytes += input?.data.byteLength ?? 0;
    this.pushed++;
    if (this.inputBytes > this.inputBudget) {
      // Ends at the latest after the newest push: with no input held, 0 bytes fit any budget.
      let k = Math.max(this.oldestInput, this.pushed - this.size);
      while (this.inputBytes > this.inputBudget) this.dropInput(k++ % this.size);
      this.oldestInput = k;
    }
  }

  private dropInput(slot: number): void {
    this.inputBytes -= this.inputs[slot]?.data.byteLength ?? 0;
    this.inputs[slot] = undefined;
  }
}

export class FeedbackStore {
  private readonly rings = new Map<string, Ring>();
  private readonly recentPerModel: number;
  private readonly recentInputBytes: number;
  private readonly clock: () => number;
  private readonly samples: SampleTable;
  private readonly insert: Database.Statement<[string, string, number, string, number, number]>;
  private readonly trim: Database.Statement<[string, string, number]>;
  private readonly select: Database.Statement<[string, number], { request_id: string; model: string; version: number; label: string; ts: number; request_ts: number }>;
  private readonly labelTx: Database.Transaction<(model: string, requestId: string, version: number, label: string, ts: number, requestTs: number, input: HeldInput | undefined) => void>;

  private constructor(
    private readonly db: Database.Database,
    opts: FeedbackOptions,
  ) {
    this.recentPerModel = opts.recentPerModel ?? 10_000;
    this.recentInputBytes = opts.recentInputBytes ?? 16 * 1024 * 1024;
    const maxLabels = opts.maxLabelsPerModel ?? 10_000;
    this.clock = opts.clock ?? Date.now;
    this.samples = new SampleTable(db, { maxSamplesPerModel: opts.maxSamplesPerModel ?? 10_000, maxSampleAgeSec: opts.maxSampleAgeSec ?? 30 * 86_400, clock: this.clock });
    this.samples.purgeExpired();
    // Labelling the same request again replaces its label; it keeps its place in the age order.
    this.insert = db.prepare(`
      INSERT INTO labels (model, request_id, version, label, ts, request_ts) VALUES (?, ?, ?, ?, ?, ?)
      ON CONFLICT (model, request_id) DO UPDATE SET label = excluded.label, ts = excluded.ts`);
    // Everything at or below the seq of the (M+1)-th newest row goes; one index range scan per label.
    this.trim = db.prepare(`
      DELETE FROM labels WHERE model = ? AND seq <= (
        SELECT seq FROM labels WHERE model = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)`);
    this.select = db.prepare('SELECT request_id, model, version, label, ts, request_ts FROM labels WHERE model = ? ORDER BY seq DESC LIMIT ?');
    this.labelTx = db.transaction((model: string, requestId: string, version: number, label: string, ts: number, requestTs: number, input: HeldInput | undefined) => {
      this.insert.run(model, requestId, version, label, ts, requestTs);
      this.trim.run(model, model, maxLabels);
      this.samples.putFromRequest(model, requestId, input, label);
    });
  }

  /** Opens (creating if needed) `<stateDir>/feedback.db`; a file SQLite cannot read is moved aside and a new one started. */
  static open(stateDir: string, opts: FeedbackOptions = {}): FeedbackStore {
    positiveInt(opts.recentPerModel ?? 1, 'recentPerModel');
    positiveInt(opts.maxLabelsPerModel ?? 1, 'maxLabelsPerModel');
    positiveInt(opts.maxSamplesPerModel ?? 1, 'maxSamplesPerModel');
    positiveInt(opts.maxSampleAgeSec ?? 1, 'maxSampleAgeSec');
    positiveInt((opts.recentInputBytes ?? 0) + 1, 'recentInputBytes');
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

  /**
   * Remembers that `requestId` was answered by `version` of `model`, with its training input when
   * the model trains (copied to float32 here: the caller's buffer may be reused). Called on every
   * inference: no I/O. An input that alone exceeds the budget, exceeds MAX_SAMPLE_VALUES, does not
   * match its shape or holds a value not finite as float32 is not kept; the id still is.
   */
  record(requestId: string, model: string, version: number, input?: SampleInput): void {
    let ring = this.rings.get(model);
    if (ring === undefined) {
      ring = new Ring(this.recentPerModel, this.recentInputBytes);
      this.rings.set(model, ring);
    }
    let held: HeldInput | undefined;
    if (input !== undefined && input.data.length * 4 <= this.recentInputBytes && input.data.length === shapeSize(input.featureShape)) {
      held = { data: new Float32Array(input.data), featureShape: input.featureShape.slice() };
      if (firstNonFinite(held.data) >= 0) held = undefined; // float64 beyond float32's range; validation let the rest through
    }
    ring.push(requestId, version, this.clock(), held);
  }

  /**
   * Stores a label for a recent request. False when the id is not (or no longer) remembered.
   * The label is any JSON value of at most 4 KiB serialised; anything else is EF_BAD_PAYLOAD. When
   * the request's input is still held and the label fits a loss, the pair is stored as a sample.
   */
  label(model: string, requestId: string, label: unknown): boolean {
    const ring = this.rings.get(model);
    const slot = ring?.index.get(requestId);
    if (ring === undefined || slot === undefined) return false;
    const text = serialiseLabel(label);
    this.labelTx(model, requestId, ring.versions[slot]!, text, this.clock(), ring.ts[slot]!, ring.inputs[slot]);
    return true;
  }

  /** A sample from the in-process API; returns its seq. See SampleTable.add for what is refused. */
  addSample(model: string, input: Float32Array, featureShape: number[], label: unknown): number {
    return this.samples.add(model, input, featureShape, label);
  }

  /** The newest samples of `model` that fit its row shape and loss; see SampleTable.load. */
  loadSamples(model: string, opts: LoadSamplesOptions): LoadedSamples {
    return this.samples.load(model, opts);
  }

  /** Samples of `model` within the age bound. */
  sampleCount(model: string): number {
    return this.samples.count(model);
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

function positiveInt(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 1) throw new EdgefleetError('EF_CONFIG_INVALID', `feedback: ${what} must be a positive integer`);
}

/**
 * Schema steps, from version i to i + 1 at index i; each in its own transaction with its
 * user_version, so a crash leaves a whole version. v1: labels. v2: samples (sample-store.ts): seq is
 * the stable key of the holdout split (AUTOINCREMENT: never reused, even after every row aged out);
 * request_id is null for samples from the in-process API.
 */
const MIGRATIONS: readonly string[] = [
  `
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
  CREATE INDEX IF NOT EXISTS labels_model_seq ON labels (model, seq);`,
  `
  CREATE TABLE samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    request_id TEXT,
    input BLOB NOT NULL,
    feature_shape TEXT NOT NULL,
    label TEXT NOT NULL,
    ts INTEGER NOT NULL,
    UNIQUE (model, request_id)
  );
  CREATE INDEX samples_model_seq ON samples (model, seq);
  CREATE INDEX samples_model_ts ON samples (model, ts);`,
];

/** The schema is versioned with user_version and migrated one version at a time. */
function openDb(file: string): Database.Database {
  const db = new Database(file);
  try {
    db.pragma('journal_mode = WAL');
    // A label lost with the last second before a power cut is acceptable; an fsync per label on an SD card is not.
    db.pragma('synchronous = NORMAL');
    const version = db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) throw new EdgefleetError('EF_CONFIG_INVALID', `${file} has schema ${version}, newer than this agent knows (${SCHEMA_VERSION})`);
    for (let v = version; v < SCHEMA_VERSION; v++) {
      db.transaction(() => {
        db.exec(MIGRATIONS[v]!);
        db.pragma(`user_version = ${v + 1}`);
      })();
    }
    return db;
  } catch (err) {
    db.close();
    throw err;
  }
}
