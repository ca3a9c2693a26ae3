/**
 * The agent's copy of its desired state (agent/state/desired.ts) on a real directory: the rules
 * for full documents, patches, gaps, failures and stale redeliveries; persistence across reopen;
 * a hand-corrupted file. Then properties: whatever valid message arrives, the store either applies
 * it completely (and then holds exactly the announced digest, in memory and on disk) or changes
 * nothing at all, down to the bytes of desired.json.
 */
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import jsonpatch from 'fast-json-patch';
import { afterAll, describe, expect, it } from 'vitest';
import { DesiredStore, type ApplyOutcome } from '../../agent/state/desired.js';
import {
  DesiredDoc,
  DesiredMessage,
  LOG_LEVELS,
  MAX_PAYLOAD_BYTES,
  decodeJson,
  defaultDesiredDoc,
  desiredDigest,
  encodeJson,
  type JsonPatch,
} from '../../proto/index.js';

const dirs: string[] = [];
function freshDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-desired-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const file = (dir: string): string => join(dir, 'desired.json');
const bytesOf = (dir: string): Buffer | null => (existsSync(file(dir)) ? readFileSync(file(dir)) : null);

/** A message as the agent would get it: through the wire codec, so only what can arrive. */
function wire(raw: unknown): DesiredMessage {
  const d = decodeJson(DesiredMessage, encodeJson(raw), MAX_PAYLOAD_BYTES.desired);
  if (!d.ok) throw new Error(`test built an invalid message: ${d.error.message}`);
  return d.value;
}

const doc = (partial: unknown = {}): DesiredDoc => DesiredDoc.parse(partial);
const full = (version: number, d: DesiredDoc, digest = desiredDigest(d)): DesiredMessage => wire({ kind: 'full', version, digest, doc: d });
const patch = (from: number, ops: unknown[], digest: string): DesiredMessage => wire({ kind: 'patch', from, to: from + 1, digest, patch: ops });

const D0 = defaultDesiredDoc();
const D60 = doc({ agent: { reportIntervalSec: 60 } });
const DM = doc({ models: { m1: { version: 3, manifestSha256: 'ab'.repeat(32) } } });
const WRONG = 'f'.repeat(64);

interface Rule {
  name: string;
  before: DesiredMessage[];
  msg: DesiredMessage;
  expect: ApplyOutcome['outcome'];
  reason?: string;
  version: number;
  doc: DesiredDoc;
}

const RULES: Rule[] = [
  { name: 'a full document applies to a fresh store', before: [], msg: full(1, D0), expect: 'applied', version: 1, doc: D0 },
  { name: 'a full document jumps any number of versions', before: [full(1, D0)], msg: full(7, D60), expect: 'applied', version: 7, doc: D60 },
  {
    name: 'a patch from n to n + 1 applies',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }], desiredDigest(D60)),
    expect: 'applied',
    version: 2,
    doc: D60,
  },
  {
    name: 'a patch that adds a model slot applies',
    before: [full(3, D0)],
    msg: patch(3, [{ op: 'add', path: '/models/m1', value: { version: 3, manifestSha256: 'ab'.repeat(32) } }], desiredDigest(DM)),
    expect: 'applied',
    version: 4,
    doc: DM,
  },
  {
    name: 'a patch from a later version is a gap',
    before: [full(1, D0)],
    msg: patch(2, [], desiredDigest(D0)),
    expect: 'resync',
    reason: 'version-gap',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch to a fresh store is a gap',
    before: [],
    msg: patch(1, [], desiredDigest(D0)),
    expect: 'resync',
    reason: 'version-gap',
    version: 0,
    doc: D0,
  },
  {
    name: 'a patch that removes what is not there fails',
    before: [full(1, D60)],
    msg: patch(1, [{ op: 'remove', path: '/nothing/here' }], desiredDigest(D60)),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D60,
  },
  {
    name: 'a patch whose test operation fails does not apply its other operations',
    before: [full(1, D0)],
    msg: patch(
      1,
      [
        { op: 'replace', path: '/agent/reportIntervalSec', value: 60 },
        { op: 'test', path: '/agent/logLevel', value: 'trace' },
      ],
      desiredDigest(D60),
    ),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch whose result breaks the schema fails',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'replace', path: '/agent/reportIntervalSec', value: 1 }], desiredDigest(D0)),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch that adds an unknown key fails',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'add', path: '/unknown', value: 1 }], desiredDigest(D0)),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch that reaches for __proto__ fails',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'add', path: '/__proto__/polluted', value: 1 }], desiredDigest(D0)),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch that moves from nowhere fails',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'move', path: '/models/m2', from: '/models/nope' }], desiredDigest(D0)),
    expect: 'resync',
    reason: 'patch-failed',
    version: 1,
    doc: D0,
  },
  {
    name: 'a full document with the wrong digest is refused',
    before: [full(1, D0)],
    msg: full(2, D60, WRONG),
    expect: 'resync',
    reason: 'digest-mismatch',
    version: 1,
    doc: D0,
  },
  {
    name: 'a patch that yields another document than announced is refused',
    before: [full(1, D0)],
    msg: patch(1, [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }], desiredDigest(D0)),
    expect: 'resync',
    reason: 'digest-mismatch',
    version: 1,
    doc: D0,
  },
  { name: 'a full document at our version is stale', before: [full(2, D60)], msg: full(2, D0), expect: 'stale', version: 2, doc: D60 },
  { name: 'an older full document is stale', before: [full(5, D60)], msg: full(3, D0), expect: 'stale', version: 5, doc: D60 },
  {
    name: 'a patch we already applied is stale (the retained copy after a reconnect)',
    before: [full(1, D0), patch(1, [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }], desiredDigest(D60))],
    msg: patch(1, [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }], desiredDigest(D60)),
    expect: 'stale',
    version: 2,
    doc: D60,
  },
  {
    name: 'a stale message is stale even when it is garbage',
    before: [full(4, D0)],
    msg: patch(2, [{ op: 'remove', path: '/nothing' }], WRONG),
    expect: 'stale',
    version: 4,
    doc: D0,
  },
];

