/** The registry on a real SQLite file and a real artifact directory: immutable, monotonic, audited, signed. */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { MODEL_STATUSES, STATUS_TRANSITIONS, manifestSha256, verifySignedManifest, type ModelDraftInput, type ModelStatus } from '../../proto/index.js';
import { ArtifactStore } from '../../fleet-server/registry/blobs.js';
import { FLEET_PUBLIC_KEY_FILE, FleetKeyring } from '../../fleet-server/registry/keys.js';
import { Registry } from '../../fleet-server/registry/registry.js';
import { openSqliteStore } from '../../fleet-server/store/sqlite.js';
import type { FleetStore } from '../../fleet-server/store/types.js';
import { cleanup, onCleanup, tempDir } from '../helpers/fleet.js';
import { codeOf } from '../helpers/errors.js';

afterAll(cleanup);

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface World {
  dir: string;
  store: FleetStore;
  blobs: ArtifactStore;
  registry: Registry;
  clock: { now: number };
  upload(bytes: Buffer): Promise<{ sha256: string; size: number }>;
}

function world(): World {
  const dir = tempDir();
  const store = openSqliteStore(join(dir, 'fleet.db'));
  onCleanup(() => store.close());
  const clock = { now: 1_700_000_000_000 };
  const blobs = new ArtifactStore(join(dir, 'artifacts'));
  const registry = new Registry(store, blobs, new FleetKeyring({ dataDir: dir }, () => clock.now), () => clock.now);
  return {
    dir,
    store,
    blobs,
    registry,
    clock,
    upload: async (bytes) => {
      const r = await blobs.ingest(Readable.from([bytes]), sha(bytes), 1 << 20);
      return { sha256: r.sha256, size: r.size };
    },
  };
}

function draft(file: { sha256: string; size: number }, extra: Partial<ModelDraftInput> = {}): ModelDraftInput {
  return {
    schema: 1,
    name: 'iris',
    runtime: 'onnx',
    entry: 'model.onnx',
    files: [{ path: 'model.onnx', ...file }],
    inputs: [{ name: 'x', dtype: 'float32', shape: [-1, 4] }],
    outputs: [{ name: 'y', dtype: 'float32', shape: [-1, 3] }],
    ...extra,
  };
}

