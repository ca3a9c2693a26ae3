/**
 * Properties of the wire protocol's parsers of outside input: topic names (parseTopic and the
 * builders), payloads (decodeJson against every message schema) and the canonical JSON that
 * digests are computed over. Everything here runs on arbitrary input: nothing a peer can send may
 * make a parser throw, and a parser's answer must follow from its documented contract.
 */
import { deflateRawSync } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { z } from 'zod';
import {
  BINARY_FRAME_MAGIC,
  DOWN_KINDS,
  DesiredDoc,
  DesiredMessage,
  ERROR_CODES,
  EdgefleetError,
  FRAME_TELEMETRY_BATCH,
  FactsMessage,
  ID_PATTERN,
  LOG_LEVELS,
  MAX_JSON_DEPTH,
  MAX_PAYLOAD_BYTES,
  MAX_TELEMETRY_INFLATED_BYTES,
  OpsReply,
  OpsRequest,
  RECORD_CLASSES,
  ReportedMessage,
  ResyncMessage,
  StatusMessage,
  TelemetryBatch,
  UP_KINDS,
  canonicalJson,
  decodeJson,
  decodeTelemetryBatch,
  desiredDigest,
  encodeJson,
  encodeTelemetryBatch,
  isValidId,
  parseTopic,
  topics,
  type ParsedTopic,
} from '../../proto/index.js';

// ---------------------------------------------------------------------------------------------
// Arbitraries
// ---------------------------------------------------------------------------------------------

const validId = fc.stringMatching(ID_PATTERN);

const invalidId = fc.oneof(
  fc.string({ unit: 'binary', maxLength: 80 }).filter((s) => !isValidId(s)),
  fc.constantFrom('', '+', '#', 'a/b', '$SYS', '-a', '.a', '_a', 'a\u0000', 'a b', 'a'.repeat(65), 'é', 'a+', 'dev/+', '..'),
  fc.tuple(validId, fc.constantFrom('/', '+', '#', '\u0000', ' ', '$', 'é', '\n')).map(([id, c]) => id + c),
);

/** Keys of JSON objects. `__proto__` is left out: see the note on records in decodeJson's tests. */
const key = fc.string({ maxLength: 8 }).filter((k) => k !== '__proto__');
const json = fc.jsonValue({ maxDepth: 3 });
const safeNat = fc.nat({ max: Number.MAX_SAFE_INTEGER });
const hex64 = fc.stringMatching(/^[0-9a-f]{64}$/);
const text = (maxLength: number): fc.Arbitrary<string> => fc.string({ maxLength });

const settingsArb = fc.record({
  logLevel: fc.constantFrom(...LOG_LEVELS),
  reportIntervalSec: fc.integer({ min: 10, max: 86_400 }),
  factsIntervalSec: fc.integer({ min: 60, max: 7 * 86_400 }),
});

const modelVersion = fc.integer({ min: 1, max: 2 ** 31 - 1 });
const slotArb = fc.record(
  { version: modelVersion, manifestSha256: hex64, shadow: fc.record({ requests: fc.integer({ min: 1, max: 100_000 }) }) },
  { requiredKeys: ['version'] },
);
const slotReportArb = fc.record({
  state: text(32),
  active: fc.option(modelVersion),
  activeSha256: fc.option(hex64),
  desired: fc.option(modelVersion),
  history: fc.array(modelVersion, { maxLength: 5 }),
  failed: fc.array(modelVersion, { maxLength: 5 }),
  fallback: fc.option(modelVersion),
  lastVerdict: fc.option(fc.dictionary(key, json, { maxKeys: 3 })),
});

const docArb = fc.record({
  agent: settingsArb,
  models: fc.dictionary(validId, slotArb, { maxKeys: 3 }),
});

const pointer = fc.oneof(fc.constant(''), fc.string({ maxLength: 12 }).map((s) => `/${s}`));
const patchOpArb = fc.oneof(
  fc.record({ op: fc.constant('add' as const), path: pointer, value: json }),
  fc.record({ op: fc.constant('remove' as const), path: pointer }),
  fc.record({ op: fc.constant('replace' as const), path: pointer, value: json }),
  fc.record({ op: fc.constant('move' as const), path: pointer, from: pointer }),
  fc.record({ op: fc.constant('copy' as const), path: pointer, from: pointer }),
  fc.record({ op: fc.constant('test' as const), path: pointer, value: json }),
);

