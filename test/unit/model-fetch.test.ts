import { createHash, randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { fetchFile, fetchFileDelta, type FetchStats, newFetchStats } from '../../agent/models/fetch.js';
import { createPatch } from '../../common/delta/index.js';
import { ModelStore } from '../../agent/models/store.js';
import { cleanup, onCleanup, tempDir } from '../helpers/fleet.js';

afterEach(cleanup);

const body = randomBytes(300_000);
const sha = createHash('sha256').update(body).digest('hex');

/** A real HTTP server whose misbehaviour each test picks. */
async function serve(mode: 'honest' | 'ignores-range' | 'sends-more' | 'wrong-bytes' | 'drops'): Promise<{ url: string; ranges: string[] }> {
  const ranges: string[] = [];
  const server: Server = createServer((req, res) => {
    const range = req.headers.range;
    ranges.push(range ?? '');
    let data = mode === 'wrong-bytes' ? Buffer.from(body).fill(1, 1000, 1001) : body;
    if (mode === 'sends-more') data = Buffer.concat([data, randomBytes(5000)]);
    const m = /^bytes=(\d+)-/.exec(range ?? '');
    if (m && mode !== 'ignores-range') {
      res.writeHead(206, { 'content-range': `bytes ${m[1]}-${data.length - 1}/${data.length}` });
      res.end(data.subarray(Number(m[1])));
      return;
    }
    if (mode === 'drops') {
      res.writeHead(200, { 'content-length': String(data.length) });
      res.write(data.subarray(0, 100_000), () => res.destroy());
      return;
    }
    res.writeHead(200);
    res.end(data);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  onCleanup(() => new Promise<void>((r) => server.close(() => r())));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, ranges };
}

function stats(): FetchStats {
  return newFetchStats();
}

const file = { path: 'model.onnx', sha256: sha, size: body.length };

describe('artifact download', () => {
  it('downloads, verifies and adopts a file, then reuses it', async () => {
    const store = new ModelStore(tempDir());
    const { url } = await serve('honest');
    const st = stats();
    await fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, st);
    expect(readFileSync(store.blobPath(sha)).equals(body)).toBe(true);
    await fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, st);
    expect(st).toMatchObject({ bytesDownloaded: body.length, bytesResumed: 0, filesReused: 1 });
  });

  it('resumes a partial download with a Range request', async () => {
    const store = new ModelStore(tempDir());
    writeFileSync(store.partialPath(sha), body.subarray(0, 123_456));
    const { url, ranges } = await serve('honest');
    const st = stats();
    await fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, st);
    expect(ranges).toEqual([`bytes=123456-${body.length - 1}`]);
    expect(st.bytesDownloaded).toBe(body.length - 123_456);
    expect(readFileSync(store.blobPath(sha)).equals(body)).toBe(true);
  });

  it('keeps what arrived when the connection drops, and resumes from there', async () => {
    const store = new ModelStore(tempDir());
    const { url } = await serve('drops');
    await expect(fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, stats())).rejects.toThrow();
    expect(statSync(store.partialPath(sha)).size).toBeGreaterThan(0);
    expect(existsSync(store.blobPath(sha))).toBe(false);
    const honest = await serve('honest');
    await fetchFile(store, { baseUrl: honest.url, username: 'd', password: 'p' }, file, stats());
    expect(honest.ranges[0]).toMatch(/^bytes=\d+-/);
    expect(readFileSync(store.blobPath(sha)).equals(body)).toBe(true);
  });

  it('starts over once when the part kept from an earlier attempt holds bad bytes', async () => {
    const store = new ModelStore(tempDir());
    writeFileSync(store.partialPath(sha), randomBytes(50_000));
    const { url, ranges } = await serve('honest');
    await fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, stats());
    expect(ranges).toEqual([`bytes=50000-${body.length - 1}`, '']);
    expect(readFileSync(store.blobPath(sha)).equals(body)).toBe(true);
  });

  it('starts over when the server ignores the range', async () => {
    const store = new ModelStore(tempDir());
    writeFileSync(store.partialPath(sha), body.subarray(0, 1000));
    const { url } = await serve('ignores-range');
    await fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, stats());
    expect(readFileSync(store.blobPath(sha)).equals(body)).toBe(true);
  });

  it('stops at the signed size and refuses a server that sends more', async () => {
    const store = new ModelStore(tempDir());
    const { url } = await serve('sends-more');
    await expect(fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, stats())).rejects.toMatchObject({ code: 'EF_ARTIFACT_MISMATCH' });
    expect(existsSync(store.blobPath(sha))).toBe(false);
    expect(statSync(store.partialPath(sha)).size).toBe(0);
  });

  it('refuses bytes that do not hash to the signed sha256', async () => {
    const store = new ModelStore(tempDir());
    const { url } = await serve('wrong-bytes');
    await expect(fetchFile(store, { baseUrl: url, username: 'd', password: 'p' }, file, stats())).rejects.toMatchObject({ code: 'EF_ARTIFACT_MISMATCH' });
    expect(existsSync(store.blobPath(sha))).toBe(false);
  });
});

