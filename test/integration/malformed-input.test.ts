/**
 * Malformed input on every inbound topic of both daemons, end to end: a real fleet (embedded broker
 * on a free port, SQLite under a temporary directory) and a real agent. fast-check publishes
 * arbitrary bytes, arbitrary JSON, messages of the right shape but wrong, and payloads around the
 * size limits on
 *   - every device upstream kind, from a second provisioned device (the agent keeps its session),
 *   - the operator request topic, through the ops client and raw from a second admin connection,
 *   - every downstream kind of the agent, from a fleet-kind identity, never retained.
 * Every payload is judged beforehand by the protocol's rules; each daemon must count exactly what it
 * refuses, change nothing because of it, and answer a garbage operator request with an error. After
 * every batch both daemons must still do their job: the fleet answers, and a real change of desired
 * state reaches the agent.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { deflateRawSync } from 'node:zlib';
import fc from 'fast-check';
import type { MqttClient } from 'mqtt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { z } from 'zod';
import type { Agent } from '../../agent/agent.js';
import {
  BINARY_FRAME_MAGIC,
  DOWN_KINDS,
  DesiredMessage,
  ERROR_CODES,
  FRAME_TELEMETRY_BATCH,
  FactsMessage,
  FlUpMessage,
  MAX_PAYLOAD_BYTES,
  METHODS,
  OpsReply,
  OpsRequest,
  RECORD_CLASSES,
  ReportedMessage,
  ResyncMessage,
  StatusMessage,
  UP_KINDS,
  canonicalJson,
  decodeJson,
  decodeTelemetryBatch,
  encodeJson,
  encodeTelemetryBatch,
  isMethod,
  topics,
} from '../../proto/index.js';
import { addDevice, addFleetIdentity, applied, cleanup, rawClient, startAgent, startFleet, type FleetHandle } from '../helpers/fleet.js';

const AGENT_ID = 'fuzz-agent';
const SPARE_ID = 'fuzz-spare';
const RUNS = 40;
/** Operator requests wait for a reply each (and the fleet writes an audit record per request): fewer runs. */
const OPS_RUNS = 30;
/** Per property: stop generating after 20 s so a slow machine stays within the suite timeout (every wait inside times out on its own). */
const FC = { numRuns: RUNS, interruptAfterTimeLimit: 20_000 } as const;

let fleet: FleetHandle;
let agent: Agent;
let agentStateDir: string;
/** The second device, for publishing upstream garbage under a device identity. */
let spare: MqttClient;
/** A `fleet`-kind identity: may publish on any device's downstream topics. */
let fleetSide: MqttClient;
/** A second connection of operator `admin`, publishing raw bytes on its request topic. */
let opsRaw: MqttClient;
const rawReplies: unknown[] = [];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async function until(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

const sum = (counts: Record<string, number>): number => Object.values(counts).reduce((a, b) => a + b, 0);
function delta(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) if (v - (before[k] ?? 0) !== 0) out[k] = v - (before[k] ?? 0);
  return out;
}
function bump(counts: Record<string, number>, code: string): void {
  counts[code] = (counts[code] ?? 0) + 1;
}

const spareRejected = (): number => fleet.server.fleetStore.devices.get(SPARE_ID)?.rejected ?? -1;
const agentDesiredFile = (): Buffer => readFileSync(join(agentStateDir, 'desired.json'));

/** What the agent holds, to prove garbage changed none of it. */
function agentState(): { version: number; file: string; settings: unknown } {
  return { version: agent.desiredVersion, file: agentDesiredFile().toString('utf8'), settings: agent.settings };
}

let interval = 100;
/** Both daemons still work: the fleet answers, and a real change of desired state reaches the agent. */
async function expectBothDaemonsWork(): Promise<void> {
  const list = await fleet.admin.call('devices.list', {});
  expect(list.devices.map((d) => d.deviceId)).toEqual(expect.arrayContaining([AGENT_ID, SPARE_ID]));
  const { version } = await fleet.admin.call('desired.get', { deviceId: AGENT_ID });
  interval += 1;
  const res = await fleet.admin.call('desired.set', { deviceId: AGENT_ID, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: interval }] });
  expect(res.version).toBe(version + 1);
  await applied(agent, res.version, 10_000);
  expect(agent.desiredVersion).toBe(res.version);
  expect(agent.settings?.reportIntervalSec).toBe(interval);
  const onDisk = JSON.parse(agentDesiredFile().toString('utf8')) as { version: number; doc: unknown };
  expect(onDisk.version).toBe(res.version);
  expect(onDisk.doc).toEqual(res.doc);
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

interface Payload {
  bytes: Buffer;
  /** Noise that no valid message of any topic can be: the judge must agree that it is refused. */
  noise: boolean;
  label: string;
}

