/** The fleet's telemetry store on a real SQLite file: dedup on (device, seq), stats, retention. */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { TelemetryRecord } from '../../proto/index.js';
import { openSqliteStore } from '../../fleet-server/store/sqlite.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

afterAll(cleanup);

const backlog = { records: 3, bytes: 300, oldestAgeSec: 12, dropped: { sample: 4 } };
const rec = (seq: number): TelemetryRecord => ({ seq, cls: 'metric', ts: seq, type: 'm', body: { seq } });

describe('fleet telemetry store', () => {
  it('stores each (device, seq) once, counts duplicates, and keeps per-device stats', () => {
    const store = openSqliteStore(join(tempDir(), 'fleet.db'));
    for (const id of ['a', 'b']) {
      store.principals.insert({ name: id, kind: 'device', role: null, secretHash: 'x', createdAt: 0 });
      store.devices.insert(id, 0);
    }
    expect(store.telemetry.ingest('a', [rec(1), rec(2), rec(3)], backlog, 100)).toEqual({ inserted: 3, duplicates: 0 });
    expect(store.telemetry.ingest('a', [rec(2), rec(3), rec(4)], backlog, 200)).toEqual({ inserted: 1, duplicates: 2 });
    // The same sequence number from another device is another record.
    expect(store.telemetry.ingest('b', [rec(1)], backlog, 200)).toEqual({ inserted: 1, duplicates: 0 });
    expect(store.telemetry.stats('a')).toEqual({ lastSeq: 4, received: 4, duplicates: 2, backlog, reportedAt: 200 });
    expect(store.telemetry.list('a', { limit: 10 }).map((r) => r.seq)).toEqual([4, 3, 2, 1]);
    expect(store.telemetry.list('a', { limit: 2, beforeSeq: 4 }).map((r) => r.seq)).toEqual([3, 2]);
    store.close();
  });

  it('drops what is past retention by age and by count per device', () => {
    const store = openSqliteStore(join(tempDir(), 'fleet.db'));
    for (const id of ['a', 'b']) {
      store.principals.insert({ name: id, kind: 'device', role: null, secretHash: 'x', createdAt: 0 });
      store.devices.insert(id, 0);
    }
    store.telemetry.ingest('a', [rec(1), rec(2)], backlog, 1_000);
    store.telemetry.ingest('a', [rec(3), rec(4), rec(5), rec(6)], backlog, 5_000);
    store.telemetry.ingest('b', [rec(1), rec(2)], backlog, 5_000);
    // Older than t=2000 goes (a:1, a:2); then each device keeps its newest 3.
    expect(store.telemetry.prune(2_000, 3)).toBe(3);
    expect(store.telemetry.list('a', { limit: 10 }).map((r) => r.seq)).toEqual([6, 5, 4]);
    expect(store.telemetry.list('b', { limit: 10 }).map((r) => r.seq)).toEqual([2, 1]);
    store.close();
  });
});