const version = fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER - 1 });

const validMessages = {
  status: fc.record(
    { state: fc.constantFrom('online', 'offline'), session: safeNat, ts: safeNat, agentVersion: text(64) },
    { requiredKeys: ['state', 'session'] },
  ),
  facts: fc.record({
    collectedAt: safeNat,
    hostname: text(255),
    agentVersion: text(64),
    node: text(64),
    os: fc.record({ platform: text(64), distro: text(128), release: text(128), kernel: text(128), arch: text(32) }),
    board: fc.record({ manufacturer: text(128), model: text(128) }),
    cpu: fc.record({ brand: text(128), cores: fc.nat(), speedGHz: fc.option(fc.double({ min: 0, max: 10, noNaN: true })) }),
    memory: fc.record({ totalBytes: fc.double({ min: 0, max: 1e15, noNaN: true }), availableBytes: fc.nat() }),
    disks: fc.array(fc.record({ mount: text(255), sizeBytes: fc.nat(), usedBytes: fc.nat() }), { maxLength: 6 }),
    temperatureC: fc.option(fc.double({ min: -100, max: 250, noNaN: true })),
    runtimes: fc.record({ onnxruntime: fc.option(text(64)), tfjsBackend: fc.option(text(64)) }),
  }),
  reported: fc.record({
    ts: safeNat,
    desiredVersion: safeNat,
    agent: settingsArb,
    models: fc.dictionary(validId, slotReportArb, { maxKeys: 3 }),
  }),
  resync: fc.record({
    have: safeNat,
    reason: fc.constantFrom('version-gap', 'patch-failed', 'digest-mismatch', 'invalid-message', 'startup'),
  }),
  desired: fc.oneof(
    fc.record({ kind: fc.constant('full' as const), version, digest: hex64, doc: docArb }),
    fc
      .record({ from: version, digest: hex64, patch: fc.array(patchOpArb, { maxLength: 5 }) })
      .map(({ from, digest, patch }) => ({ kind: 'patch' as const, from, to: from + 1, digest, patch })),
  ),
  opsRequest: fc.record(
    { id: fc.string({ minLength: 1, maxLength: 64 }), method: text(64), params: json },
    { requiredKeys: ['id', 'method'] },
  ),
  opsReply: fc.oneof(
    fc.record({ id: fc.option(fc.string({ minLength: 1, maxLength: 64 })), ok: fc.constant(true), data: json }),
    fc.record({
      id: fc.option(fc.string({ minLength: 1, maxLength: 64 })),
      ok: fc.constant(false),
      error: fc.record({ code: fc.constantFrom(...ERROR_CODES), message: text(40), details: json }, { requiredKeys: ['code', 'message'] }),
    }),
  ),
} satisfies Record<string, fc.Arbitrary<Record<string, unknown>>>;

interface SchemaCase {
  name: string;
  schema: z.ZodType;
  max: number;
  valid: fc.Arbitrary<Record<string, unknown>>;
  /** Top-level keys the schema requires, with a concrete type (not z.unknown()). */
  required: string[];
}