describe('DesiredStore rules', () => {
  it.each(RULES)('$name', (rule) => {
    const dir = freshDir();
    const store = new DesiredStore(dir);
    for (const m of rule.before) expect(store.apply(m).outcome).toBe('applied');
    const bytesBefore = bytesOf(dir);
    const docBefore = store.doc;

    const out = store.apply(rule.msg);

    expect(out.outcome).toBe(rule.expect);
    if (out.outcome === 'resync') expect(out.reason).toBe(rule.reason);
    expect(store.version).toBe(rule.version);
    expect(store.doc).toEqual(rule.doc);
    if (out.outcome === 'applied') {
      expect(out.version).toBe(rule.version);
      expect(out.previous).toBe(docBefore);
      expect(JSON.parse(readFileSync(file(dir), 'utf8'))).toEqual({ version: rule.version, digest: desiredDigest(rule.doc), doc: rule.doc });
    } else {
      expect(store.doc).toBe(docBefore);
      expect(bytesOf(dir)).toEqual(bytesBefore);
    }
    // What is on disk is what a restarted agent starts from.
    const again = new DesiredStore(dir);
    expect(again.version).toBe(rule.version);
    expect(again.doc).toEqual(rule.doc);
    // Atomic replace leaves no temporary files behind.
    expect(readdirSync(dir).filter((f) => f !== 'desired.json')).toEqual([]);
  });

  it('starts at version 0 with the default document and writes nothing until the fleet speaks', () => {
    const dir = freshDir();
    const store = new DesiredStore(dir);
    expect(store.version).toBe(0);
    expect(store.doc).toEqual(D0);
    expect(existsSync(file(dir))).toBe(false);
  });

  it('survives a reopen from disk after a full document and a patch', () => {
    const dir = freshDir();
    const a = new DesiredStore(dir);
    expect(a.apply(full(1, DM)).outcome).toBe('applied');
    const next = doc({ ...DM, agent: { logLevel: 'debug' } });
    expect(a.apply(patch(1, [{ op: 'replace', path: '/agent/logLevel', value: 'debug' }], desiredDigest(next))).outcome).toBe('applied');
    const b = new DesiredStore(dir);
    expect(b.version).toBe(2);
    expect(b.doc).toEqual(next);
    // ... and goes on from there.
    expect(b.apply(patch(2, [{ op: 'remove', path: '/models/m1' }], desiredDigest(doc({ agent: { logLevel: 'debug' } })))).outcome).toBe('applied');
    expect(new DesiredStore(dir).version).toBe(3);
  });

  const good = JSON.stringify({ version: 3, digest: desiredDigest(D60), doc: D60 });
  it.each([
    ['not JSON', '{"version": 3, "digest": '],
    ['empty', ''],
    ['null', 'null'],
    ['an array', '[]'],
    ['an empty object', '{}'],
    ['a negative version', JSON.stringify({ version: -1, digest: desiredDigest(D0), doc: D0 })],
    ['a fractional version', JSON.stringify({ version: 1.5, digest: desiredDigest(D0), doc: D0 })],
    ['a document that breaks the schema', JSON.stringify({ version: 3, digest: desiredDigest(D60), doc: { ...D60, extra: true } })],
    ['a digest that does not match the document', JSON.stringify({ version: 3, digest: desiredDigest(D0), doc: D60 })],
    ['a document edited after the digest', good.replace('"reportIntervalSec":60', '"reportIntervalSec":61')],
    ['binary garbage', '\u0000\u00ff\u00fe{'],
  ])('a hand-corrupted desired.json (%s) starts from version 0', (_name, content) => {
    const dir = freshDir();
    writeFileSync(file(dir), content);
    const store = new DesiredStore(dir);
    expect(store.version).toBe(0);
    expect(store.doc).toEqual(D0);
    // The first retained message, a full document, repairs it.
    expect(store.apply(full(3, D60)).outcome).toBe('applied');
    expect(new DesiredStore(dir).version).toBe(3);
  });

  it('reads back an intact file (the corrupted cases above differ from it)', () => {
    const dir = freshDir();
    writeFileSync(file(dir), good);
    const store = new DesiredStore(dir);
    expect(store.version).toBe(3);
    expect(store.doc).toEqual(D60);
  });
});

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

