import { createHash } from 'node:crypto';
import { closeSync, createReadStream, fsyncSync, openSync, rmSync, statSync, truncateSync, writeSync } from 'node:fs';
import jsonpatch from 'fast-json-patch';
import { applyPatchFile } from '../../common/delta/index.js';
import { DeltaOffer, EdgefleetError, MAX_MANIFEST_BYTES, SignedManifest, decodeJson, isEdgefleetError, type ModelFile } from '../../proto/index.js';
import type { ModelStore } from './store.js';

export interface FetchAuth {
  baseUrl: string;
  username: string;
  password: string;
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

/**
 * The signed manifest of `name@version` from the fleet's artifact server, parsed but not yet
 * verified. With `base` (a manifest this device holds), the fleet may answer with an RFC 6902
 * patch from it instead; the result is checked exactly like a whole manifest, and a patch that
 * does not apply is answered by asking for the whole one.
 */
export async function fetchManifest(auth: FetchAuth, name: string, version: number, signal?: AbortSignal, base?: SignedManifest): Promise<SignedManifest> {
  const q = base ? `?base=${base.manifest.version}` : '';
  const res = await fetch(`${auth.baseUrl}/v1/models/${encodeURIComponent(name)}/${version}/manifest${q}`, {
    headers: { authorization: authHeader(auth) },
    signal,
  });
  if (!res.ok) throw await refusal(res, `manifest of ${name}@${version}`);
  let body = Buffer.from(await res.arrayBuffer());
  const patched = base !== undefined && (res.headers.get('content-type') ?? '').startsWith('application/json-patch+json');
  if (patched) {
    try {
      if (body.length > MAX_MANIFEST_BYTES) throw new Error('patch too large');
      const patch = JSON.parse(body.toString('utf8')) as jsonpatch.Operation[];
      body = Buffer.from(JSON.stringify(jsonpatch.applyPatch(structuredClone(base), patch, true, false).newDocument));
    } catch {
      return fetchManifest(auth, name, version, signal);
    }
  }
  const decoded = decodeJson(SignedManifest, body, MAX_MANIFEST_BYTES);
  if (!decoded.ok && patched) return fetchManifest(auth, name, version, signal);
  if (!decoded.ok) {
    // A manifest without its signature is an unsigned one, whatever else is wrong with it.
    const unsigned = !/"signature"\s*:\s*\{/.test(body.subarray(0, MAX_MANIFEST_BYTES).toString('utf8'));
    throw new EdgefleetError(unsigned ? 'EF_SIGNATURE_INVALID' : 'EF_MODEL_INVALID', `manifest of ${name}@${version}: ${unsigned ? 'unsigned' : decoded.error.message}`);
  }
  return decoded.value;
}

/** Counts for one version's download, reported as its ModelTransfer. */
export interface FetchStats {
  bytesDownloaded: number;
  bytesResumed: number;
  filesReused: number;
  reusedBytes: number;
  savedBytes: number;
  patchedFiles: number;
  fullFiles: number;
  fallbacks: number;
}

export function newFetchStats(): FetchStats {
  return { bytesDownloaded: 0, bytesResumed: 0, filesReused: 0, reusedBytes: 0, savedBytes: 0, patchedFiles: 0, fullFiles: 0, fallbacks: 0 };
}

/**
 * Downloads `urlPath` into `part`, resuming what an earlier attempt left there with a Range
 * request. The download stops at `expect.size`, and the sha256 of the whole file must match
 * before this returns. A server that sends more, or different bytes, gets EF_ARTIFACT_MISMATCH
 * and the partial file is discarded.
 */
async function download(auth: FetchAuth, urlPath: string, expect: { sha256: string; size: number; label: string }, part: string, stats: FetchStats, signal?: AbortSignal, fresh = false): Promise<void> {
  let have = 0;
  try {
    have = statSync(part).size;
  } catch {
    have = 0;
  }
  if (have > expect.size || fresh) {
    truncateSync(part, 0);
    have = 0;
  }
  const resumed = have > 0;
  const hash = createHash('sha256');
  if (have > 0) {
    // Hash what is already there; the rest streams through the same hash.
    for await (const chunk of createReadStream(part, { end: have - 1 })) hash.update(chunk as Buffer);
  }
  if (have < expect.size) {
    const headers: Record<string, string> = { authorization: authHeader(auth) };
    if (have > 0) headers.range = `bytes=${have}-${expect.size - 1}`;
    const res = await fetch(`${auth.baseUrl}${urlPath}`, { headers, signal });
    if (res.status === 200 && have > 0) {
      // The server ignored the range: start over.
      return download(auth, urlPath, expect, part, stats, signal, true);
    }
    if (res.status !== 200 && res.status !== 206) throw await refusal(res, expect.label);
    if (!res.body) throw new EdgefleetError('EF_ARTIFACT_MISSING', `${expect.label}: empty response`);
    if (have > 0) stats.bytesResumed += have;
    const fd = openSync(part, have > 0 ? 'a' : 'w', 0o600);
    let written = have;
    try {
      for await (const chunk of res.body) {
        const buf = chunk as Uint8Array;
        if (written + buf.byteLength > expect.size) {
          throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${expect.label}: the server sent more than the expected ${expect.size} bytes`);
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
    if (written !== expect.size) throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${expect.label}: got ${written} of ${expect.size} bytes`);
  }
  if (hash.digest('hex') !== expect.sha256) {
    truncateSync(part, 0);
    // The bad bytes may be in the part kept from an earlier attempt: once more, from the start.
    if (resumed) return download(auth, urlPath, expect, part, stats, signal, true);
    throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${expect.label}: sha256 does not match`);
  }
}

/**
 * Downloads one file into the blob store, unless it is already there. A partial file left by an
 * earlier attempt is resumed; the sha256 must match the signed manifest before it is adopted.
 */
/** Whether the store holds the file already (another version or model named it): then nothing is downloaded. */
function reused(store: ModelStore, file: ModelFile, stats: FetchStats): boolean {
  if (!store.hasBlob(file.sha256, file.size)) return false;
  stats.filesReused++;
  stats.reusedBytes += file.size;
  return true;
}

export async function fetchFile(store: ModelStore, auth: FetchAuth, file: ModelFile, stats: FetchStats, signal?: AbortSignal): Promise<void> {
  if (reused(store, file, stats)) return;
  const part = store.partialPath(file.sha256);
  await download(auth, `/v1/artifacts/${file.sha256}`, { sha256: file.sha256, size: file.size, label: `artifact ${file.path}` }, part, stats, signal);
  stats.fullFiles++;
  store.adoptBlob(part, file.sha256);
}

export interface DeltaFetchOptions {
  /** A blob this device holds to patch from (the same path in an earlier version), or null for an image. */
  base: string | null;
  /** How long to wait for the fleet to compute an offer before taking the whole file. */
  offerTimeoutMs: number;
  onFallback: (err: unknown) => void;
}

/**
 * Fetches one file as a patch against a file this device holds, or as a compressed image, when
 * the fleet offers one; applies it with bounded memory and adopts it only when the result hashes
 * to the signed sha256. No offer (or none in time), or a patch that is refused or fails, falls
 * back to the whole file. A link that fails while a patch downloads throws, as for a whole file:
 * the version is retried and the patch resumes. Aborting aborts.
 */
export async function fetchFileDelta(store: ModelStore, auth: FetchAuth, file: ModelFile, stats: FetchStats, opts: DeltaFetchOptions, signal: AbortSignal): Promise<void> {
  if (reused(store, file, stats)) return;
  let offer: DeltaOffer | null = null;
  try {
    const q = opts.base ? `?base=${opts.base}` : '';
    const res = await fetch(`${auth.baseUrl}/v1/deltas/${file.sha256}${q}`, { headers: { authorization: authHeader(auth) }, signal: AbortSignal.any([signal, AbortSignal.timeout(opts.offerTimeoutMs)]) });
    if (!res.ok) throw await refusal(res, `delta offer for ${file.path}`);
    const decoded = decodeJson(DeltaOffer, Buffer.from(await res.arrayBuffer()), 64 * 1024);
    if (!decoded.ok) throw new EdgefleetError('EF_DELTA_CORRUPT', `delta offer for ${file.path}: ${decoded.error.message}`);
    offer = decoded.value;
    if (offer.target.sha256 !== file.sha256 || offer.target.size !== file.size || (offer.kind === 'patch' && offer.base !== opts.base)) {
      throw new EdgefleetError('EF_DELTA_WRONG_BASE', `delta offer for ${file.path} names another file`);
    }
  } catch (err) {
    if (signal.aborted) throw err;
    offer = null;
    stats.fallbacks++;
    opts.onFallback(err);
  }
  if (offer?.delta && offer.delta.size < file.size) {
    const patchPart = store.patchPath(offer.delta.sha256);
    const out = store.partialPath(file.sha256);
    try {
      await download(auth, `/v1/deltas/${file.sha256}/${offer.delta.sha256}`, { ...offer.delta, label: `${offer.kind} of ${file.path}` }, patchPart, stats, signal);
      const basePath = offer.kind === 'patch' && opts.base ? store.blobPath(opts.base) : null;
      const result = await applyPatchFile(basePath, patchPart, out, { maxTargetBytes: file.size, ...(basePath && opts.base ? { baseSha256: opts.base } : {}) });
      if (result.sha256 !== file.sha256) {
        rmSync(out, { force: true });
        throw new EdgefleetError('EF_DELTA_TARGET_MISMATCH', `${offer.kind} of ${file.path} produced another file than the manifest signs`);
      }
      store.adoptBlob(out, file.sha256);
      rmSync(patchPart, { force: true });
      stats.patchedFiles++;
      stats.savedBytes += file.size - offer.delta.size;
      return;
    } catch (err) {
      // The link failing is not the patch's fault: it is retried with the rest of the version,
      // and the partial patch resumes. Anything the patch did wrong drops it for the whole file.
      if (signal.aborted || !isEdgefleetError(err)) throw err;
      rmSync(patchPart, { force: true });
      stats.fallbacks++;
      opts.onFallback(err);
    }
  }
  await fetchFile(store, auth, file, stats, signal);
}
