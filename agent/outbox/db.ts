import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';

export const DB_FILE = 'outbox.db';
/** Sequence numbers are reserved in blocks in a file beside the database, so a fresh database never reuses one. */
export const SEQ_FILE = 'outbox.seq';
export const SEQ_BLOCK = 10_000;

/** Opens (creating if needed) the outbox database with its schema. */
export function openDb(file: string, synchronous: 'NORMAL' | 'FULL'): Database.Database {
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma(`synchronous = ${synchronous}`);
  db.pragma('wal_autocheckpoint = 0');
  // Deleted pages go back to the file system a little at a time, so the file shrinks as the backlog drains.
  if ((db.pragma('auto_vacuum', { simple: true }) as number) !== 2) {
    db.pragma('auto_vacuum = INCREMENTAL');
    db.exec('VACUUM');
  }
  db.exec(`
    CREATE TABLE IF NOT EXISTS records (
      seq INTEGER PRIMARY KEY,
      cls TEXT NOT NULL,
      prio INTEGER NOT NULL,
      ts INTEGER NOT NULL,
      type TEXT NOT NULL,
      body TEXT NOT NULL,
      bytes INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS records_prio ON records (prio, seq);
    CREATE INDEX IF NOT EXISTS records_cls ON records (cls, seq);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
  `);
  return db;
}

export function readSeqFloor(dir: string): number {
  const file = join(dir, SEQ_FILE);
  if (!existsSync(file)) return 0;
  const n = Number(readFileSync(file, 'utf8').trim());
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}