const noise = (a: fc.Arbitrary<Buffer>, label: string): fc.Arbitrary<Payload> => a.map((bytes) => ({ bytes, noise: true, label }));
const shaped = (a: fc.Arbitrary<Buffer>, label: string): fc.Arbitrary<Payload> => a.map((bytes) => ({ bytes, noise: false, label }));

/** Random bytes (never empty, never starting like JSON or a binary frame) and JSON that is not an object of ours. */
const noiseArb: fc.Arbitrary<Payload> = fc.oneof(
  noise(
    fc.uint8Array({ minLength: 1, maxLength: 300 }).filter((b) => b[0] !== 0x7b && b[0] !== 0xef).map((b) => Buffer.from(b)),
    'random bytes',
  ),
  noise(
    fc.oneof(fc.integer(), fc.string(), fc.boolean(), fc.constant(null), fc.array(fc.jsonValue({ maxDepth: 2 }), { maxLength: 4 })).map(encodeJson),
    'JSON that is not an object',
  ),
  noise(fc.string({ unit: 'binary', minLength: 1, maxLength: 100 }).filter((s) => !s.trimStart().startsWith('{')).map((s) => Buffer.from(s)), 'text'),
);

/** Anything at all, including valid JSON objects and the empty payload. */
const anythingArb: fc.Arbitrary<Payload> = fc.oneof(
  shaped(fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)), 'any bytes'),
  shaped(fc.json({ maxDepth: 3 }).map((s) => Buffer.from(s)), 'any JSON'),
  shaped(fc.jsonValue({ maxDepth: 3 }).map(encodeJson), 'any JSON value'),
  shaped(fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 5 }).map(encodeJson), 'any object'),
);

/** A value of another JSON type than `v`. */
function foreign(v: unknown): fc.Arbitrary<unknown> {
  const all: Record<string, fc.Arbitrary<unknown>> = {
    number: fc.integer(),
    string: fc.string({ maxLength: 5 }),
    boolean: fc.boolean(),
    object: fc.dictionary(fc.constantFrom('a', 'b'), fc.integer(), { maxKeys: 2 }),
    array: fc.array(fc.integer(), { maxLength: 2 }),
    null: fc.constant(null),
  };
  const kind = v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v;
  return fc.oneof(...Object.entries(all).filter(([k]) => k !== kind).map(([, a]) => a));
}

/** Every path to a leaf or an object inside `v`. */
function pathsOf(v: unknown, prefix: string[] = []): string[][] {
  if (v === null || typeof v !== 'object') return [prefix];
  return [prefix, ...Object.entries(v).flatMap(([k, x]) => pathsOf(x, [...prefix, k]))];
}

function setAt(v: unknown, path: string[], value: unknown): unknown {
  if (path.length === 0) return value;
  const [head, ...rest] = path as [string, ...string[]];
  const copy: Record<string, unknown> = Array.isArray(v) ? { ...v } : { ...(v as Record<string, unknown>) };
  copy[head] = setAt(copy[head], rest, value);
  return Array.isArray(v) ? Object.values(copy) : copy;
}

function dropAt(v: unknown, path: string[]): unknown {
  if (path.length === 1) return Object.fromEntries(Object.entries(v as object).filter(([k]) => k !== path[0]));
  const [head, ...rest] = path as [string, ...string[]];
  return { ...(v as Record<string, unknown>), [head]: dropAt((v as Record<string, unknown>)[head], rest) };
}

/** A valid message with one thing wrong (or, now and then, still right: the judge decides). */
function mutated(template: Record<string, unknown>): fc.Arbitrary<Buffer> {
  const paths = pathsOf(template).filter((p) => p.length > 0);
  const objectPaths = pathsOf(template).filter((p) => {
    const at = p.reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], template);
    return at !== null && typeof at === 'object' && !Array.isArray(at);
  });
  return fc
    .oneof(
      fc
        .tuple(fc.constantFrom(...objectPaths), fc.string({ minLength: 1, maxLength: 8 }), fc.jsonValue({ maxDepth: 1 }))
        .map(([p, k, x]) => setAt(template, [...p, k], x)),
      fc.constantFrom(...paths.filter((p) => !p.some((k) => /^\d+$/.test(k)))).map((p) => dropAt(template, p)),
      fc.constantFrom(...paths).chain((p) => foreign(p.reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], template)).map((x) => setAt(template, p, x))),
      fc.constantFrom(...paths).chain((p) => fc.jsonValue({ maxDepth: 2 }).map((x) => setAt(template, p, x))),
    )
    .map(encodeJson);
}

/** A valid message padded with whitespace to `limit + d` bytes: valid up to the limit, refused beyond. */
function nearLimit(template: Record<string, unknown>, limit: number): fc.Arbitrary<Buffer> {
  const body = encodeJson(template);
  return fc.integer({ min: -2, max: 2 }).map((d) => Buffer.concat([body, Buffer.alloc(limit + d - body.length, 0x20)]));
}