const CASES: SchemaCase[] = [
  { name: 'StatusMessage', schema: StatusMessage, max: MAX_PAYLOAD_BYTES.status, valid: validMessages.status, required: ['state', 'session'] },
  {
    name: 'FactsMessage',
    schema: FactsMessage,
    max: MAX_PAYLOAD_BYTES.facts,
    valid: validMessages.facts,
    required: ['collectedAt', 'hostname', 'agentVersion', 'node', 'os', 'board', 'cpu', 'memory', 'disks', 'runtimes'],
  },
  {
    name: 'ReportedMessage',
    schema: ReportedMessage,
    max: MAX_PAYLOAD_BYTES.reported,
    valid: validMessages.reported,
    required: ['ts', 'desiredVersion', 'agent', 'models'],
  },
  { name: 'ResyncMessage', schema: ResyncMessage, max: MAX_PAYLOAD_BYTES.resync, valid: validMessages.resync, required: ['have', 'reason'] },
  { name: 'DesiredMessage', schema: DesiredMessage, max: MAX_PAYLOAD_BYTES.desired, valid: validMessages.desired, required: ['kind', 'digest'] },
  { name: 'OpsRequest', schema: OpsRequest, max: MAX_PAYLOAD_BYTES.opsRequest, valid: validMessages.opsRequest, required: ['id', 'method'] },
  { name: 'OpsReply', schema: OpsReply, max: MAX_PAYLOAD_BYTES.opsReply, valid: validMessages.opsReply, required: ['ok'] },
];

/** Bytes a peer might send: noise, JSON of any shape, and valid messages with bytes flipped or cut. */
function payloadArb(c: SchemaCase): fc.Arbitrary<Uint8Array> {
  const encoded = c.valid.map((m) => new Uint8Array(encodeJson(m)));
  return fc.oneof(
    fc.uint8Array({ maxLength: 600 }),
    fc.json({ maxDepth: 3 }).map((s) => new Uint8Array(Buffer.from(s))),
    fc.string({ unit: 'binary', maxLength: 200 }).map((s) => new Uint8Array(Buffer.from(s))),
    encoded,
    fc.tuple(encoded, fc.nat(), fc.integer({ min: 0, max: 255 })).map(([b, i, v]) => {
      const copy = b.slice();
      if (copy.length > 0) copy[i % copy.length] = v;
      return copy;
    }),
    fc.tuple(encoded, fc.nat()).map(([b, n]) => b.subarray(0, n % (b.length + 1))),
    deepArb.map((t) => new Uint8Array(Buffer.from(t))),
  );
}

/** JSON text nested `depth` deep, as arrays, objects or both: what JSON.stringify could not even build. */
function deepText(depth: number, style: 'array' | 'object' | 'mixed', leaf = '0'): string {
  const open = (i: number): string => (style === 'array' || (style === 'mixed' && i % 2 === 0) ? '[' : '{"k":');
  const close = (i: number): string => (style === 'array' || (style === 'mixed' && i % 2 === 0) ? ']' : '}');
  let head = '';
  let tail = '';
  for (let i = 0; i < depth; i++) {
    head += open(i);
    tail = close(i) + tail;
  }
  return head + leaf + tail;
}

const depthArb = fc.oneof(fc.integer({ min: 1, max: 3 * MAX_JSON_DEPTH }), fc.constantFrom(MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 5_000, 50_000));
const styleArb = fc.constantFrom('array' as const, 'object' as const, 'mixed' as const);
/** Deep JSON on its own, and inside the free-form fields of a request (params) and of a report (a model verdict). */
const deepArb = fc.oneof(
  fc.tuple(depthArb, styleArb).map(([d, st]) => deepText(d, st)),
  fc.tuple(depthArb, styleArb).map(([d, st]) => `{"id":"r1","method":"devices.list","params":${deepText(d, st)}}`),
  fc.tuple(depthArb, styleArb).map(
    ([d, st]) =>
      `{"ts":1,"desiredVersion":1,"agent":{"logLevel":"info","reportIntervalSec":300,"factsIntervalSec":3600},"models":{"m1":{"state":"idle","active":1,"activeSha256":null,"desired":1,"history":[1],"failed":[],"fallback":1,"lastVerdict":{"x":${deepText(d, st)}}}}}`,
  ),
);

/** Levels of arrays and objects in a parsed value, without recursion (the value may be very deep). */
function depthOf(value: unknown): number {
  let max = 0;
  const stack: [unknown, number][] = [[value, 1]];
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const [v, level] = top;
    if (v === null || typeof v !== 'object') continue;
    max = Math.max(max, level);
    for (const child of Object.values(v)) stack.push([child, level + 1]);
  }
  return max;
}

