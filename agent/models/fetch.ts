import { createHash } from 'node:crypto';
import { closeSync, createReadStream, fsyncSync, openSync, statSync, truncateSync, writeSync } from 'node:fs';
import { EdgefleetError, MAX_MANIFEST_BYTES, SignedManifest, decodeJson, type ModelFile } from '../../proto/index.js';
import type { ModelStore } from './store.js';

export interface FetchAuth {
  baseUrl: string;
  username: string;
  password: string;
}

export interface FetchStats {
  bytesDownloaded: number;
  bytesResumed: number;
  filesReused: number;
}

function authHeader(auth: FetchAuth): string {
  return `Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}`;
}

async function refusal(res: Response, what: string): Promise<EdgefleetError> {
  let code = res.status === 404 || res.status === 410 ? 'EF_ARTIFACT_REFUSED' : 'EF_ARTIFACT_MISSING';
  let message = `${what}: HTTP ${res.status}`;
  try {
    const body = (await res.json()) as { error?: { code?: string; message?: string } };
    if (body.error?.code === 'EF_ARTIFACT_REFUSED' || body.error?.code === 'EF_UNKNOWN_MODEL') code = body.error.code;
    if (body.error?.message) message += ` (${body.error.message})`;
  } catch {
    // not JSON: the status says enough
  }
  return new EdgefleetError(code as 'EF_ARTIFACT_REFUSED', message);
}

/** The signed manifest of `name@version` from the fleet's artifact server, parsed but not yet verified. */
export async function fetchManifest(auth: FetchAuth, name: string, version: number, signal?: AbortSignal): Promise<SignedManifest> {
  const res = await fetch(`${auth.baseUrl}/v1/models/${encodeURIComponent(name)}/${version}/manifest`, {
    headers: { authorization: authHeader(auth) },
    signal,
  });
  if (!res.ok) throw await refusal(res, `manifest of ${name}@${version}`);
  const body = Buffer.from(await res.arrayBuffer());
  const decoded = decodeJson(SignedManifest, body, MAX_MANIFEST_BYTES);
  if (!decoded.ok) {
    // A manifest without its signature is an unsigned one, whatever else is wrong with it.
    const unsigned = !/"signature"\s*:\s*\{/.test(body.subarray(0, MAX_MANIFEST_BYTES).toString('utf8'));
    throw new EdgefleetError(unsigned ? 'EF_SIGNATURE_INVALID' : 'EF_MODEL_INVALID', `manifest of ${name}@${version}: ${unsigned ? 'unsigned' : decoded.error.message}`);
  }
  return decoded.value;
}

/**
 * Downloads one file into the blob store, unless it is already there. A partial file left by an
 * earlier attempt is resumed with a Range request; the download stops at the signed size, and the
 * sha256 of the whole file must match before it is adopted. A server that sends more than the
 * signed size, or different bytes, gets EF_ARTIFACT_MISMATCH and the partial file is discarded.
 */
export async function fetchFile(store: ModelStore, auth: FetchAuth, file: ModelFile, stats: FetchStats, signal?: AbortSignal, fresh = false): Promise<void> {
  if (store.hasBlob(file.sha256, file.size)) {
    stats.filesReused++;
    return;
  }
  const part = store.partialPath(file.sha256);
  let have = 0;
  try {
    have = statSync(part).size;
  } catch {
    have = 0;
  }
  if (have > file.size || fresh) {
    truncateSync(part, 0);
    have = 0;
  }
  const resumed = have > 0;
  const hash = createHash('sha256');
  if (have > 0) {
    // Hash what is already there; the rest streams through the same hash.
    for await (const chunk of createReadStream(part, { end: have - 1 })) hash.update(chunk as Buffer);
  }
  if (have < file.size) {
    const headers: Record<string, string> = { authorization: authHeader(auth) };
    if (have > 0) headers.range = `bytes=${have}-${file.size - 1}`;
    const res = await fetch(`${auth.baseUrl}/v1/artifacts/${file.sha256}`, { headers, signal });
    if (res.status === 200 && have > 0) {
      // The server ignored the range: start over.
      return fetchFile(store, auth, file, stats, signal, true);
    }
    if (res.status !== 200 && res.status !== 206) throw await refusal(res, `artifact ${file.path}`);
    if (!res.body) throw new EdgefleetError('EF_ARTIFACT_MISSING', `artifact ${file.path}: empty response`);
    if (have > 0) stats.bytesResumed += have;
    const fd = openSync(part, have > 0 ? 'a' : 'w', 0o600);
    let written = have;
    try {
      for await (const chunk of res.body) {
        const buf = chunk as Uint8Array;
        if (written + buf.byteLength > file.size) {
          throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `artifact ${file.path}: the server sent more than the signed ${file.size} bytes`);
        }
        let off = 0;
        while (off < buf.byteLength) off += writeSync(fd, buf, off, buf.byteLength - off);
        hash.update(buf);
        written += buf.byteLength;
        stats.bytesDownloaded += buf.byteLength;
      }
      fsyncSync(fd);
    } catch (e) {
      closeSync(fd);
      if (e instanceof EdgefleetError) truncateSync(part, 0);
      throw e;
    }
    closeSync(fd);
    if (written !== file.size) throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `artifact ${file.path}: got ${written} of ${file.size} bytes`);
  }
  if (hash.digest('hex') !== file.sha256) {
    truncateSync(part, 0);
    // The bad bytes may be in the part kept from an earlier attempt: once more, from the start.
    if (resumed) return fetchFile(store, auth, file, stats, signal, true);
    throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `artifact ${file.path}: sha256 does not match the signed manifest`);
  }
  store.adoptBlob(part, file.sha256);
}