/** JSON text of `template` with an array nested `depth` deep at `path` (JSON.stringify cannot build it). */
function nested(template: Record<string, unknown>, path: string[], depth: number): Buffer {
  const marker = '"@@nested@@"';
  const text = JSON.stringify(setAt(template, path, '@@nested@@'));
  return Buffer.from(text.replace(marker, '['.repeat(depth) + ']'.repeat(depth)));
}
const depthArb = fc.constantFrom(50, 2_000, 20_000, 100_000);

// Valid messages of every upstream kind with a JSON body.
const AGENT_SETTINGS = { logLevel: 'info', reportIntervalSec: 300, factsIntervalSec: 3600 };
const TEMPLATES: Record<string, Record<string, unknown>> = {
  // A round the fleet has never heard of: accepted by the schema, then ignored.
  fl: { kind: 'decline', roundId: 99, reason: 'too-few-samples', detail: 'none' },
  status: { state: 'online', session: 3, ts: 1_700_000_000_000, agentVersion: '0.1.0' },
  facts: {
    collectedAt: 1_700_000_000_000,
    hostname: 'spare',
    agentVersion: '0.1.0',
    node: 'v20.0.0',
    os: { platform: 'linux', distro: 'Debian', release: '12', kernel: '6.1.0', arch: 'arm64' },
    board: { manufacturer: 'Raspberry Pi', model: '4B' },
    cpu: { brand: 'Cortex-A72', cores: 4, speedGHz: 1.5 },
    memory: { totalBytes: 4e9, availableBytes: 2e9 },
    disks: [{ mount: '/', sizeBytes: 32e9, usedBytes: 8e9 }],
    temperatureC: 48.5,
    runtimes: { onnxruntime: '1.17.0', tfjsBackend: null },
  },
  reported: { ts: 1_700_000_000_000, desiredVersion: 1, agent: AGENT_SETTINGS, models: { m1: { url: 'x' } } },
  resync: { have: 0, reason: 'startup' },
};
const UP_SCHEMAS: Record<string, z.ZodType> = { status: StatusMessage, facts: FactsMessage, reported: ReportedMessage, resync: ResyncMessage, fl: FlUpMessage };

/** Telemetry frames: our header on noise, deflated JSON of any shape, valid batches spoiled or nested deep, and valid ones. */
const telemetryArb: fc.Arbitrary<Payload> = (() => {
  const frame = (body: Uint8Array, version = 1): Buffer => Buffer.concat([Buffer.from([BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, version]), body]);
  const batch = fc.record({
    batch: fc.string({ minLength: 1, maxLength: 64 }),
    records: fc.uniqueArray(
      fc.record({ seq: fc.integer({ min: 1, max: 1e12 }), cls: fc.constantFrom(...RECORD_CLASSES), ts: fc.nat(), type: fc.string({ minLength: 1, maxLength: 64 }), body: fc.jsonValue({ maxDepth: 2 }) }),
      { minLength: 1, maxLength: 5, selector: (r) => r.seq },
    ),
    backlog: fc.constant({ records: 0, bytes: 0, oldestAgeSec: null, dropped: {} }),
  });
  const deep = (d: number): string =>
    `{"batch":"b","records":[{"seq":7,"cls":"event","ts":0,"type":"t","body":${'['.repeat(d)}${']'.repeat(d)}}],"backlog":{"records":0,"bytes":0,"oldestAgeSec":null,"dropped":{}}}`;
  return fc.oneof(
    shaped(fc.uint8Array({ maxLength: 200 }).map((b) => frame(b)), 'telemetry header on noise'),
    shaped(fc.tuple(fc.json({ maxDepth: 3 }), fc.integer({ min: 0, max: 2 })).map(([t, v]) => frame(deflateRawSync(Buffer.from(t)), v)), 'deflated JSON'),
    shaped(mutated({ batch: 'b', records: [{ seq: 1, cls: 'event', ts: 0, type: 't', body: null }], backlog: { records: 0, bytes: 0, oldestAgeSec: null, dropped: {} } }).map((j) => frame(deflateRawSync(j))), 'schema-shaped but wrong'),
    shaped(depthArb.map((d) => frame(deflateRawSync(Buffer.from(deep(d))))), 'deeply nested body'),
    shaped(batch.map((b) => encodeTelemetryBatch(b)), 'valid batch'),
  );
})();