describe('delta download', () => {
  /** A base the device holds, a target 1e-3 away from it, and the patch between them. */
  async function pair(): Promise<{ base: Buffer; target: Buffer; patch: Buffer }> {
    const n = 100_000;
    const base = Buffer.alloc(n * 4);
    const target = Buffer.alloc(n * 4);
    for (let i = 0; i < n; i++) {
      const w = Math.sin(i) * 0.1;
      base.writeFloatLE(w, i * 4);
      target.writeFloatLE(w * (1 + Math.cos(i * 7) * 1e-3), i * 4);
    }
    const ranges = [{ name: 'w', offset: 0, length: base.length, float: 'f32' as const }];
    const { patch } = await createPatch(base, target, { baseLayout: ranges, targetLayout: ranges });
    return { base, target, patch };
  }

  /** Offers the patch; serves it with Range, cutting the first download short when `drops`. */
  async function fleet(p: { base: Buffer; target: Buffer; patch: Buffer }, drops: boolean): Promise<{ url: string; requests: string[] }> {
    const requests: string[] = [];
    const t = createHash('sha256').update(p.target).digest('hex');
    const b = createHash('sha256').update(p.base).digest('hex');
    const ps = createHash('sha256').update(p.patch).digest('hex');
    let served = 0;
    const server = createServer((req, res) => {
      requests.push(`${req.url ?? ''} ${req.headers.range ?? ''}`.trim());
      if (req.url === `/v1/deltas/${t}?base=${b}`) {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ kind: 'patch', target: { sha256: t, size: p.target.length }, base: b, delta: { sha256: ps, size: p.patch.length }, sizes: { full: p.target.length, image: p.target.length, patch: p.patch.length } }));
        return;
      }
      if (req.url === `/v1/deltas/${t}/${ps}`) {
        const m = /^bytes=(\d+)-/.exec(req.headers.range ?? '');
        const from = m ? Number(m[1]) : 0;
        res.writeHead(m ? 206 : 200, m ? { 'content-range': `bytes ${from}-${p.patch.length - 1}/${p.patch.length}` } : {});
        if (drops && served++ === 0) {
          res.write(p.patch.subarray(0, p.patch.length >> 1), () => res.destroy());
          return;
        }
        res.end(p.patch.subarray(from));
        return;
      }
      res.writeHead(200);
      res.end(p.target);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    onCleanup(() => new Promise<void>((r) => server.close(() => r())));
    return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, requests };
  }

  it('a patch cut off by the link resumes on the next attempt instead of falling back to the whole file', async () => {
    const p = await pair();
    const store = new ModelStore(tempDir());
    const baseSha = createHash('sha256').update(p.base).digest('hex');
    writeFileSync(store.partialPath(baseSha), p.base);
    store.adoptBlob(store.partialPath(baseSha), baseSha);
    const target = { path: 'weights.bin', sha256: createHash('sha256').update(p.target).digest('hex'), size: p.target.length };
    const { url, requests } = await fleet(p, true);
    const auth = { baseUrl: url, username: 'd', password: 'p' };
    const fallbacks: unknown[] = [];
    const opts = { base: baseSha, offerTimeoutMs: 5000, onFallback: (e: unknown) => fallbacks.push(e) };
    const st = stats();
    await expect(fetchFileDelta(store, auth, target, st, opts, new AbortController().signal)).rejects.toThrow();
    expect(fallbacks).toEqual([]);
    await fetchFileDelta(store, auth, target, st, opts, new AbortController().signal);
    expect(readFileSync(store.blobPath(target.sha256)).equals(p.target)).toBe(true);
    expect(requests.filter((r) => r.includes('bytes='))).toHaveLength(1);
    expect(requests.some((r) => r.startsWith('/v1/artifacts/'))).toBe(false);
    expect(st).toMatchObject({ patchedFiles: 1, fullFiles: 0, fallbacks: 0, bytesDownloaded: p.patch.length, bytesResumed: p.patch.length >> 1 });
    expect(st.savedBytes).toBe(p.target.length - p.patch.length);
  });
});
