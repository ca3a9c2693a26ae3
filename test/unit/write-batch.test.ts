import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openSqliteStore } from '../../fleet-server/store/sqlite.js';
import { WriteBatcher } from '../../fleet-server/store/batch.js';
import type { FleetStore } from '../../fleet-server/store/types.js';

let dir = '';
let store: FleetStore | null = null;
afterEach(() => {
  store?.close();
  rmSync(dir, { recursive: true, force: true });
});

function open(): FleetStore {
  dir = mkdtempSync(join(tmpdir(), 'edgefleet-batch-'));
  store = openSqliteStore(join(dir, 'fleet.db'));
  for (const id of ['a', 'b', 'c']) {
    store.principals.insert({ name: id, kind: 'device', role: null, secretHash: 'x', createdAt: 0 });
    store.devices.insert(id, 0);
  }
  return store;
}

describe('group commit', () => {
  it('commits what was queued in one turn together, each caller getting its own result', async () => {
    const s = open();
    const w = new WriteBatcher(s);
    const r = await Promise.all(['a', 'b', 'c'].map((id, i) => w.run(() => (s.devices.addRejected(id, i + 1), id))));
    expect(r).toEqual(['a', 'b', 'c']);
    expect(['a', 'b', 'c'].map((id) => s.devices.get(id)?.rejected)).toEqual([1, 2, 3]);
  });

  it('a piece that throws changes nothing and fails alone; the others commit', async () => {
    const s = open();
    const w = new WriteBatcher(s);
    const ok1 = w.run(() => s.devices.addRejected('a', 1));
    const bad = w.run(() => {
      s.devices.addRejected('b', 5);
      throw new Error('boom');
    });
    const ok2 = w.run(() => s.devices.addRejected('c', 1));
    await expect(bad).rejects.toThrow('boom');
    await ok1;
    await ok2;
    expect(['a', 'b', 'c'].map((id) => s.devices.get(id)?.rejected)).toEqual([1, 0, 1]);
  });
});
