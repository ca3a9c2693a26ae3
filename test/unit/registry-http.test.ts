/** The artifact server over real loopback HTTP: Range, ETag, Basic auth, quarantine, uploads. */
import { createHash, randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.js';
import { hashSecret } from '../../fleet-server/auth/credentials.js';
import { ArtifactStore } from '../../fleet-server/registry/blobs.js';
import { ArtifactServer } from '../../fleet-server/registry/http.js';
import { FleetKeyring } from '../../fleet-server/registry/keys.js';
import { Registry } from '../../fleet-server/registry/registry.js';
import { openSqliteStore } from '../../fleet-server/store/sqlite.js';
import type { FleetStore } from '../../fleet-server/store/types.js';
import type { Role } from '../../proto/index.js';
import { cleanup, onCleanup, tempDir, waitFor } from '../helpers/fleet.js';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const basic = (user: string, password: string): string => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;

let dir: string;
let store: FleetStore;
let registry: Registry;
let server: ArtifactServer;
let base: string;
const MAX = 64 * 1024;
const file = randomBytes(1000);
const fileSha = sha(file);
const auth = { device: '', operator: '', viewer: '' };

function addPrincipal(name: string, kind: 'device' | 'operator', role: Role | null): string {
  const password = randomBytes(16).toString('base64url');
  store.principals.insert({ name, kind, role, secretHash: hashSecret(password), createdAt: 1 });
  if (kind === 'device') store.devices.insert(name, 1);
  return basic(name, password);
}

async function get(path: string, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${base}${path}`, { headers: { authorization: auth.device, ...headers } });
}

async function put(path: string, body: Buffer, authorization = auth.operator): Promise<Response> {
  return fetch(`${base}${path}`, { method: 'PUT', body, headers: { authorization } });
}

beforeAll(async () => {
  dir = tempDir();
  store = openSqliteStore(join(dir, 'fleet.db'));
  onCleanup(() => store.close());
  const blobs = new ArtifactStore(join(dir, 'artifacts'));
  registry = new Registry(store, blobs, new FleetKeyring({ dataDir: dir }));
  server = new ArtifactServer({ host: '127.0.0.1', port: 0, maxFileBytes: MAX, authCacheSec: 60 }, { store, registry, blobs, deltas: null, log: silentLogger() });
  await server.start();
  onCleanup(() => server.stop());
  base = `http://127.0.0.1:${server.port}`;
  auth.device = addPrincipal('dev-1', 'device', null);
  auth.operator = addPrincipal('olga', 'operator', 'operator');
  auth.viewer = addPrincipal('vic', 'operator', 'viewer');
  await blobs.ingest(Readable.from([file]), fileSha, MAX);
  await registry.publish(
    {
      schema: 1,
      name: 'iris',
      runtime: 'onnx',
      entry: 'model.onnx',
      files: [{ path: 'model.onnx', sha256: fileSha, size: file.length }],
      inputs: [{ name: 'x', dtype: 'float32', shape: [-1, 4] }],
      outputs: [{ name: 'y', dtype: 'float32', shape: [-1, 3] }],
    },
    'olga',
  );
});
afterAll(cleanup);