function upstreamArb(kind: string): fc.Arbitrary<Payload> {
  if (kind === 'telemetry') return fc.oneof(noiseArb, anythingArb, telemetryArb);
  const t = TEMPLATES[kind];
  // Kinds this suite has no model of: noise only, which no decoder may accept.
  if (!t) return noiseArb;
  const arbs = [noiseArb, anythingArb, shaped(mutated(t), 'schema-shaped but wrong'), shaped(nearLimit(t, MAX_PAYLOAD_BYTES[kind as keyof typeof MAX_PAYLOAD_BYTES]), 'near the size limit')];
  if (kind === 'reported') arbs.push(shaped(depthArb.map((d) => nested(t, ['models', 'm1', 'x'], d)), 'deeply nested'));
  return fc.oneof(...arbs);
}

type Verdict = { refuse: string | null } | { accept: unknown } | 'ignored';

/** The protocol's verdict on an upstream payload, decided before it is sent. */
function judgeUpstream(kind: string, bytes: Buffer): Verdict {
  if (bytes.length === 0) return 'ignored';
  if (kind === 'telemetry') {
    const t = decodeTelemetryBatch(bytes, MAX_PAYLOAD_BYTES.telemetry);
    return t.ok ? { accept: t.value } : { refuse: t.error.code };
  }
  const schema = UP_SCHEMAS[kind];
  if (!schema) return { refuse: null };
  const d = decodeJson(schema, bytes, MAX_PAYLOAD_BYTES[kind as keyof typeof MAX_PAYLOAD_BYTES]);
  return d.ok ? { accept: d.value } : { refuse: d.error.code };
}

/** Cases every run includes: nesting deep enough to overflow any recursive reader behind the parser. */
function deepExamples(kind: string): [Payload][] {
  if (kind === 'telemetry') {
    const text = `{"batch":"b","records":[{"seq":9,"cls":"event","ts":0,"type":"t","body":${'['.repeat(20_000)}${']'.repeat(20_000)}}],"backlog":{"records":0,"bytes":0,"oldestAgeSec":null,"dropped":{}}}`;
    const bytes = Buffer.concat([Buffer.from([BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, 1]), deflateRawSync(Buffer.from(text))]);
    return [[{ bytes, noise: false, label: 'telemetry body nested deep' }]];
  }
  const t = TEMPLATES[kind];
  if (kind !== 'reported' || !t) return [];
  return [[{ bytes: nested(t, ['models', 'm1', 'x'], 20_000), noise: false, label: 'deeply nested' }]];
}
function deepFull(version: number, depth: number): Payload {
  const msg = { kind: 'full', version, digest: '0'.repeat(64), doc: { models: { m1: { x: 0 } } } };
  return { bytes: nested(msg, ['doc', 'models', 'm1', 'x'], depth), noise: false, label: 'full, deeply nested' };
}

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

beforeAll(async () => {
  fleet = await startFleet();
  const cred = await addDevice(fleet, AGENT_ID);
  ({ agent, stateDir: agentStateDir } = await startAgent(cred));
  await applied(agent, 1);
  const url = fleet.server.brokerUrl;

  const spareCred = await addDevice(fleet, SPARE_ID);
  spare = await rawClient(url, { clientId: SPARE_ID, username: SPARE_ID, password: spareCred.password, clean: true });

  const name = 'fuzz-fleet-side';
  const { password } = addFleetIdentity(fleet, name);
  fleetSide = await rawClient(url, { clientId: name, username: name, password, clean: true });

  opsRaw = await rawClient(url, { clientId: 'admin~fuzz', username: fleet.profile.username, password: fleet.profile.password, clean: true });
  opsRaw.on('message', (_t, payload) => rawReplies.push(JSON.parse(payload.toString('utf8'))));
  await opsRaw.subscribeAsync(topics.opsReply('admin'), { qos: 1 });
});

afterAll(cleanup);

// ---------------------------------------------------------------------------------------------
// Device upstream → fleet
// ---------------------------------------------------------------------------------------------