describe('registry', () => {
  it('refuses to publish a version whose files were not uploaded, naming the file', async () => {
    const w = world();
    const missing = { sha256: sha(Buffer.from('never uploaded')), size: 14 };
    await expect(w.registry.publish(draft(missing), 'op')).rejects.toMatchObject({ code: 'EF_ARTIFACT_MISSING', details: { path: 'model.onnx' } });
    await expect(w.registry.publish(draft(missing), 'op')).rejects.toThrow(/model\.onnx/);
    const stored = await w.upload(Buffer.from('onnx bytes'));
    await expect(w.registry.publish(draft({ ...stored, size: stored.size + 1 }), 'op')).rejects.toMatchObject({ code: 'EF_ARTIFACT_MISMATCH' });
    expect(w.registry.list()).toEqual([]);
  });

  it('signs what it stores with the fleet key, and serves the canonical bytes its sha256 names', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    const r = await w.registry.publish(draft(file), 'op');
    expect(r).toMatchObject({ name: 'iris', version: 1, status: 'candidate' });
    const row = w.registry.get('iris', 1);
    const signed = w.registry.signed(row);
    expect(manifestSha256(signed)).toBe(r.manifestSha256);
    expect(createHash('sha256').update(row.manifestJson).digest('hex')).toBe(r.manifestSha256);
    expect(signed.manifest.createdAt).toBe(w.clock.now);
    expect(signed.manifest.golden.tolerance).toEqual({ abs: 1e-4, rel: 1e-3 });
    const trusted = readFileSync(join(w.dir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim();
    expect(() => verifySignedManifest(signed, [trusted])).not.toThrow();
  });

  it('numbers versions monotonically per name and never reuses a number', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    expect((await w.registry.publish(draft(file), 'op')).version).toBe(1);
    expect((await w.registry.publish(draft(file), 'op')).version).toBe(2);
    expect((await w.registry.publish(draft(file, { version: 7 }), 'op')).version).toBe(7);
    await expect(w.registry.publish(draft(file, { version: 7 }), 'op')).rejects.toMatchObject({ code: 'EF_MODEL_EXISTS' });
    await expect(w.registry.publish(draft(file, { version: 3 }), 'op')).rejects.toMatchObject({ code: 'EF_MODEL_EXISTS' });
    expect((await w.registry.publish(draft(file), 'op')).version).toBe(8);
    expect((await w.registry.publish(draft(file, { name: 'other' }), 'op')).version).toBe(1);
    expect(w.registry.list('iris').map((v) => v.version)).toEqual([8, 7, 2, 1]);
    expect(w.registry.get('iris').version).toBe(8);
  });

  it('keeps versions immutable even against a writer that bypasses it', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    await w.registry.publish(draft(file), 'op');
    const db = new Database(join(w.dir, 'fleet.db'));
    onCleanup(() => db.close());
    expect(() => db.prepare("UPDATE model_versions SET manifest_json = '{}' WHERE name = 'iris'").run()).toThrow(/immutable/);
    expect(() => db.prepare("DELETE FROM model_versions WHERE name = 'iris'").run()).toThrow(/never deleted/);
    expect(() => db.prepare("UPDATE model_files SET sha256 = 'x'").run()).toThrow(/immutable/);
    expect(db.prepare("UPDATE model_versions SET status = 'approved' WHERE name = 'iris'").run().changes).toBe(1);
  });

  it('refuses a parent that is not an earlier version, and manifests that are already expired', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    await expect(w.registry.publish(draft(file, { lineage: { parent: 1 } }), 'op')).rejects.toMatchObject({ code: 'EF_UNKNOWN_MODEL' });
    await w.registry.publish(draft(file), 'op');
    expect((await w.registry.publish(draft(file, { lineage: { parent: 1, method: 'fine-tune' } }), 'op')).version).toBe(2);
    await expect(w.registry.publish(draft(file, { expiresAt: w.clock.now }), 'op')).rejects.toMatchObject({ code: 'EF_MODEL_EXPIRED' });
    await expect(w.registry.publish(draft(file, { entry: 'nope.onnx' }), 'op')).rejects.toMatchObject({ code: 'EF_MODEL_INVALID' });
  });

  it('reads a draft uploaded as an artifact (for manifests too large for an operator request)', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    const d = await w.upload(Buffer.from(JSON.stringify(draft(file, { name: 'big' }))));
    expect(await w.registry.publish({ draftSha256: d.sha256 }, 'op')).toMatchObject({ name: 'big', version: 1 });
    const junk = await w.upload(Buffer.from('{"schema":2}'));
    await expect(w.registry.publish({ draftSha256: junk.sha256 }, 'op')).rejects.toMatchObject({ code: 'EF_MODEL_INVALID' });
  });

  describe('status transitions', () => {
    // Every (from, to) pair: allowed exactly when STATUS_TRANSITIONS lists it.
    const pairs = MODEL_STATUSES.flatMap((from) => MODEL_STATUSES.map((to) => [from, to] as const));
    const pathTo: Record<ModelStatus, ModelStatus[]> = {
      candidate: [],
      approved: ['approved'],
      production: ['approved', 'production'],
      quarantined: ['quarantined'],
      deprecated: ['deprecated'],
    };
    it.each(pairs)('%s → %s', async (from, to) => {
      const w = world();
      const file = await w.upload(Buffer.from('model'));
      await w.registry.publish(draft(file), 'op');
      for (const s of pathTo[from]) w.registry.setStatus('iris', 1, s, 'op');
      const allowed = STATUS_TRANSITIONS[from].includes(to);
      if (allowed) expect(w.registry.setStatus('iris', 1, to, 'op', 'because')).toEqual({ previous: from, status: to });
      else expect(codeOf(() => w.registry.setStatus('iris', 1, to, 'op'))).toBe('EF_STATUS_TRANSITION');
      expect(w.registry.get('iris', 1).status).toBe(allowed ? to : from);
    });

    it('audits publication and every move, with who, from, to and why', async () => {
      const w = world();
      const file = await w.upload(Buffer.from('model'));
      await w.registry.publish(draft(file), 'alice');
      w.clock.now += 1000;
      w.registry.setStatus('iris', 1, 'approved', 'bob', 'eval ok');
      w.registry.setStatus('iris', 1, 'production', 'bob');
      expect(() => w.registry.setStatus('iris', 1, 'candidate', 'bob')).toThrow();
      const trail = w.store.audit.list({ limit: 10, target: 'iris@1' }).reverse();
      expect(trail.map((e) => [e.actor, e.action, e.detail])).toEqual([
        ['alice', 'model.published', expect.objectContaining({ status: 'candidate' })],
        ['bob', 'model.status', { from: 'candidate', to: 'approved', reason: 'eval ok' }],
        ['bob', 'model.status', { from: 'approved', to: 'production' }],
      ]);
      expect(w.registry.get('iris', 1).statusAt).toBe(w.clock.now);
    });

    it('lets several versions be production at once', async () => {
      const w = world();
      const file = await w.upload(Buffer.from('model'));
      for (const v of [1, 2]) {
        await w.registry.publish(draft(file), 'op');
        w.registry.setStatus('iris', v, 'approved', 'op');
        w.registry.setStatus('iris', v, 'production', 'op');
      }
      expect(w.registry.list('iris').map((v) => v.status)).toEqual(['production', 'production']);
    });
  });

  it('assigns only versions that are not quarantined, deprecated or expired', async () => {
    const w = world();
    const file = await w.upload(Buffer.from('model'));
    await w.registry.publish(draft(file, { expiresAt: w.clock.now + 60_000 }), 'op');
    await w.registry.publish(draft(file), 'op');
    await w.registry.publish(draft(file), 'op');
    expect(w.registry.assignable('iris', 1).version).toBe(1);
    w.registry.setStatus('iris', 2, 'quarantined', 'op');
    w.registry.setStatus('iris', 3, 'deprecated', 'op');
    expect(codeOf(() => w.registry.assignable('iris', 2))).toBe('EF_ARTIFACT_REFUSED');
    expect(codeOf(() => w.registry.assignable('iris', 3))).toBe('EF_MODEL_INVALID');
    expect(codeOf(() => w.registry.assignable('iris', 9))).toBe('EF_UNKNOWN_MODEL');
    w.clock.now += 60_000;
    expect(codeOf(() => w.registry.assignable('iris', 1))).toBe('EF_MODEL_EXPIRED');
  });

  it('serves an artifact while any version naming it is not quarantined', async () => {
    const w = world();
    const shared = await w.upload(Buffer.from('shared'));
    const own = await w.upload(Buffer.from('own'));
    const loose = await w.upload(Buffer.from('uploaded, never published'));
    await w.registry.publish(draft(shared), 'op');
    await w.registry.publish(
      draft(own, { files: [{ path: 'model.onnx', ...own }, { path: 'extra.bin', ...shared }] }),
      'op',
    );
    expect(w.registry.servability(loose.sha256)).toBe('unknown');
    w.registry.setStatus('iris', 2, 'quarantined', 'op');
    expect(w.registry.servability(own.sha256)).toBe('quarantined');
    expect(w.registry.servability(shared.sha256)).toBe('servable');
    w.registry.setStatus('iris', 1, 'deprecated', 'op');
    expect(w.registry.servability(shared.sha256)).toBe('servable');
  });
});