const slotKey = fc.constantFrom('url', 'sha256', 'size', 'x', 'a b', '~', '/');
const modelId = fc.constantFrom('m1', 'm2', 'vision', 'bad id', '-x');
const docArb = fc
  .record({
    agent: fc.record(
      {
        logLevel: fc.constantFrom(...LOG_LEVELS),
        reportIntervalSec: fc.integer({ min: 10, max: 86_400 }),
        factsIntervalSec: fc.integer({ min: 60, max: 7 * 86_400 }),
      },
      { requiredKeys: [] },
    ),
    models: fc.dictionary(
      fc.constantFrom('m1', 'm2', 'vision'),
      fc.record({ version: fc.integer({ min: 1, max: 1000 }), shadow: fc.record({ requests: fc.integer({ min: 1, max: 100 }) }) }, { requiredKeys: ['version'] }),
      { maxKeys: 2 },
    ),
  })
  .map((d) => DesiredDoc.parse(d));

/** Pointers into a desired document: real ones, near misses and nonsense. */
const pathArb = fc.oneof(
  fc.constantFrom(
    '',
    '/agent',
    '/agent/logLevel',
    '/agent/reportIntervalSec',
    '/agent/factsIntervalSec',
    '/agent/unknown',
    '/models',
    '/models/-',
    '/models/m1',
    '/models/m2/version',
    '/models/m1/shadow/requests',
    '/models/m1/x/0',
    '/__proto__',
    '/models/__proto__',
    '/models/m1/constructor/prototype',
    '/nothing/here',
    '/agent/',
    '//',
  ),
  fc.tuple(fc.constantFrom('/models/', '/agent/', '/'), fc.oneof(modelId, fc.string({ maxLength: 6 }))).map(([a, b]) => a + b),
);
const valueArb = fc.oneof(
  fc.constantFrom(...LOG_LEVELS),
  fc.integer({ min: -10, max: 700_000 }),
  fc.jsonValue({ maxDepth: 2 }),
  fc.dictionary(slotKey, fc.jsonValue({ maxDepth: 1 }), { maxKeys: 2 }),
);
const opArb = fc.oneof(
  fc.record({ op: fc.constantFrom('add', 'replace', 'test'), path: pathArb, value: valueArb }),
  fc.record({ op: fc.constant('remove'), path: pathArb }),
  fc.record({ op: fc.constantFrom('move', 'copy'), path: pathArb, from: pathArb }),
);

/** The digest of what the patch should produce, when it produces a valid document. */
function intendedDigest(current: DesiredDoc, ops: unknown[]): string | null {
  try {
    const next = jsonpatch.applyPatch(structuredClone(current), ops as JsonPatch, true, false).newDocument;
    const parsed = DesiredDoc.safeParse(next);
    return parsed.success ? desiredDigest(parsed.data) : null;
  } catch {
    return null;
  }
}

interface Scenario {
  start: number;
  startDoc: DesiredDoc;
  /** `from` relative to the store's version: mostly right, sometimes a gap or a redelivery. */
  fromOffset: number;
  ops: unknown[];
  digestChoice: 'intended' | 'current' | 'random';
  randomDigest: string;
}

const scenarioArb: fc.Arbitrary<Scenario> = fc.record({
  start: fc.integer({ min: 1, max: 6 }),
  startDoc: docArb,
  fromOffset: fc.constantFrom(0, 0, 0, 0, -1, -2, 1, 3),
  ops: fc.array(opArb, { maxLength: 4 }),
  digestChoice: fc.constantFrom('intended', 'intended', 'current', 'random'),
  randomDigest: fc.stringMatching(/^[0-9a-f]{64}$/),
});