describe('device upstream garbage', () => {
  it.each([...UP_KINDS])('up/%s: every refused payload is counted against the device, nothing else changes', async (kind) => {
    const agentBefore = agentState();
    const fleetBefore = { ...fleet.server.rejectedCounts };
    const deviceBefore = (await fleet.admin.call('devices.show', { deviceId: SPARE_ID })).rejectedMessages;
    const store = fleet.server.fleetStore;
    let refused = 0;
    const byCode: Record<string, number> = {};

    await fc.assert(
      fc.asyncProperty(upstreamArb(kind), async ({ bytes, noise: isNoise, label }) => {
        const verdict = judgeUpstream(kind, bytes);
        if (isNoise) expect(verdict, label).toHaveProperty('refuse');
        await spare.publishAsync(topics.up(SPARE_ID, kind), bytes, { qos: 1, retain: false });
        if (verdict === 'ignored') return;
        if ('refuse' in verdict) {
          refused += 1;
          if (verdict.refuse) bump(byCode, verdict.refuse);
          await until(`${refused} refused ${kind} payloads counted`, () => spareRejected() >= deviceBefore + refused);
          expect(spareRejected()).toBe(deviceBefore + refused);
          return;
        }
        // A payload the protocol accepts is stored as sent, not lost to a handler failure.
        const want = canonicalJson(verdict.accept);
        const stored = (v: unknown): boolean => v !== null && v !== undefined && canonicalJson(v) === want;
        if (kind === 'facts') await until('facts stored', () => stored(store.devices.get(SPARE_ID)?.facts));
        if (kind === 'reported') await until('reported state stored', () => stored(store.reported.get(SPARE_ID)?.doc));
        if (kind === 'telemetry') {
          const seqs = (verdict.accept as { records: { seq: number }[] }).records.map((r) => r.seq);
          await until('telemetry stored', () => {
            const have = new Set(store.telemetry.list(SPARE_ID, { limit: 100_000 }).map((r) => r.seq));
            return seqs.every((q) => have.has(q));
          });
        }
      }),
      { ...FC, examples: deepExamples(kind) },
    );

    expect(refused).toBeGreaterThan(0);
    const show = await fleet.admin.call('devices.show', { deviceId: SPARE_ID });
    expect(show.rejectedMessages).toBe(deviceBefore + refused);
    const counted = delta(fleet.server.rejectedCounts, fleetBefore);
    expect(sum(counted)).toBe(refused);
    for (const [code, n] of Object.entries(byCode)) expect(counted[code], code).toBe(n);
    expect(agentState()).toEqual(agentBefore);
    await expectBothDaemonsWork();
  });

  it('up/<unknown kind>: refused by the fleet, not counted against a device', async () => {
    const fleetBefore = { ...fleet.server.rejectedCounts };
    const deviceBefore = spareRejected();
    let sent = 0;
    const unknownKind = fc.stringMatching(/^[a-z][a-z0-9-]{0,11}$/).filter((k) => !(UP_KINDS as readonly string[]).includes(k));
    await fc.assert(
      fc.asyncProperty(unknownKind, anythingArb, async (kind, { bytes }) => {
        await spare.publishAsync(`${topics.devicePrefix(SPARE_ID)}/up/${kind}`, bytes, { qos: 1, retain: false });
        sent += 1;
        await until('unknown topic refused', () => sum(delta(fleet.server.rejectedCounts, fleetBefore)) >= sent);
      }),
      { ...FC, numRuns: 20 },
    );
    expect(delta(fleet.server.rejectedCounts, fleetBefore)).toEqual({ EF_BAD_PAYLOAD: sent });
    expect(spareRejected()).toBe(deviceBefore);
    await expectBothDaemonsWork();
  });
});

// ---------------------------------------------------------------------------------------------
// Operator requests → fleet
// ---------------------------------------------------------------------------------------------

/** Valid params of the methods this suite knows, to be spoiled. */
const PARAMS: Record<string, Record<string, unknown>> = {
  'devices.list': {},
  'devices.show': { deviceId: SPARE_ID },
  'devices.add': { deviceId: 'fuzz-never' },
  'devices.remove': { deviceId: SPARE_ID },
  'desired.get': { deviceId: AGENT_ID },
  'desired.set': { deviceId: AGENT_ID, patch: [{ op: 'replace', path: '/agent/logLevel', value: 'trace' }] },
  'audit.list': { limit: 5 },
  'operators.add': { name: 'fuzz-op', role: 'viewer' },
  'operators.list': {},
  'operators.remove': { name: 'admin' },
  'fleet.stats': {},
};

const methodArb = fc.oneof(
  fc.constantFrom(...Object.keys(METHODS)),
  fc.string({ maxLength: 70 }),
  fc.constantFrom('__proto__', 'constructor', 'toString', 'hasOwnProperty', 'devices', 'devices.list ', 'DEVICES.LIST', 'x'.repeat(65)),
);

/** Params that are wrong for sure: valid ones with an unknown key (every params schema is strict). */
const spoiledParamsArb = fc
  .tuple(fc.constantFrom(...Object.keys(PARAMS)), fc.string({ minLength: 1, maxLength: 8 }), fc.jsonValue({ maxDepth: 1 }))
  .filter(([m, k]) => !(k in (PARAMS[m] as object)) && k !== '__proto__')
  .map(([method, k, v]) => ({ method, params: { ...PARAMS[method], [k]: v }, spoiled: true }));