describe('artifact store', () => {
  it('stores content-addressed under ab/abcdef…, and a second upload of the same bytes writes nothing', async () => {
    const w = world();
    const bytes = Buffer.from('hello');
    const first = await w.blobs.ingest(Readable.from([bytes]), sha(bytes), 100);
    expect(first).toEqual({ sha256: sha(bytes), size: 5, stored: true });
    expect(readFileSync(join(w.dir, 'artifacts', sha(bytes).slice(0, 2), sha(bytes)), 'utf8')).toBe('hello');
    expect(await w.blobs.ingest(Readable.from([bytes]), sha(bytes), 100)).toEqual({ ...first, stored: false });
  });

  it('refuses bytes that do not hash to the name, or exceed the cap, and leaves nothing behind', async () => {
    const w = world();
    const claimed = sha(Buffer.from('what was promised'));
    await expect(w.blobs.ingest(Readable.from([Buffer.from('something else')]), claimed, 100)).rejects.toMatchObject({ code: 'EF_ARTIFACT_MISMATCH' });
    const big = Buffer.alloc(101, 1);
    await expect(w.blobs.ingest(Readable.from([big.subarray(0, 60), big.subarray(60)]), sha(big), 100)).rejects.toMatchObject({ code: 'EF_ARTIFACT_TOO_LARGE' });
    expect(readdirSync(join(w.dir, 'artifacts'))).toEqual(['tmp']);
    expect(readdirSync(join(w.dir, 'artifacts', 'tmp'))).toEqual([]);
  });

  it('clears uploads a crash cut off', () => {
    const dir = tempDir();
    new ArtifactStore(dir);
    writeFileSync(join(dir, 'tmp', 'partial'), 'x');
    new ArtifactStore(dir);
    expect(readdirSync(join(dir, 'tmp'))).toEqual([]);
  });
});