/** The documented contract of decodeJson, computed independently of it. */
function expectContract(c: SchemaCase, bytes: Uint8Array, max: number, got: ReturnType<typeof decodeJson>): void {
  if (bytes.byteLength > max) {
    expect(got.ok).toBe(false);
    if (!got.ok) expect(got.error.code).toBe('EF_PAYLOAD_TOO_LARGE');
    return;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    expect(got).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
    return;
  }
  if (depthOf(raw) > MAX_JSON_DEPTH) {
    expect(got).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
    return;
  }
  const parsed = c.schema.safeParse(raw);
  if (parsed.success) {
    expect(got).toEqual({ ok: true, value: parsed.data });
  } else {
    expect(got.ok).toBe(false);
    if (!got.ok) {
      expect(got.error).toBeInstanceOf(EdgefleetError);
      expect(got.error.code).toBe('EF_BAD_PAYLOAD');
      expect(got.error.message.length).toBeGreaterThan(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------------------------

function rebuild(p: ParsedTopic): string {
  switch (p.dir) {
    case 'up':
      return topics.up(p.deviceId, p.kind);
    case 'down':
      return topics.down(p.deviceId, p.kind);
    case 'ops-req':
      return topics.opsRequest(p.operator);
    case 'ops-res':
      return topics.opsReply(p.operator);
  }
}

/** Strings that look like topics, built from our own levels, ids and junk. */
const topicish = fc.oneof(
  fc.string(),
  fc.string({ unit: 'binary' }),
  fc
    .array(
      fc.oneof(
        fc.constantFrom('edgefleet', 'v1', 'v2', 'dev', 'ops', 'up', 'down', 'req', 'res', '', '+', '#', ...UP_KINDS, ...DOWN_KINDS),
        validId,
        invalidId,
      ),
      { maxLength: 8 },
    )
    .map((levels) => levels.join('/')),
  fc.tuple(validId, fc.constantFrom(...UP_KINDS), fc.constantFrom('', '/', '/x', ' ', '\u0000')).map(([id, k, s]) => topics.up(id, k) + s),
);

describe('topics', () => {
  it('parseTopic never throws, and accepts only the exact strings the builders produce', () => {
    fc.assert(
      fc.property(topicish, (t) => {
        const p = parseTopic(t);
        if (p !== null) expect(rebuild(p)).toBe(t);
      }),
      { numRuns: 2000 },
    );
  });

  it('round-trips every concrete-topic builder for valid ids', () => {
    fc.assert(
      fc.property(validId, fc.constantFrom(...UP_KINDS), fc.constantFrom(...DOWN_KINDS), (id, up, down) => {
        expect(parseTopic(topics.up(id, up))).toEqual({ dir: 'up', deviceId: id, kind: up });
        expect(parseTopic(topics.down(id, down))).toEqual({ dir: 'down', deviceId: id, kind: down });
        expect(parseTopic(topics.opsRequest(id))).toEqual({ dir: 'ops-req', operator: id });
        expect(parseTopic(topics.opsReply(id))).toEqual({ dir: 'ops-res', operator: id });
        // Filters and prefixes are not topics a message can arrive on.
        expect(parseTopic(topics.deviceDownFilter(id))).toBeNull();
        expect(parseTopic(topics.devicePrefix(id))).toBeNull();
        expect(parseTopic(topics.opsPrefix(id))).toBeNull();
        // Identity lives in exactly one level, so it cannot smuggle in another topic.
        expect(topics.up(id, up).split('/')).toHaveLength(6);
        expect(topics.opsRequest(id).split('/')).toHaveLength(5);
      }),
      { numRuns: 500 },
    );
    expect(parseTopic(topics.fleetUpFilter)).toBeNull();
    expect(parseTopic(topics.fleetOpsFilter)).toBeNull();
  });

  it('every builder throws RangeError for an invalid id', () => {
    const builders: [string, (id: string) => string][] = [
      ['up', (id) => topics.up(id, 'status')],
      ['down', (id) => topics.down(id, 'desired')],
      ['opsRequest', (id) => topics.opsRequest(id)],
      ['opsReply', (id) => topics.opsReply(id)],
      ['deviceDownFilter', (id) => topics.deviceDownFilter(id)],
      ['devicePrefix', (id) => topics.devicePrefix(id)],
      ['opsPrefix', (id) => topics.opsPrefix(id)],
    ];
    fc.assert(
      fc.property(invalidId, fc.constantFrom(...builders), (id, [, build]) => {
        expect(() => build(id)).toThrow(RangeError);
      }),
      { numRuns: 1000 },
    );
  });

  it('ID_PATTERN admits no MQTT wildcard, separator, NUL or leading $', () => {
    fc.assert(
      fc.property(validId, (id) => {
        expect(id).not.toMatch(/[+#/]/);
        expect(id).not.toContain('\u0000');
        expect(id.startsWith('$')).toBe(false);
        expect(id.length).toBeLessThanOrEqual(64);
      }),
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

/** A JSON value of a different type from `v` (never null, which some fields accept). */
function foreignValue(v: unknown): fc.Arbitrary<unknown> {
  const all = {
    number: fc.integer(),
    string: fc.string({ maxLength: 5 }),
    boolean: fc.boolean(),
    array: fc.array(fc.integer(), { maxLength: 2 }),
    object: fc.dictionary(fc.constantFrom('a', 'b'), fc.integer(), { maxKeys: 2 }),
  };
  const kind = Array.isArray(v) ? 'array' : typeof v;
  return fc.oneof(...Object.entries(all).filter(([k]) => k !== kind).map(([, a]) => a as fc.Arbitrary<unknown>));
}

describe.each(CASES)('decodeJson with $name', (c) => {
  it('never throws on arbitrary bytes and follows its contract', () => {
    fc.assert(
      fc.property(payloadArb(c), fc.option(fc.integer({ min: 0, max: 700 }), { nil: c.max }), (bytes, max) => {
        expectContract(c, bytes, max, decodeJson(c.schema, bytes, max));
      }),
      { numRuns: 400 },
    );
  });

  it('never throws on arbitrary JSON values and follows its contract', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const bytes = encodeJson(v);
        expectContract(c, bytes, c.max, decodeJson(c.schema, bytes, c.max));
      }),
      { numRuns: 300 },
    );
  });

  it('accepts only what the code behind it can digest, store and copy: no stack overflow later', () => {
    fc.assert(
      fc.property(payloadArb(c), (bytes) => {
        const got = decodeJson(c.schema, bytes, Math.max(c.max, MAX_PAYLOAD_BYTES.desired));
        if (!got.ok) return;
        expect(() => canonicalJson(got.value)).not.toThrow();
        expect(() => JSON.stringify(got.value)).not.toThrow();
        expect(() => structuredClone(got.value)).not.toThrow();
      }),
      { numRuns: 300 },
    );
  });

  it('reads exactly the bytes of a view into a larger buffer', () => {
    fc.assert(
      fc.property(payloadArb(c), fc.uint8Array({ maxLength: 40 }), fc.uint8Array({ maxLength: 40 }), fc.boolean(), (bytes, before, after, asBuffer) => {
        const whole = new Uint8Array([...before, ...bytes, ...after]);
        const view = asBuffer
          ? Buffer.from(whole.buffer, before.length, bytes.length)
          : new Uint8Array(whole.buffer, before.length, bytes.length);
        expect(decodeJson(c.schema, view, c.max)).toEqual(decodeJson(c.schema, Buffer.from(bytes), c.max));
      }),
      { numRuns: 300 },
    );
  });

  it('decodes every valid message to itself', () => {
    fc.assert(
      fc.property(c.valid, (m) => {
        expect(decodeJson(c.schema, encodeJson(m), c.max)).toEqual({ ok: true, value: JSON.parse(JSON.stringify(m)) as unknown });
      }),
      { numRuns: 200 },
    );
  });

  it('refuses a schema-shaped message with an unknown key, a missing key or a mistyped key', () => {
    const wrong = c.valid.chain((m) =>
      fc.oneof(
        fc.tuple(fc.string({ minLength: 1, maxLength: 10 }), json).filter(([k]) => !(k in m) && k !== '__proto__').map(([k, v]) => ({ ...m, [k]: v })),
        fc.constantFrom(...c.required).map((k) => Object.fromEntries(Object.entries(m).filter(([x]) => x !== k))),
        fc
          .constantFrom(...c.required.filter((k) => m[k] !== null && m[k] !== undefined))
          .chain((k) => foreignValue(m[k]).map((v) => ({ ...m, [k]: v }))),
      ),
    );
    fc.assert(
      fc.property(wrong, (m) => {
        const got = decodeJson(c.schema, encodeJson(m), c.max);
        expect(got).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
      }),
      { numRuns: 300 },
    );
  });

  it('draws the size limit at exactly max bytes, before looking at the content', () => {
    fc.assert(
      fc.property(c.valid, fc.integer({ min: 0, max: 3 }), (m, over) => {
        const body = encodeJson(m);
        fc.pre(body.length <= c.max);
        // JSON allows trailing whitespace: a valid message padded to the limit is still valid.
        const atLimit = Buffer.concat([body, Buffer.alloc(c.max - body.length, 0x20)]);
        expect(decodeJson(c.schema, atLimit, c.max).ok).toBe(true);
        const beyond = Buffer.concat([atLimit, Buffer.alloc(over + 1, 0x20)]);
        expect(decodeJson(c.schema, beyond, c.max)).toMatchObject({ ok: false, error: { code: 'EF_PAYLOAD_TOO_LARGE' } });
      }),
      { numRuns: c.max > 1024 * 1024 ? 3 : 20 },
    );
  });
});

describe('decodeJson nesting limit', () => {
  it.each(['array', 'object', 'mixed'] as const)('takes %s nesting up to MAX_JSON_DEPTH levels and refuses one more, at any depth', (style) => {
    // The request object is one level, so its params may nest MAX_JSON_DEPTH - 1 deep.
    const request = (depth: number): Buffer => Buffer.from(`{"id":"r1","method":"m","params":${deepText(depth, style)}}`);
    expect(decodeJson(OpsRequest, request(MAX_JSON_DEPTH - 1), MAX_PAYLOAD_BYTES.opsRequest).ok).toBe(true);
    for (const depth of [MAX_JSON_DEPTH, 1_000, 40_000]) {
      expect(decodeJson(OpsRequest, request(depth), MAX_PAYLOAD_BYTES.opsRequest)).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
    }
  });
});

describe('decodeTelemetryBatch (binary frames on up/telemetry)', () => {
  const max = MAX_PAYLOAD_BYTES.telemetry;
  const frame = (body: Uint8Array, type = FRAME_TELEMETRY_BATCH, version = 1): Buffer => Buffer.concat([Buffer.from([BINARY_FRAME_MAGIC, type, version]), body]);
  const deflated = (text: string): Buffer => deflateRawSync(Buffer.from(text, 'utf8'));

  const recordArb = fc.record({
    seq: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
    cls: fc.constantFrom(...RECORD_CLASSES),
    ts: safeNat,
    type: fc.string({ minLength: 1, maxLength: 64 }),
    body: json,
  });
  const batchArb = fc.record({
    batch: fc.string({ minLength: 1, maxLength: 64 }),
    records: fc.uniqueArray(recordArb, { minLength: 1, maxLength: 20, selector: (r) => r.seq }),
    backlog: fc.record({
      records: fc.nat(),
      bytes: fc.nat(),
      oldestAgeSec: fc.option(fc.nat()),
      dropped: fc.dictionary(fc.constantFrom(...RECORD_CLASSES), fc.nat()),
    }),
  });
  const batchJson = batchArb.map((b) => JSON.stringify(b));

  /** Frames a device might send: noise, our header on noise, deflated noise, deflated JSON of any shape, batches with a byte flipped or cut, bodies nested deep. */
  const frameArb: fc.Arbitrary<Uint8Array> = fc.oneof(
    fc.uint8Array({ maxLength: 300 }),
    fc.uint8Array({ maxLength: 300 }).map((b) => frame(b)),
    fc.uint8Array({ maxLength: 300 }).map((b) => frame(deflateRawSync(b))),
    fc.tuple(fc.oneof(fc.json({ maxDepth: 3 }), batchJson), fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 3 })).map(([t, type, version]) => frame(deflated(t), type, version)),
    fc.tuple(batchArb, fc.nat(), fc.integer({ min: 0, max: 255 })).map(([b, i, v]) => {
      const f = Uint8Array.from(encodeTelemetryBatch(b));
      f[i % f.length] = v;
      return f;
    }),
    fc.tuple(batchArb, fc.nat()).map(([b, n]) => {
      const f = encodeTelemetryBatch(b);
      return f.subarray(0, n % (f.length + 1));
    }),
    fc
      .tuple(depthArb, styleArb)
      .map(([d, st]) => frame(deflated(`{"batch":"b","records":[{"seq":1,"cls":"event","ts":0,"type":"t","body":${deepText(d, st)}}],"backlog":{"records":0,"bytes":0,"oldestAgeSec":null,"dropped":{}}}`))),
  );

  it('never throws on arbitrary bytes or frames, refuses with the right code, and accepts only what can be stored', () => {
    fc.assert(
      fc.property(frameArb, fc.option(fc.integer({ min: 0, max: 400 }), { nil: max }), (bytes, limit) => {
        let got: ReturnType<typeof decodeTelemetryBatch> | undefined;
        expect(() => (got = decodeTelemetryBatch(bytes, limit))).not.toThrow();
        const r = got as ReturnType<typeof decodeTelemetryBatch>;
        if (!r.ok) {
          expect(r.error.code).toBe(bytes.length > limit ? 'EF_PAYLOAD_TOO_LARGE' : 'EF_BAD_PAYLOAD');
          return;
        }
        expect(bytes.length).toBeLessThanOrEqual(limit);
        expect(TelemetryBatch.safeParse(r.value).success).toBe(true);
        // The fleet stores every body with JSON.stringify.
        expect(() => JSON.stringify(r.value)).not.toThrow();
        expect(() => canonicalJson(r.value)).not.toThrow();
      }),
      { numRuns: 500 },
    );
  });

  it('decodes every batch the agent encodes to itself', () => {
    fc.assert(
      fc.property(batchArb, (b) => {
        expect(decodeTelemetryBatch(encodeTelemetryBatch(b), max)).toEqual({ ok: true, value: JSON.parse(JSON.stringify(b)) as unknown });
      }),
      { numRuns: 200 },
    );
  });

  it('refuses a frame that inflates beyond its limit (a zip bomb) and bodies nested too deep', () => {
    const batch = `{"batch":"b","records":[{"seq":1,"cls":"event","ts":0,"type":"t","body":null}],"backlog":{"records":0,"bytes":0,"oldestAgeSec":null,"dropped":{}}}`;
    // A valid batch: only its inflated size is wrong (whitespace after it).
    expect(decodeTelemetryBatch(frame(deflated(batch)), max).ok).toBe(true);
    const bomb = frame(deflateRawSync(Buffer.concat([Buffer.from(batch), Buffer.alloc(MAX_TELEMETRY_INFLATED_BYTES, 0x20)])));
    expect(bomb.length).toBeLessThan(max);
    expect(decodeTelemetryBatch(bomb, max)).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
    const deep = (d: number): Buffer =>
      frame(deflated(`{"batch":"b","records":[{"seq":1,"cls":"event","ts":0,"type":"t","body":${deepText(d, 'array')}}],"backlog":{"records":0,"bytes":0,"oldestAgeSec":null,"dropped":{}}}`));
    // batch, records and record are three levels: a body may nest the rest.
    expect(decodeTelemetryBatch(deep(MAX_JSON_DEPTH - 3), max).ok).toBe(true);
    for (const d of [MAX_JSON_DEPTH - 2, 50_000]) expect(decodeTelemetryBatch(deep(d), max)).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
  });
});

// ---------------------------------------------------------------------------------------------
// Canonical JSON and digests
// ---------------------------------------------------------------------------------------------

/** Small deterministic hash, to order keys differently per salt. */
function mix(s: string, salt: number): number {
  let h = salt | 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x9e3779b1);
  return h;
}

/** The same value with the keys of every object in another order. */
function shuffleKeys(v: unknown, salt: number): unknown {
  if (Array.isArray(v)) return v.map((x) => shuffleKeys(x, salt));
  if (v !== null && typeof v === 'object') {
    const entries = Object.entries(v).map(([k, x]) => [k, shuffleKeys(x, salt)] as const);
    entries.sort(([a], [b]) => mix(a, salt) - mix(b, salt));
    // fromEntries defines own properties, so a `__proto__` key stays a key.
    return Object.fromEntries(entries);
  }
  return v;
}

/** Keys reversed: a permutation that always differs when an object has two keys or more. */
function reverseKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(reverseKeys);
  if (v !== null && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, reverseKeys(x)] as const).reverse());
  return v;
}

const plainValues = [fc.boolean(), fc.integer(), fc.double(), fc.string(), fc.constant(null), fc.constant(undefined)];

describe('canonicalJson', () => {
  it('is the same for any order of keys (JSON values)', () => {
    fc.assert(
      fc.property(fc.jsonValue(), fc.integer(), (v, salt) => {
        const c = canonicalJson(v);
        expect(canonicalJson(shuffleKeys(v, salt))).toBe(c);
        expect(canonicalJson(reverseKeys(v))).toBe(c);
      }),
      { numRuns: 500 },
    );
  });

  it('is the same for any order of keys, and means what JSON.stringify means (fc.object)', () => {
    fc.assert(
      fc.property(fc.object({ values: plainValues, maxDepth: 3 }), fc.integer(), (o, salt) => {
        const c = canonicalJson(o);
        expect(canonicalJson(shuffleKeys(o, salt))).toBe(c);
        expect(canonicalJson(reverseKeys(o))).toBe(c);
        expect(JSON.parse(c)).toEqual(JSON.parse(JSON.stringify(o)));
      }),
      { numRuns: 500 },
    );
  });

  it('loses nothing and is idempotent', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const c = canonicalJson(v);
        const back: unknown = JSON.parse(c);
        expect(back).toEqual(JSON.parse(JSON.stringify(v)));
        expect(canonicalJson(back)).toBe(c);
        expect(c).toBe(canonicalJson(JSON.parse(JSON.stringify(v))));
      }),
      { numRuns: 500 },
    );
  });

  it('orders keys by code unit, also integer-like ones that JavaScript objects put first', () => {
    expect(canonicalJson({ b: 1, 10: 2, a: [{ z: null, 9: true }], 2: 'x' })).toBe('{"10":2,"2":"x","a":[{"9":true,"z":null}],"b":1}');
  });
});