/** Checks the all-or-nothing rule for one apply and returns its outcome. */
function applyAndCheck(dir: string, store: DesiredStore, msg: DesiredMessage): ApplyOutcome {
  const version = store.version;
  const before = store.doc;
  const bytes = bytesOf(dir);
  let out: ApplyOutcome | undefined;
  expect(() => (out = store.apply(msg))).not.toThrow();
  const o = out as ApplyOutcome;
  const target = msg.kind === 'full' ? msg.version : msg.to;
  if (target <= version) expect(o.outcome).toBe('stale');
  else if (msg.kind === 'patch' && msg.from !== version) expect(o).toEqual({ outcome: 'resync', reason: 'version-gap' });
  if (o.outcome === 'applied') {
    expect(store.version).toBe(target);
    expect(desiredDigest(store.doc)).toBe(msg.digest);
    expect(DesiredDoc.safeParse(store.doc).success).toBe(true);
    const onDisk: unknown = JSON.parse(readFileSync(file(dir), 'utf8'));
    expect(onDisk).toEqual({ version: target, digest: msg.digest, doc: JSON.parse(JSON.stringify(store.doc)) as unknown });
  } else {
    expect(store.version).toBe(version);
    expect(store.doc).toBe(before);
    expect(store.doc).toEqual(JSON.parse(JSON.stringify(before)));
    expect(bytesOf(dir)).toEqual(bytes);
  }
  const reopened = new DesiredStore(dir);
  expect(reopened.version).toBe(store.version);
  expect(desiredDigest(reopened.doc)).toBe(desiredDigest(store.doc));
  return o;
}

describe('DesiredStore properties', () => {
  it('a valid patch message either applies completely (digest matches doc) or leaves version, doc and file byte-identical', () => {
    const dir = freshDir();
    const seen = new Set<string>();
    fc.assert(
      fc.property(scenarioArb, (s) => {
        rmSync(file(dir), { force: true });
        const store = new DesiredStore(dir);
        expect(store.apply(full(s.start, s.startDoc)).outcome).toBe('applied');
        const digest =
          s.digestChoice === 'intended'
            ? (intendedDigest(s.startDoc, s.ops) ?? s.randomDigest)
            : s.digestChoice === 'current'
              ? desiredDigest(s.startDoc)
              : s.randomDigest;
        const decoded = decodeJson(DesiredMessage, encodeJson({ kind: 'patch', from: s.start + s.fromOffset, to: s.start + s.fromOffset + 1, digest, patch: s.ops }), MAX_PAYLOAD_BYTES.desired);
        fc.pre(decoded.ok);
        if (!decoded.ok) return;
        const out = applyAndCheck(dir, store, decoded.value);
        seen.add(out.outcome === 'resync' ? out.reason : out.outcome);
      }),
      { numRuns: 400 },
    );
    // The generator reaches every branch, or the property proves less than it claims.
    expect([...seen].sort()).toEqual(['applied', 'digest-mismatch', 'patch-failed', 'stale', 'version-gap']);
  });

  it('any sequence of valid messages keeps memory and disk in step', () => {
    const dir = freshDir();
    const msgArb = fc.oneof(
      fc.record({ kind: fc.constant('full'), version: fc.integer({ min: 1, max: 12 }), doc: docArb, good: fc.boolean() }),
      fc.record({ kind: fc.constant('patch'), from: fc.integer({ min: 1, max: 12 }), ops: fc.array(opArb, { maxLength: 3 }), good: fc.boolean() }),
    );
    fc.assert(
      fc.property(fc.array(msgArb, { minLength: 1, maxLength: 12 }), (msgs) => {
        rmSync(file(dir), { force: true });
        let store = new DesiredStore(dir);
        for (const m of msgs) {
          const raw =
            m.kind === 'full'
              ? { kind: 'full', version: m.version, digest: m.good ? desiredDigest(m.doc) : 'e'.repeat(64), doc: m.doc }
              : {
                  kind: 'patch',
                  from: m.from,
                  to: m.from + 1,
                  digest: (m.good ? intendedDigest(store.doc, m.ops) : null) ?? 'e'.repeat(64),
                  patch: m.ops,
                };
          const decoded = decodeJson(DesiredMessage, encodeJson(raw), MAX_PAYLOAD_BYTES.desired);
          if (!decoded.ok) continue;
          applyAndCheck(dir, store, decoded.value);
          // A restart between any two messages changes nothing.
          store = new DesiredStore(dir);
        }
      }),
      { numRuns: 100 },
    );
  });
});