describe('artifact server: downloads', () => {
  it('sends the whole file with its ETag, length and Accept-Ranges', async () => {
    const res = await get(`/v1/artifacts/${fileSha}`);
    expect(res.status).toBe(200);
    expect(res.headers.get('etag')).toBe(`"${fileSha}"`);
    expect(res.headers.get('accept-ranges')).toBe('bytes');
    expect(res.headers.get('content-length')).toBe('1000');
    expect(Buffer.from(await res.arrayBuffer()).equals(file)).toBe(true);
  });

  it.each([
    ['first bytes', 'bytes=0-99', 0, 99],
    ['a middle slice', 'bytes=100-199', 100, 199],
    ['open-ended', 'bytes=900-', 900, 999],
    ['a suffix', 'bytes=-10', 990, 999],
    ['a suffix longer than the file', 'bytes=-5000', 0, 999],
    ['an end past the file', 'bytes=990-5000', 990, 999],
  ])('answers %s with 206 and Content-Range', async (_what, range, start, end) => {
    const res = await get(`/v1/artifacts/${fileSha}`, { range });
    expect(res.status).toBe(206);
    expect(res.headers.get('content-range')).toBe(`bytes ${start}-${end}/1000`);
    expect(res.headers.get('content-length')).toBe(String(end - start + 1));
    expect(Buffer.from(await res.arrayBuffer()).equals(file.subarray(start, end + 1))).toBe(true);
  });

  it('answers a range past the end with 416 and the size', async () => {
    for (const range of ['bytes=1000-', 'bytes=5000-6000', 'bytes=-0']) {
      const res = await get(`/v1/artifacts/${fileSha}`, { range });
      expect(res.status, range).toBe(416);
      expect(res.headers.get('content-range')).toBe('bytes */1000');
      await res.arrayBuffer();
    }
  });

  it('ignores a Range it does not serve, and one whose If-Range is stale', async () => {
    const cases: Record<string, string>[] = [{ range: 'bytes=0-1,5-6' }, { range: 'items=0-1' }, { range: 'bytes=9-3' }, { range: 'bytes=0-9', 'if-range': '"other"' }];
    for (const headers of cases) {
      const res = await get(`/v1/artifacts/${fileSha}`, headers);
      expect(res.status, JSON.stringify(headers)).toBe(200);
      expect((await res.arrayBuffer()).byteLength).toBe(1000);
    }
    const res = await get(`/v1/artifacts/${fileSha}`, { range: 'bytes=0-9', 'if-range': `"${fileSha}"` });
    expect(res.status).toBe(206);
    await res.arrayBuffer();
  });

  it('answers If-None-Match with 304 and no body', async () => {
    for (const inm of [`"${fileSha}"`, `W/"${fileSha}"`, `"x", "${fileSha}"`, '*']) {
      const res = await get(`/v1/artifacts/${fileSha}`, { 'if-none-match': inm });
      expect(res.status, inm).toBe(304);
      expect(res.headers.get('etag')).toBe(`"${fileSha}"`);
    }
    const res = await get(`/v1/artifacts/${fileSha}`, { 'if-none-match': '"something-else"' });
    expect(res.status).toBe(200);
    await res.arrayBuffer();
  });

  it('serves HEAD with the headers of GET and no body', async () => {
    const res = await fetch(`${base}/v1/artifacts/${fileSha}`, { method: 'HEAD', headers: { authorization: auth.device, range: 'bytes=0-9' } });
    expect(res.status).toBe(206);
    expect(res.headers.get('content-length')).toBe('10');
    expect((await res.arrayBuffer()).byteLength).toBe(0);
  });

  it('serves the signed manifest as stored, with its sha256 as ETag', async () => {
    const row = registry.get('iris', 1);
    const res = await get('/v1/models/iris/1/manifest');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/json');
    expect(res.headers.get('etag')).toBe(`"${row.manifestSha256}"`);
    expect(await res.text()).toBe(row.manifestJson);
    expect((await get('/v1/models/iris/1/manifest', { 'if-none-match': `"${row.manifestSha256}"` })).status).toBe(304);
    const missing = await get('/v1/models/iris/2/manifest');
    expect(missing.status).toBe(404);
    expect(await missing.json()).toMatchObject({ error: { code: 'EF_UNKNOWN_MODEL' } });
  });

  it('answers what it does not route with 404, and other methods with 405', async () => {
    for (const path of ['/', '/v1/artifacts/ABC', `/v1/artifacts/${fileSha}/x`, '/v1/models/../1/manifest', '/v1/models/iris/0/manifest', '/v2/x']) {
      const res = await get(path);
      expect(res.status, path).toBe(404);
      expect(await res.json()).toMatchObject({ error: { code: 'EF_BAD_PARAMS' } });
    }
    const res = await fetch(`${base}/v1/artifacts/${fileSha}`, { method: 'DELETE', headers: { authorization: auth.operator } });
    expect(res.status).toBe(405);
    expect(res.headers.get('allow')).toBe('GET, HEAD, PUT');
  });
});