describe('desiredDigest', () => {
  it('is equal for equal documents, whatever their key order or trip over the wire', () => {
    fc.assert(
      fc.property(docArb, fc.integer(), (raw, salt) => {
        const doc = DesiredDoc.parse(raw);
        const d = desiredDigest(doc);
        expect(d).toMatch(/^[0-9a-f]{64}$/);
        expect(desiredDigest(shuffleKeys(doc, salt) as DesiredDoc)).toBe(d);
        expect(desiredDigest(reverseKeys(doc) as DesiredDoc)).toBe(d);
        const wire = decodeJson(DesiredDoc, encodeJson(shuffleKeys(doc, salt)), MAX_PAYLOAD_BYTES.desired);
        expect(wire.ok && desiredDigest(wire.value)).toBe(d);
      }),
      { numRuns: 300 },
    );
  });

  it('differs for different documents', () => {
    fc.assert(
      fc.property(docArb, fc.integer({ min: 10, max: 86_400 }), (raw, interval) => {
        const doc = DesiredDoc.parse(raw);
        fc.pre(interval !== doc.agent.reportIntervalSec);
        const other = { ...doc, agent: { ...doc.agent, reportIntervalSec: interval } };
        expect(desiredDigest(other)).not.toBe(desiredDigest(doc));
      }),
      { numRuns: 200 },
    );
  });
});
