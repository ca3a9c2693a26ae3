/**
 * Signed manifests are outside input to the device: whatever arrives, decoding never throws, and a
 * manifest verifies only if it is exactly what a trusted key signed.
 */
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  MAX_MANIFEST_BYTES,
  Manifest,
  SignedManifest,
  decodeJson,
  endorseKey,
  isEdgefleetError,
  rawPublicKey,
  signManifest,
  verifySignedManifest,
  type ManifestInput,
} from '../../proto/index.js';
import { SlotState, newSlotState } from '../../agent/models/lifecycle.js';
import { ModelStore } from '../../agent/models/store.js';

const fleet = generateKeyPairSync('ed25519');
const trusted = [rawPublicKey(fleet.publicKey).toString('base64')];

const base: ManifestInput = {
  schema: 1,
  name: 'iris',
  version: 3,
  runtime: 'tfjs-layers',
  entry: 'model.json',
  files: [
    { path: 'model.json', sha256: 'a'.repeat(64), size: 1200 },
    { path: 'weights.bin', sha256: 'b'.repeat(64), size: 4096 },
  ],
  inputs: [{ name: 'features', dtype: 'float32', shape: [-1, 4], range: { min: 0, max: 10 } }],
  outputs: [{ name: 'probabilities', dtype: 'float32', shape: [-1, 3] }],
  golden: { vectors: [{ inputs: { features: { shape: [1, 4], data: [5.1, 3.5, 1.4, 0.2] } }, outputs: { probabilities: { shape: [1, 3], data: [0.9, 0.05, 0.05] } } }] },
  createdAt: 1_700_000_000_000,
  expiresAt: null,
};
const signed = signManifest(Manifest.parse(base), fleet.privateKey);
const text = JSON.stringify(signed);

function verifies(s: SignedManifest): boolean {
  try {
    verifySignedManifest(s, trusted);
    return true;
  } catch (e) {
    if (!isEdgefleetError(e) || e.code !== 'EF_SIGNATURE_INVALID') throw e;
    return false;
  }
}

/** A path to every leaf of a JSON value. */
function leaves(v: unknown, path: (string | number)[] = []): (string | number)[][] {
  if (v === null || typeof v !== 'object') return [path];
  return Object.entries(v).flatMap(([k, c]) => leaves(c, [...path, Array.isArray(v) ? Number(k) : k]));
}
const manifestLeaves = leaves((JSON.parse(text) as { manifest: unknown }).manifest).map((p) => ['manifest', ...p]);

describe('signed manifests as outside input', () => {
  it('the untouched manifest verifies, round-tripped through JSON', () => {
    const d = decodeJson(SignedManifest, Buffer.from(text), MAX_MANIFEST_BYTES);
    expect(d.ok && verifies(d.value)).toBe(true);
  });

  it('decoding arbitrary bytes or JSON never throws', () => {
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 2048 }), fc.jsonValue().map((j) => Buffer.from(JSON.stringify(j) ?? 'null'))), (bytes) => {
        const d = decodeJson(SignedManifest, Buffer.from(bytes), MAX_MANIFEST_BYTES);
        if (d.ok) verifies(d.value);
      }),
    );
  });

  it('changing any signed field, to anything that still decodes, breaks the signature', () => {
    let reached = 0;
    fc.assert(
      fc.property(fc.constantFrom(...manifestLeaves), fc.integer({ min: 1, max: 1000 }), fc.oneof(fc.integer(), fc.string({ maxLength: 8 }), fc.constant(null)), (path, delta, other) => {
        const copy = JSON.parse(text) as Record<string, unknown>;
        let at: Record<string | number, unknown> = copy;
        for (const k of path.slice(0, -1)) at = at[k] as Record<string | number, unknown>;
        const last = path[path.length - 1] as string | number;
        // Mostly a plausible edit of the same type (so it gets past decoding), sometimes anything.
        const was = at[last];
        const value = delta % 5 === 0 ? other : typeof was === 'number' ? was + delta : typeof was === 'string' ? was.slice(0, -1) + (was.endsWith('a') ? 'b' : 'a') : other;
        if (Object.is(was, value)) return;
        at[last] = value;
        const d = decodeJson(SignedManifest, Buffer.from(JSON.stringify(copy)), MAX_MANIFEST_BYTES);
        if (!d.ok) return; // refused before the signature is even looked at
        // A change the schema normalizes away (e.g. 1 and 1.0) is the same manifest.
        if (JSON.stringify(Manifest.parse(d.value.manifest)) === JSON.stringify(signed.manifest)) return;
        reached++;
        expect(verifies(d.value)).toBe(false);
      }),
      { numRuns: 300 },
    );
    // Most edits must get past decoding, or this says nothing about the signature.
    expect(reached).toBeGreaterThan(50);
  });

  it('a key chain only extends trust from a trusted key', () => {
    const rogue = generateKeyPairSync('ed25519');
    const next = generateKeyPairSync('ed25519');
    const byNext = signManifest(Manifest.parse(base), next.privateKey);
    // Endorsed by the fleet key: trusted, and the new key is learned.
    const good = { ...byNext, keyChain: [endorseKey(fleet.privateKey, rawPublicKey(next.publicKey), 1)] };
    expect(verifySignedManifest(good, trusted).learnedKeys).toEqual([rawPublicKey(next.publicKey).toString('base64')]);
    // Endorsed by a key nobody trusts, or no chain at all: refused.
    expect(verifies({ ...byNext, keyChain: [endorseKey(rogue.privateKey, rawPublicKey(next.publicKey), 1)] })).toBe(false);
    expect(verifies(byNext)).toBe(false);
  });
});

describe('slot state files', () => {
  it('whatever a slot file holds on disk, the store reads a valid state or nothing; it never throws', () => {
    const store = new ModelStore(mkdtempSync(join(tmpdir(), 'edgefleet-slots-')));
    const valid = JSON.stringify(newSlotState('iris'));
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 512 }).map((b) => Buffer.from(b)),
          fc.jsonValue().map((j) => Buffer.from(JSON.stringify(j) ?? '')),
          fc.nat({ max: valid.length }).map((n) => Buffer.from(valid.slice(0, n))), // a torn write
        ),
        (bytes) => {
          writeFileSync(join(store.root, 'slots', 'iris.json'), bytes);
          const read = store.loadSlot('iris', SlotState);
          if (read !== null) expect(SlotState.safeParse(read).success).toBe(true);
          if (bytes.toString() === valid) expect(read).toEqual(JSON.parse(valid));
        },
      ),
    );
    rmSync(join(store.root, '..'), { recursive: true, force: true });
  });
});
