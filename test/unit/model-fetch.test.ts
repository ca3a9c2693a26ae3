import { createHash, randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { fetchFile, type FetchStats, newFetchStats } from '../../agent/models/fetch.js';
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