/** A request whose params nest deeper than any reader should follow (built as text: JSON.stringify cannot). */
function deepRequest(method: string, depth: number, n = 0): Payload {
  const params = method === 'desired.set' ? { deviceId: SPARE_ID, doc: { models: { m1: { x: 0 } } } } : { deviceId: SPARE_ID, x: 0 };
  const path = method === 'desired.set' ? ['params', 'doc', 'models', 'm1', 'x'] : ['params', 'x'];
  return { bytes: nested({ id: `deep-${method}-${depth}-${n}`, method, params }, path, depth), noise: false, label: `${method} nested ${depth} deep` };
}
const deepRequestArb: fc.Arbitrary<Payload> = fc
  .tuple(fc.constantFrom('desired.set', 'devices.show', 'audit.list'), fc.constantFrom(2_000, 20_000, 100_000), fc.nat())
  .map(([method, depth, n]) => deepRequest(method, depth, n));

const DOMAIN_ERRORS = ['EF_UNKNOWN_DEVICE', 'EF_DEVICE_EXISTS', 'EF_UNKNOWN_OPERATOR', 'EF_OPERATOR_EXISTS', 'EF_PATCH_FAILED', 'EF_DESIRED_INVALID', 'EF_VERSION_CONFLICT', 'EF_FORBIDDEN'];

describe('operator request garbage', () => {
  it('ops request with an arbitrary method and params: a coded error reply, never an internal error', async () => {
    const agentBefore = agentState();
    const spareBefore = await fleet.admin.call('desired.get', { deviceId: SPARE_ID });
    const auditBefore = (await fleet.admin.call('audit.list', { limit: 10_000 })).entries.length;
    let sent = 0;
    const requestArb = fc.oneof(fc.record({ method: methodArb, params: fc.jsonValue({ maxDepth: 3 }), spoiled: fc.constant(false) }), spoiledParamsArb);
    await fc.assert(
      fc.asyncProperty(requestArb, async ({ method, params, spoiled }) => {
        sent += 1;
        const reply = await fleet.admin.request(method, params);
        expect(OpsReply.safeParse(reply).success).toBe(true);
        expect(reply.id).not.toBeNull();
        if (method.length > 64) {
          expect(reply).toMatchObject({ ok: false, error: { code: 'EF_BAD_PAYLOAD' } });
        } else if (!isMethod(method)) {
          expect(reply).toMatchObject({ ok: false, error: { code: 'EF_UNKNOWN_METHOD' } });
        } else if (spoiled || !METHODS[method].params.safeParse(params ?? {}).success) {
          expect(reply).toMatchObject({ ok: false, error: { code: 'EF_BAD_PARAMS' } });
        } else if (!reply.ok) {
          // Valid by the schema: it may still be refused, but for a reason of the domain.
          expect(DOMAIN_ERRORS.concat('EF_BAD_PAYLOAD')).toContain(reply.error.code);
        }
        if (!reply.ok) expect(ERROR_CODES).toContain(reply.error.code);
      }),
      { ...FC, numRuns: OPS_RUNS },
    );
    // Every request, also a refused one, leaves exactly one audit record (+1: the audit.list above).
    const auditAfter = (await fleet.admin.call('audit.list', { limit: 10_000 })).entries.length;
    expect(auditAfter).toBe(auditBefore + 1 + sent);
    expect(await fleet.admin.call('desired.get', { deviceId: SPARE_ID })).toEqual(spareBefore);
    expect(agentState()).toEqual(agentBefore);
    await expectBothDaemonsWork();
  });

  it('raw garbage on ops/admin/req: exactly one error reply each, echoing the id when one is readable', async () => {
    const fleetBefore = { ...fleet.server.rejectedCounts };
    const agentBefore = agentState();
    const repliesBefore = rawReplies.length;
    const auditBefore = (await fleet.admin.call('audit.list', { limit: 10_000 })).entries.length;
    // That reply reaches this connection too; let it arrive before counting.
    await until('the audit.list reply on the raw connection', () => rawReplies.length > repliesBefore);
    let unreadable = 0;
    const byCode: Record<string, number> = {};
    const validRequest = { id: 'fuzz-1', method: 'devices.list', params: {} };
    const payloadArb = fc.oneof(
      noiseArb,
      anythingArb,
      shaped(mutated(validRequest), 'schema-shaped but wrong'),
      shaped(
        fc.tuple(fc.string({ minLength: 1, maxLength: 70 }), fc.jsonValue({ maxDepth: 1 })).map(([id, extra]) => encodeJson({ id, method: 'devices.list', params: {}, extra })),
        'readable id, wrong body',
      ),
      shaped(nearLimit(validRequest, MAX_PAYLOAD_BYTES.opsRequest), 'near the size limit'),
      deepRequestArb,
    );

    rawReplies.length = 0;
    let expected = 0;
    let audited = 0;
    const seenIds = new Set<string>();
    await fc.assert(
      fc.asyncProperty(payloadArb, async ({ bytes, noise: isNoise, label }) => {
        const decoded = decodeJson(OpsRequest, bytes, MAX_PAYLOAD_BYTES.opsRequest);
        if (isNoise) expect(decoded.ok, label).toBe(false);
        const start = rawReplies.length;
        await opsRaw.publishAsync(topics.opsRequest('admin'), bytes, { qos: 1, retain: false });
        expected += 1;
        await until('a reply to the raw request', () => rawReplies.length > start);
        const reply = rawReplies[start];
        expect(OpsReply.safeParse(reply).success).toBe(true);
        if (decoded.ok) {
          // A request id seen before is answered again from memory, not run (or audited) again.
          if (!seenIds.has(decoded.value.id)) audited += 1;
          seenIds.add(decoded.value.id);
          expect(reply).toMatchObject({ id: decoded.value.id });
          // A readable request may be refused, but never with an internal error.
          expect(reply).not.toMatchObject({ error: { code: 'EF_INTERNAL' } });
          return;
        }
        unreadable += 1;
        audited += 1;
        bump(byCode, decoded.error.code);
        expect(reply).toEqual({ id: readableId(bytes), ok: false, error: { code: decoded.error.code, message: expect.any(String) as unknown } });
      }),
      { ...FC, numRuns: OPS_RUNS, examples: [[deepRequest('desired.set', 20_000)], [deepRequest('audit.list', 20_000)]] },
    );
    // No request went unanswered, none was answered twice.
    await new Promise((r) => setTimeout(r, 100));
    expect(rawReplies).toHaveLength(expected);
    expect(unreadable).toBeGreaterThan(0);
    // Every request, also an unreadable one, leaves exactly one audit record (+1: the audit.list above).
    expect((await fleet.admin.call('audit.list', { limit: 10_000 })).entries.length).toBe(auditBefore + 1 + audited);
    expect(delta(fleet.server.rejectedCounts, fleetBefore)).toEqual(byCode);
    expect(agentState()).toEqual(agentBefore);
    await expectBothDaemonsWork();
  });
});

