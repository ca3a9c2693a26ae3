import type { z } from 'zod';
import { EdgefleetError } from './errors.js';

/**
 * Payload encoding. Control messages are UTF-8 JSON objects (first byte `{`). Bulk data (tensor
 * bundles, delta patches, federated updates) travel as binary frames whose first byte is 0xEF,
 * followed by a frame type and a version byte (0x01: a telemetry batch, see telemetry.ts); such a payload on a
 * JSON topic is rejected like any other malformed input.
 */
export const BINARY_FRAME_MAGIC = 0xef;

export type Decoded<T> = { ok: true; value: T } | { ok: false; error: EdgefleetError };

/**
 * Deepest nesting of arrays and objects a payload may have. JSON.parse reads any depth, but what
 * runs after it (canonicalJson, JSON.stringify, structuredClone, JSON Patch) recurses: a few
 * kilobytes of `[[[[…]]]]` would overflow the stack there, in a place that was never meant to throw.
 */
export const MAX_JSON_DEPTH = 64;

/** True when `value` nests arrays and objects more than `max` levels deep. Iterative, so safe at any depth. */
export function nestsDeeperThan(value: unknown, max: number): boolean {
  const stack: [unknown, number][] = [[value, 1]];
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const [v, level] = top;
    if (v === null || typeof v !== 'object') continue;
    if (level > max) return true;
    for (const child of Object.values(v)) stack.push([child, level + 1]);
  }
  return false;
}

/** The same test on JSON text, by scanning it: no parse, no allocation (the outbox runs it per record). */
export function jsonNestsDeeperThan(json: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < json.length; i++) {
    const c = json.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > max) return true;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return false;
}

/** Parses `payload` as JSON and validates it against `schema`; never throws. */
export function decodeJson<S extends z.ZodType>(schema: S, payload: Buffer | Uint8Array, maxBytes: number): Decoded<z.output<S>> {
  if (payload.byteLength > maxBytes) {
    return { ok: false, error: new EdgefleetError('EF_PAYLOAD_TOO_LARGE', `payload of ${payload.byteLength} bytes exceeds ${maxBytes}`) };
  }
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8'));
  } catch {
    return { ok: false, error: new EdgefleetError('EF_BAD_PAYLOAD', 'payload is not JSON') };
  }
  if (nestsDeeperThan(raw, MAX_JSON_DEPTH)) {
    return { ok: false, error: new EdgefleetError('EF_BAD_PAYLOAD', `payload nests deeper than ${MAX_JSON_DEPTH} levels`) };
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    return { ok: false, error: new EdgefleetError('EF_BAD_PAYLOAD', summarizeIssues(parsed.error.issues)) };
  }
  return { ok: true, value: parsed.data };
}

export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

/** Every issue of a validation, one per line, each with its path: `agent.logLevel: Invalid option`. */
export function summarizeIssues(issues: readonly z.core.$ZodIssue[], limit = 20): string {
  const lines = issues.slice(0, limit).map((i) => `${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`);
  if (issues.length > limit) lines.push(`… and ${issues.length - limit} more`);
  return lines.join('; ');
}

/**
 * Deterministic JSON: object keys sorted, no whitespace. Used for digests (and, later, signatures)
 * so that two parties that hold equal documents compute equal bytes.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    const s = JSON.stringify(value);
    if (s === undefined) throw new TypeError('value has no JSON form');
    return s;
  }
  if (Array.isArray(value)) return `[${value.map((v) => canonicalJson(v === undefined ? null : v)).join(',')}]`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
}