describe('artifact server: who may have what', () => {
  it('refuses requests without credentials, with wrong ones, and from the fleet identity', async () => {
    store.principals.insert({ name: 'fleet', kind: 'fleet', role: null, secretHash: hashSecret('fleet-secret'), createdAt: 1 });
    for (const authorization of [undefined, 'Bearer abc', basic('dev-1', 'wrong'), basic('nobody', 'x'), basic('fleet', 'fleet-secret'), 'Basic !!!']) {
      const res = await fetch(`${base}/v1/artifacts/${fileSha}`, { headers: authorization === undefined ? {} : { authorization } });
      expect(res.status, authorization).toBe(401);
      expect(res.headers.get('www-authenticate')).toMatch(/^Basic/);
      expect(await res.json()).toMatchObject({ error: { code: 'EF_FORBIDDEN' } });
    }
  });

  it('stops accepting a removed credential at once, cache or not', async () => {
    const cred = addPrincipal('dev-gone', 'device', null);
    expect((await get(`/v1/artifacts/${fileSha}`, { authorization: cred })).status).toBe(200);
    store.principals.remove('dev-gone');
    expect((await get(`/v1/artifacts/${fileSha}`, { authorization: cred })).status).toBe(401);
  });

  it('refuses devices what no published version names, and what only quarantined versions name; operators may still read', async () => {
    const loose = Buffer.from('uploaded but never published');
    expect((await put(`/v1/artifacts/${sha(loose)}`, loose)).status).toBe(201);
    const refused = await get(`/v1/artifacts/${sha(loose)}`);
    expect(refused.status).toBe(404);
    expect(await refused.json()).toMatchObject({ error: { code: 'EF_ARTIFACT_REFUSED' } });
    expect((await get(`/v1/artifacts/${sha(loose)}`, { authorization: auth.viewer })).status).toBe(200);

    const q = Buffer.from('a model that turns out bad');
    await put(`/v1/artifacts/${sha(q)}`, q);
    await registry.publish(
      {
        schema: 1,
        name: 'bad',
        runtime: 'onnx',
        entry: 'm.onnx',
        files: [{ path: 'm.onnx', sha256: sha(q), size: q.length }],
        inputs: [{ name: 'x', dtype: 'float32', shape: [1] }],
        outputs: [{ name: 'y', dtype: 'float32', shape: [1] }],
      },
      'olga',
    );
    expect((await get(`/v1/artifacts/${sha(q)}`)).status).toBe(200);
    registry.setStatus('bad', 1, 'quarantined', 'olga');
    const gone = await get(`/v1/artifacts/${sha(q)}`);
    expect(gone.status).toBe(410);
    expect(await gone.json()).toMatchObject({ error: { code: 'EF_ARTIFACT_REFUSED' } });
    expect((await get('/v1/models/bad/1/manifest')).status).toBe(410);
    expect((await get('/v1/models/bad/1/manifest', { authorization: auth.operator })).status).toBe(200);
  });

  it('lets only operators of role operator or above upload', async () => {
    const b = Buffer.from('upload me');
    for (const [who, authorization] of [['device', auth.device], ['viewer', auth.viewer]] as const) {
      const res = await put(`/v1/artifacts/${sha(b)}`, b, authorization);
      expect(res.status, who).toBe(403);
    }
    expect((await put(`/v1/artifacts/${sha(b)}`, b)).status).toBe(201);
    const again = await put(`/v1/artifacts/${sha(b)}`, b);
    expect(again.status).toBe(200);
    expect(await again.json()).toEqual({ sha256: sha(b), size: b.length, stored: false });
  });
});