/** The correlation id a reader can find in a request that failed validation (null when none). */
function readableId(bytes: Buffer): string | null {
  if (bytes.length > MAX_PAYLOAD_BYTES.opsRequest) return null;
  try {
    const v = JSON.parse(bytes.toString('utf8')) as unknown;
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return null;
    const id = (v as { id?: unknown }).id;
    return typeof id === 'string' && id.length >= 1 && id.length <= 64 ? id : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Fleet downstream → agent
// ---------------------------------------------------------------------------------------------

const hex64 = fc.stringMatching(/^[0-9a-f]{64}$/);
const docArb = fc.record({
  agent: fc.record({ logLevel: fc.constantFrom('warn', 'debug'), reportIntervalSec: fc.integer({ min: 10, max: 86_400 }) }, { requiredKeys: [] }),
  models: fc.dictionary(fc.constantFrom('m1', 'm2'), fc.dictionary(fc.constantFrom('url', 'x'), fc.jsonValue({ maxDepth: 2 })), { maxKeys: 2 }),
});

/** Desired-state messages that are valid on the wire but must not change the agent (wrong digest, gap, stale, bad patch). */
function desiredWrongArb(version: () => number): fc.Arbitrary<Payload> {
  const ahead = fc.integer({ min: 1, max: 5 }).map((k) => version() + k);
  const any = fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER - 1 });
  const ops = fc.array(
    fc.record({
      op: fc.constantFrom('add', 'remove', 'replace', 'test', 'move', 'copy'),
      path: fc.constantFrom('', '/agent', '/agent/logLevel', '/models/m1', '/nothing/here', '/__proto__/x'),
      from: fc.constantFrom('/agent', '/models', '/nope'),
      value: fc.jsonValue({ maxDepth: 2 }),
    }).map((o) => (o.op === 'remove' ? { op: o.op, path: o.path } : o.op === 'move' || o.op === 'copy' ? { op: o.op, path: o.path, from: o.from } : { op: o.op, path: o.path, value: o.value })),
    { maxLength: 3 },
  );
  return fc.oneof(
    shaped(fc.record({ kind: fc.constant('full'), version: fc.oneof(ahead, any), digest: hex64, doc: docArb }).map(encodeJson), 'full, wrong digest'),
    shaped(fc.record({ version: fc.integer({ min: 1, max: 5 }), digest: hex64, doc: docArb }).map((m) => encodeJson({ kind: 'full', ...m, version: Math.min(m.version, version()) })), 'full, stale'),
    shaped(fc.record({ from: fc.oneof(ahead, any), digest: hex64, patch: ops }).map((m) => encodeJson({ kind: 'patch', ...m, to: m.from + 1 })), 'patch, gap'),
    shaped(fc.record({ digest: hex64, patch: ops }).map((m) => encodeJson({ kind: 'patch', from: version(), to: version() + 1, ...m })), 'patch from our version, wrong digest'),
    shaped(fc.record({ digest: hex64, patch: ops }).map((m) => encodeJson({ kind: 'patch', from: version(), to: version() + 2, ...m })), 'patch n to n + 2'),
    shaped(
      fc.tuple(ahead, hex64, depthArb).map(([v, digest, depth]) => nested({ kind: 'full', version: v, digest, doc: { models: { m1: { x: 0 } } } }, ['doc', 'models', 'm1', 'x'], depth)),
      'full, deeply nested',
    ),
    shaped(
      fc.tuple(hex64, fc.integer({ min: -2, max: 2 })).map(([digest, d]) => {
        const body = encodeJson({ kind: 'full', version: 1, digest, doc: {} });
        return Buffer.concat([body, Buffer.alloc(MAX_PAYLOAD_BYTES.desired + d - body.length, 0x20)]);
      }),
      'stale full near the size limit',
    ),
    shaped(mutated({ kind: 'patch', from: 1, to: 2, digest: 'a'.repeat(64), patch: [{ op: 'add', path: '/models/m1', value: {} }] }), 'schema-shaped but wrong'),
  );
}

