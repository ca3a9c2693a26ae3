import { existsSync, mkdirSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import type Database from 'better-sqlite3';
import { CLASS_PRIORITY, EdgefleetError, MAX_JSON_DEPTH, RECORD_CLASSES, jsonNestsDeeperThan, type Backlog, type RecordClass, type TelemetryRecord } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';
import { DB_FILE, SEQ_BLOCK, SEQ_FILE, openDb, readSeqFloor } from './db.js';

/** Largest record body, as JSON text; a batch of one must still fit `MAX_PAYLOAD_BYTES.telemetry`. */
export const MAX_RECORD_BYTES = 256 * 1024;

/** Accounted per record beside its body and type: the row's other columns and index entries. */
const RECORD_OVERHEAD_BYTES = 32;

export interface ClassLimits {
  maxBytes: number;
  maxAgeSec: number;
}

export interface OutboxOptions {
  /** Ceiling for all records together, in bytes of record body. */
  maxBytes: number;
  perClass: Record<RecordClass, ClassLimits>;
  /** `NORMAL` survives a process crash; `FULL` also a power cut, at a cost per commit. */
  synchronous: 'NORMAL' | 'FULL';
}

/** A record as stored: its body stays the JSON text it was committed as. */
export interface StoredRecord extends Omit<TelemetryRecord, 'body'> {
  bodyJson: string;
  bytes: number;
}

export interface OpenResult {
  store: OutboxStore;
  /** Set when the previous database failed its integrity check and was moved aside. */
  movedAside: string | null;
}

interface Row {
  seq: number;
  cls: RecordClass;
  ts: number;
  type: string;
  body: string;
  bytes: number;
}


/**
 * The agent's durable outbox: SQLite (WAL) in the state directory. A record is committed before
 * anything is sent, and deleted only when the fleet acknowledges it. Bounded by bytes overall and
 * by bytes and age per class; when over, the oldest records of the lowest priority go first, and
 * every drop is counted (the counts travel with every batch).
 *
 * Writes are grouped: `enqueue` stages a record and returns a promise that resolves with its
 * sequence number once the transaction holding it has committed (at the next turn of the event
 * loop, with everything else staged meanwhile), so a burst costs one commit, not one per record.
 */
export class OutboxStore {
  private readonly db: Database.Database;
  private readonly dir: string;
  private nextSeq: number;
  private seqCeiling: number;
  private readonly classBytes = new Map<RecordClass, number>();
  /** Records held, kept in step with every insert and delete (COUNT(*) would scan the table per batch). */
  private records = 0;
  private readonly dropped = new Map<RecordClass, number>();
  private staged: { cls: RecordClass; type: string; body: string; ts: number }[] = [];
  /** The commit everything staged waits for: one promise per transaction, not one per record. */
  private pending: { promise: Promise<number[]>; resolve: (seqs: number[]) => void; reject: (e: Error) => void } | null = null;
  private readonly listeners = new Set<() => void>();
  private readonly q: ReturnType<OutboxStore['prepare']>;
  private readonly checkpointTimer: NodeJS.Timeout;
  private dirty = false;

  private constructor(
    dir: string,
    db: Database.Database,
    private readonly opts: OutboxOptions,
    private readonly now: () => number,
  ) {
    this.dir = dir;
    this.db = db;
    this.q = this.prepare();
    this.reloadCounters();
    // Checkpoints copy the WAL into the database and fsync it: done on a timer, not inside whichever
    // commit happens to cross the WAL threshold, so no enqueue pays for one.
    this.checkpointTimer = setInterval(() => this.checkpoint(), 1000);
    this.checkpointTimer.unref();
    const maxInDb = this.db.prepare<[], { m: number | null }>('SELECT MAX(seq) AS m FROM records').get()?.m ?? 0;
    const metaNext = this.meta('next_seq');
    const fileFloor = readSeqFloor(dir);
    // A database that has handed out numbers knows the next one; a fresh one (first start, or one
    // that replaced a corrupt database) starts above every block ever reserved.
    this.nextSeq = metaNext > 0 ? Math.max(maxInDb + 1, metaNext) : Math.max(maxInDb + 1, fileFloor, 1);
    this.seqCeiling = fileFloor;
  }

  /**
   * Opens (or creates) the outbox in `dir`. A database that fails `PRAGMA quick_check` is moved
   * aside, never deleted, and a fresh one is started; the caller reports that as an event.
   */
  static open(dir: string, opts: OutboxOptions, now: () => number = Date.now): OpenResult {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = join(dir, DB_FILE);
    let movedAside: string | null = null;
    let db: Database.Database | null = null;
    try {
      db = openDb(file, opts.synchronous);
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw new Error(`integrity check: ${String(check)}`);
    } catch {
      db?.close();
      movedAside = `${file}.corrupt-${now()}`;
      for (const suffix of ['', '-wal', '-shm']) {
        if (existsSync(file + suffix)) renameSync(file + suffix, movedAside + suffix);
      }
      db = openDb(file, opts.synchronous);
    }
    return { store: new OutboxStore(dir, db, opts, now), movedAside };
  }

  private prepare() {
    return {
      insert: this.db.prepare('INSERT INTO records (seq, cls, prio, ts, type, body, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)'),
      setMeta: this.db.prepare('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value'),
      oldestOfClass: this.db.prepare<[string, number], Row>('SELECT seq, cls, bytes FROM records WHERE cls = ? ORDER BY seq LIMIT ?'),
      oldestLowest: this.db.prepare<[number], Row>('SELECT seq, cls, bytes FROM records ORDER BY prio, seq LIMIT ?'),
      expired: this.db.prepare<[string, number], Row>('SELECT seq, cls, bytes FROM records WHERE cls = ? AND ts < ?'),
      del: this.db.prepare('DELETE FROM records WHERE seq = ?'),
      rangeRows: this.db.prepare<[number, number], Row>('SELECT seq, cls, bytes FROM records WHERE seq BETWEEN ? AND ?'),
      oldestFirst: this.db.prepare<[number, number], Row>('SELECT * FROM records WHERE seq > ? ORDER BY seq LIMIT ?'),
      newestFirst: this.db.prepare<[number], Row>('SELECT * FROM records ORDER BY seq DESC LIMIT ?'),
      count: this.db.prepare<[], { n: number }>('SELECT COUNT(*) AS n FROM records'),
      oldestTs: this.db.prepare<[number], { seq: number; ts: number }>('SELECT seq, ts FROM records ORDER BY seq LIMIT ?'),
    };
  }

  private meta(key: string): number {
    return this.db.prepare<[string], { value: number }>('SELECT value FROM meta WHERE key = ?').get(key)?.value ?? 0;
  }

  /** Called after every commit that added records. */
  onCommit(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Stages a record; resolves with its sequence number once committed. */
  enqueue(cls: RecordClass, type: string, body: unknown): Promise<number> {
    const json = JSON.stringify(body ?? null);
    // A record that could never fit a batch would be resent forever; refuse it at the door.
    if (json.length > MAX_RECORD_BYTES) {
      return Promise.reject(new EdgefleetError('EF_PAYLOAD_TOO_LARGE', `${type}: ${json.length} bytes, limit ${MAX_RECORD_BYTES}`));
    }
    // The fleet refuses batches nested deeper than this; such a record would never be acknowledged.
    if (jsonNestsDeeperThan(json, MAX_JSON_DEPTH - 4)) {
      return Promise.reject(new EdgefleetError('EF_BAD_PAYLOAD', `${type}: nested deeper than ${MAX_JSON_DEPTH - 4} levels`));
    }
    if (!this.pending) {
      let resolve!: (seqs: number[]) => void;
      let reject!: (e: Error) => void;
      const promise = new Promise<number[]>((res, rej) => ((resolve = res), (reject = rej)));
      this.pending = { promise, resolve, reject };
      setImmediate(() => this.flush());
    }
    const index = this.staged.push({ cls, type, body: json, ts: this.now() }) - 1;
    return this.pending.promise.then((seqs) => seqs[index] as number);
  }

  /** Commits everything staged, now. */
  flush(): void {
    const batch = this.staged;
    const pending = this.pending;
    this.pending = null;
    if (!pending) return;
    this.staged = [];
    let seqs: number[];
    try {
      seqs = this.write(() => {
        const out = new Array<number>(batch.length);
        const added: Partial<Record<RecordClass, number>> = {};
        for (let i = 0; i < batch.length; i++) {
          const r = batch[i] as (typeof batch)[number];
          const seq = this.takeSeq();
          // Bounds are budgets, not exact disk usage: UTF-16 length stands in for UTF-8 bytes.
          const bytes = r.body.length + r.type.length + RECORD_OVERHEAD_BYTES;
          this.q.insert.run(seq, r.cls, CLASS_PRIORITY[r.cls], r.ts, r.type, r.body, bytes);
          added[r.cls] = (added[r.cls] ?? 0) + bytes;
          out[i] = seq;
        }
        this.records += batch.length;
        for (const [cls, n] of Object.entries(added) as [RecordClass, number][]) this.classBytes.set(cls, (this.classBytes.get(cls) ?? 0) + n);
        this.q.setMeta.run('next_seq', this.nextSeq);
        this.enforceBounds();
        return out;
      });
    } catch (e) {
      pending.reject(e as Error);
      return;
    }
    this.dirty = true;
    pending.resolve(seqs);
    for (const fn of this.listeners) fn();
  }

  private takeSeq(): number {
    if (this.nextSeq >= this.seqCeiling) {
      // Reserve the next block before handing out any number from it.
      this.seqCeiling = this.nextSeq + SEQ_BLOCK;
      writeFileAtomic(join(this.dir, SEQ_FILE), `${this.seqCeiling}\n`);
    }
    return this.nextSeq++;
  }

  /** Deletes one record and keeps the in-memory accounting in step. Inside a transaction only. */
  private remove(r: Pick<Row, 'seq' | 'cls' | 'bytes'>): void {
    this.q.del.run(r.seq);
    this.records--;
    this.classBytes.set(r.cls, (this.classBytes.get(r.cls) ?? 0) - r.bytes);
  }

  private drop(rows: readonly Row[]): void {
    for (const r of rows) {
      this.remove(r);
      this.dropped.set(r.cls, (this.dropped.get(r.cls) ?? 0) + 1);
    }
    const classes = new Set(rows.map((r) => r.cls));
    for (const c of classes) this.q.setMeta.run(`dropped.${c}`, this.dropped.get(c) ?? 0);
  }

  /** Per class first, then overall: the oldest records of the lowest priority go first. */
  private enforceBounds(): void {
    for (const cls of RECORD_CLASSES) {
      const max = this.opts.perClass[cls].maxBytes;
      while ((this.classBytes.get(cls) ?? 0) > max) {
        const rows = this.q.oldestOfClass.all(cls, 256);
        if (rows.length === 0) break;
        this.drop(takeUntil(rows, (this.classBytes.get(cls) ?? 0) - max));
      }
    }
    while (this.totalBytes() > this.opts.maxBytes) {
      const rows = this.q.oldestLowest.all(256);
      if (rows.length === 0) break;
      this.drop(takeUntil(rows, this.totalBytes() - this.opts.maxBytes));
    }
  }

  /** Drops records older than their class allows. Returns how many went. */
  expire(): number {
    let n = 0;
    this.write(() => {
      for (const cls of RECORD_CLASSES) {
        const rows = this.q.expired.all(cls, this.now() - this.opts.perClass[cls].maxAgeSec * 1000);
        this.drop(rows);
        n += rows.length;
      }
    });
    return n;
  }

  totalBytes(): number {
    let t = 0;
    for (const b of this.classBytes.values()) t += b;
    return t;
  }

  /** Records after `afterSeq` in sequence order, skipping `exclude`, within the limits. */
  oldest(afterSeq: number, exclude: ReadonlySet<number>, maxRecords: number, maxBytes: number): StoredRecord[] {
    const out: StoredRecord[] = [];
    let bytes = 0;
    let cursor = afterSeq;
    while (out.length < maxRecords) {
      const rows = this.q.oldestFirst.all(cursor, maxRecords * 2);
      if (rows.length === 0) break;
      for (const r of rows) {
        cursor = r.seq;
        if (exclude.has(r.seq)) continue;
        if (out.length >= maxRecords || (out.length > 0 && bytes + r.bytes > maxBytes)) return out;
        out.push(toRecord(r));
        bytes += r.bytes;
      }
    }
    return out;
  }

  /** The newest records not in `exclude`, returned in sequence order. */
  newest(exclude: ReadonlySet<number>, maxRecords: number, maxBytes: number): StoredRecord[] {
    const out: StoredRecord[] = [];
    let bytes = 0;
    for (const r of this.q.newestFirst.all(maxRecords + exclude.size)) {
      if (exclude.has(r.seq)) continue;
      if (out.length >= maxRecords || (out.length > 0 && bytes + r.bytes > maxBytes)) break;
      out.push(toRecord(r));
      bytes += r.bytes;
    }
    return out.reverse();
  }

  /** Deletes acknowledged records (only those in `allowed`, the batch they were sent in). Returns how many. */
  acknowledge(ranges: readonly (readonly [number, number])[], allowed: ReadonlySet<number>): number {
    let n = 0;
    this.write(() => {
      for (const [lo, hi] of ranges) {
        for (const r of this.q.rangeRows.all(lo, hi)) {
          if (!allowed.has(r.seq)) continue;
          this.remove(r);
          n++;
        }
      }
    });
    return n;
  }

  /**
   * What the outbox holds, leaving out `sending` (the batch this account travels with, which the
   * fleet has once it reads the account).
   */
  backlog(sending: readonly StoredRecord[] = []): Backlog {
    const skip = new Set(sending.map((r) => r.seq));
    const n = this.records - sending.length;
    const held = this.totalBytes() - sending.reduce((sum, r) => sum + r.bytes, 0);
    // Records are created in sequence order, so the lowest sequence number not being sent is the oldest.
    const oldest = n <= 0 ? null : (this.q.oldestTs.all(skip.size + 1).find((r) => !skip.has(r.seq))?.ts ?? null);
    const dropped: Partial<Record<RecordClass, number>> = {};
    for (const [c, v] of this.dropped) if (v > 0) dropped[c] = v;
    return {
      records: Math.max(0, n),
      bytes: Math.max(0, held),
      oldestAgeSec: oldest === null ? null : Math.max(0, (this.now() - oldest) / 1000),
      dropped,
    };
  }

  droppedCounts(): Record<RecordClass, number> {
    return Object.fromEntries(this.dropped) as Record<RecordClass, number>;
  }

  /** Size of the database files on disk, in bytes. */
  fileBytes(): number {
    const page = this.db.pragma('page_size', { simple: true }) as number;
    const pages = this.db.pragma('page_count', { simple: true }) as number;
    return page * pages;
  }

  private checkpoint(): void {
    if (!this.dirty) return;
    this.dirty = false;
    try {
      this.db.pragma('wal_checkpoint(PASSIVE)');
    } catch {
      // A busy database checkpoints next time.
    }
  }

  close(): void {
    clearInterval(this.checkpointTimer);
    this.flush();
    this.db.close();
  }

  /**
   * Runs `fn` in a transaction. The in-memory accounting is updated as rows change; if the
   * transaction rolls back, it is read again from the database, which is the truth.
   */
  private write<T>(fn: () => T): T {
    try {
      return this.db.transaction(fn)();
    } catch (e) {
      this.reloadCounters();
      throw e;
    }
  }

  /** Records, bytes per class and drops per class, as the database holds them. */
  private reloadCounters(): void {
    this.records = this.q.count.get()?.n ?? 0;
    for (const c of RECORD_CLASSES) {
      this.classBytes.set(c, 0);
      this.dropped.set(c, 0);
    }
    for (const r of this.db.prepare<[], { cls: RecordClass; bytes: number }>('SELECT cls, SUM(bytes) AS bytes FROM records GROUP BY cls').all()) {
      this.classBytes.set(r.cls, r.bytes);
    }
    for (const r of this.db.prepare<[], { key: string; value: number }>("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'").all()) {
      this.dropped.set(r.key.slice('dropped.'.length) as RecordClass, r.value);
    }
  }
}

/** The shortest prefix of `rows` whose bytes add up to at least `need`. */
function takeUntil(rows: Row[], need: number): Row[] {
  let sum = 0;
  const out: Row[] = [];
  for (const r of rows) {
    if (sum >= need) break;
    out.push(r);
    sum += r.bytes;
  }
  return out;
}

function toRecord(r: Row): StoredRecord {
  return { seq: r.seq, cls: r.cls, ts: r.ts, type: r.type, bodyJson: r.body, bytes: r.bytes };
}
