import { ID_PATTERN } from '../../proto/index.js';

/**
 * Parsers of what an HTTP client sends the artifact server: the request target, the Range and
 * If-None-Match headers, and Basic credentials. Pure, total (never throw), and strict: anything
 * they return is safe to use as is.
 */

export type Route =
  | { kind: 'artifact'; sha256: string }
  | { kind: 'manifest'; name: string; version: number; base: number | null }
  | { kind: 'delta-offer'; target: string; base: string | null }
  | { kind: 'delta'; target: string; patch: string };

const SHA256 = /^[0-9a-f]{64}$/;
const VERSION = /^[1-9][0-9]{0,9}$/;
const MAX_VERSION = 2 ** 31 - 1;
const MAX_TARGET = 2048;

function decodeSegment(s: string): string | null {
  try {
    return decodeURIComponent(s);
  } catch {
    return null;
  }
}

/** One query parameter, percent-decoded; null when absent or undecodable. */
function queryParam(query: string, key: string): string | null {
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=');
    if (eq > 0 && pair.slice(0, eq) === key) return decodeSegment(pair.slice(eq + 1));
  }
  return null;
}

/**
 * `/v1/artifacts/{sha256}`, `/v1/models/{name}/{version}/manifest[?base={version}]`,
 * `/v1/deltas/{target sha256}[?base={sha256}]` (an offer) or `/v1/deltas/{target}/{patch sha256}`;
 * other query parameters are ignored, and a `base` that is not valid is as good as none. A
 * sha256 is lower-case hex and a name matches the fleet's id pattern after percent-decoding, so
 * nothing returned can name a path outside the artifact store.
 */
export function parseRoute(target: string): Route | null {
  if (typeof target !== 'string' || target.length > MAX_TARGET) return null;
  const q = target.indexOf('?');
  const path = q < 0 ? target : target.slice(0, q);
  const query = q < 0 ? '' : target.slice(q + 1);
  const parts = path.split('/').map(decodeSegment);
  if (parts.some((p) => p === null) || parts[0] !== '' || parts[1] !== 'v1') return null;
  if (parts.length === 4 && parts[2] === 'artifacts') {
    const sha = parts[3] as string;
    return SHA256.test(sha) ? { kind: 'artifact', sha256: sha } : null;
  }
  if (parts.length === 6 && parts[2] === 'models' && parts[5] === 'manifest') {
    const name = parts[3] as string;
    const v = parts[4] as string;
    if (!ID_PATTERN.test(name) || !VERSION.test(v)) return null;
    const version = Number(v);
    const b = queryParam(query, 'base');
    const base = b !== null && VERSION.test(b) && Number(b) <= MAX_VERSION ? Number(b) : null;
    return version <= MAX_VERSION ? { kind: 'manifest', name, version, base } : null;
  }
  if ((parts.length === 4 || parts.length === 5) && parts[2] === 'deltas') {
    const t = parts[3] as string;
    if (!SHA256.test(t)) return null;
    if (parts.length === 5) return SHA256.test(parts[4] as string) ? { kind: 'delta', target: t, patch: parts[4] as string } : null;
    const b = queryParam(query, 'base');
    return { kind: 'delta-offer', target: t, base: b !== null && SHA256.test(b) ? b : null };
  }
  return null;
}

export type RangeResult = { kind: 'none' } | { kind: 'range'; start: number; end: number } | { kind: 'unsatisfiable' };

const RANGE = /^bytes[ \t]*=[ \t]*(?:(\d+)[ \t]*-[ \t]*(\d*)|-[ \t]*(\d+))[ \t]*$/i;

/**
 * One byte range of a representation of `size` bytes (RFC 9110 §14.1.2): `a-b`, `a-` or `-n`.
 * `end` is inclusive and clamped to the last byte. A header this server does not use (absent,
 * malformed, another unit, several ranges) is `none`: the whole representation is sent, as §14.2
 * allows. A syntactically valid range that misses the representation is `unsatisfiable` (416).
 */
export function parseRange(header: string | undefined, size: number): RangeResult {
  if (header === undefined || header.length > 200 || size <= 0) return { kind: 'none' };
  const m = RANGE.exec(header);
  if (!m) return { kind: 'none' };
  if (m[3] !== undefined) {
    const suffix = Number(m[3]);
    if (suffix === 0) return { kind: 'unsatisfiable' };
    return { kind: 'range', start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(m[1]);
  const last = m[2] === '' ? Infinity : Number(m[2]);
  if (last < start) return { kind: 'none' }; // invalid per §14.1.1: ignored, not refused
  if (start >= size) return { kind: 'unsatisfiable' };
  return { kind: 'range', start, end: Math.min(last, size - 1) };
}

/** True when an If-None-Match list names `etag` (weak comparison, RFC 9110 §13.1.2), or is `*`. */
export function noneMatch(header: string | undefined, etag: string): boolean {
  if (header === undefined || header.length > 8192) return false;
  if (header.trim() === '*') return true;
  return header.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}

/** `Authorization: Basic base64(user:password)`; the user ends at the first colon (RFC 7617 §2). */
export function parseBasicAuth(header: string | undefined): { username: string; password: string } | null {
  if (header === undefined || header.length > 1024) return null;
  const m = /^Basic[ ]+([A-Za-z0-9+/]+={0,2})[ ]*$/i.exec(header);
  if (!m) return null;
  const decoded = Buffer.from(m[1] as string, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon <= 0) return null;
  return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}