describe('artifact server: uploads', () => {
  const leftovers = (): string[] => readdirSync(join(dir, 'artifacts', 'tmp'));

  it('refuses bytes that do not hash to the name and keeps none of them', async () => {
    const claimed = sha(Buffer.from('promised'));
    const res = await put(`/v1/artifacts/${claimed}`, Buffer.from('delivered'));
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ error: { code: 'EF_ARTIFACT_MISMATCH' } });
    expect((await get(`/v1/artifacts/${claimed}`, { authorization: auth.operator })).status).toBe(404);
    expect(leftovers()).toEqual([]);
  });

  it('refuses a declared length over the cap before reading it', async () => {
    const big = Buffer.alloc(MAX + 1, 7);
    const res = await put(`/v1/artifacts/${sha(big)}`, big);
    expect(res.status).toBe(413);
    expect(await res.json()).toMatchObject({ error: { code: 'EF_ARTIFACT_TOO_LARGE' } });
  });

  it('stops a chunked upload once it passes the cap, and keeps none of it', async () => {
    const chunk = Buffer.alloc(16 * 1024, 3);
    const status = await new Promise<number>((resolve, reject) => {
      const req = request(`${base}/v1/artifacts/${'0'.repeat(64)}`, { method: 'PUT', headers: { authorization: auth.operator } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', reject);
      let sent = 0;
      const pump = (): void => {
        while (sent < 10 * MAX) {
          sent += chunk.length;
          if (!req.write(chunk)) return void req.once('drain', pump);
        }
        req.end();
      };
      pump();
    });
    expect(status).toBe(413);
    await new Promise((r) => setTimeout(r, 50));
    expect(leftovers()).toEqual([]);
    expect(readdirSync(join(dir, 'artifacts')).filter((d) => d === '00')).toEqual([]);
  });

  it('drops an upload the client abandons halfway', async () => {
    const req = request(`${base}/v1/artifacts/${'1'.repeat(64)}`, { method: 'PUT', headers: { authorization: auth.operator, 'content-length': '50000' } });
    req.on('error', () => undefined);
    req.write(Buffer.alloc(20_000, 1));
    await waitFor('the upload to reach the server', () => leftovers().length === 1, 5000);
    req.destroy();
    await waitFor('the partial upload to go', () => leftovers().length === 0, 5000);
  });

  it('stores what it accepts whole: a download returns the same bytes', async () => {
    const b = randomBytes(MAX);
    expect((await put(`/v1/artifacts/${sha(b)}`, b)).status).toBe(201);
    const res = await get(`/v1/artifacts/${sha(b)}`, { authorization: auth.operator });
    expect(sha(Buffer.from(await res.arrayBuffer()))).toBe(sha(b));
  });
});

describe('artifact server: any Range header', () => {
  it('answers with bytes of the file only, exactly the ones Content-Range names', async () => {
    const ranges = fc.oneof(
      fc.string({ maxLength: 40 }),
      fc.tuple(fc.option(fc.nat(1200)), fc.option(fc.nat(1200))).map(([a, b]) => `bytes=${a ?? ''}-${b ?? ''}`),
      fc.tuple(fc.nat(1200), fc.nat(1200), fc.nat(1200)).map(([a, b, c]) => `bytes=${a}-${b}, ${c}-`),
    );
    await fc.assert(
      fc.asyncProperty(ranges, async (range) => {
        let res: Response;
        try {
          res = await get(`/v1/artifacts/${fileSha}`, { range });
        } catch {
          return; // a header value fetch itself refuses to send (control characters)
        }
        const body = Buffer.from(await res.arrayBuffer());
        expect([200, 206, 416]).toContain(res.status);
        if (res.status === 200) expect(body.equals(file)).toBe(true);
        if (res.status === 206) {
          const m = /^bytes (\d+)-(\d+)\/1000$/.exec(res.headers.get('content-range') ?? '');
          expect(m).not.toBeNull();
          const [start, end] = [Number(m?.[1]), Number(m?.[2])];
          expect(0 <= start && start <= end && end < 1000).toBe(true);
          expect(body.equals(file.subarray(start, end + 1))).toBe(true);
        }
      }),
      { numRuns: 150 },
    );
  });
});