/** The agent's verdict on a downstream payload: refused (counted), or ignored (stale, empty). Never applied. */
function judgeDesired(bytes: Buffer, version: number): Verdict {
  if (bytes.length === 0) return 'ignored';
  const d = decodeJson(DesiredMessage, bytes, MAX_PAYLOAD_BYTES.desired);
  if (!d.ok) return { refuse: d.error.code };
  const target = d.value.kind === 'full' ? d.value.version : d.value.to;
  if (target <= version) return 'ignored';
  // Ahead of us, but with a random digest: refused after a look, and a full resync asked for.
  return { refuse: 'EF_PATCH_FAILED' };
}

describe('agent downstream garbage', () => {
  it.each([...DOWN_KINDS])('down/%s from a fleet identity: the agent refuses and counts it, its desired state never changes', async (kind) => {
    const agentBefore = agentState();
    const countsBefore = { ...agent.rejectedCounts };
    let refused = 0;
    const byCode: Record<string, number> = {};
    const arb = kind === 'desired' ? fc.oneof(noiseArb, anythingArb, desiredWrongArb(() => agent.desiredVersion)) : noiseArb;

    await fc.assert(
      fc.asyncProperty(arb, async ({ bytes, noise: isNoise, label }) => {
        const verdict: Verdict = kind === 'desired' ? judgeDesired(bytes, agent.desiredVersion) : { refuse: null };
        if (isNoise) expect(verdict, label).toHaveProperty('refuse');
        await fleetSide.publishAsync(topics.down(AGENT_ID, kind), bytes, { qos: 1, retain: false });
        if (verdict !== 'ignored' && 'refuse' in verdict) {
          refused += 1;
          if (verdict.refuse) bump(byCode, verdict.refuse);
        }
        await until(`${refused} refused ${kind} payloads counted by the agent`, () => sum(delta(agent.rejectedCounts, countsBefore)) >= refused);
        expect(sum(delta(agent.rejectedCounts, countsBefore)), label).toBe(refused);
        expect(agent.desiredVersion).toBe(agentBefore.version);
      }),
      { ...FC, examples: kind === 'desired' ? [[deepFull(agent.desiredVersion + 1, 20_000)]] : [] },
    );

    expect(refused).toBeGreaterThan(0);
    const counted = delta(agent.rejectedCounts, countsBefore);
    expect(sum(counted)).toBe(refused);
    for (const [code, n] of Object.entries(byCode)) expect(counted[code], code).toBe(n);
    expect(agentState()).toEqual(agentBefore);
    await expectBothDaemonsWork();
  });

  it('down/<unknown kind>: refused by the agent', async () => {
    const agentBefore = agentState();
    const countsBefore = { ...agent.rejectedCounts };
    let sent = 0;
    const unknownKind = fc.stringMatching(/^[a-z][a-z0-9-]{0,11}$/).filter((k) => !(DOWN_KINDS as readonly string[]).includes(k));
    await fc.assert(
      fc.asyncProperty(unknownKind, anythingArb, async (kind, { bytes }) => {
        await fleetSide.publishAsync(`${topics.devicePrefix(AGENT_ID)}/down/${kind}`, bytes, { qos: 1, retain: false });
        sent += 1;
        await until('unknown topic refused', () => sum(delta(agent.rejectedCounts, countsBefore)) >= sent);
      }),
      { ...FC, numRuns: 20 },
    );
    expect(delta(agent.rejectedCounts, countsBefore)).toEqual({ EF_BAD_PAYLOAD: sent });
    expect(agentState()).toEqual(agentBefore);
    await expectBothDaemonsWork();
  });
});
