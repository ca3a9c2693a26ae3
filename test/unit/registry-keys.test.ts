/** The fleet signing key: created once with mode 0600, reused, rotated with an endorsement chain old agents follow. */
import { generateKeyPairSync, createPublicKey } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { endorseKey, keyIdOf, rawPublicKey, signManifest, verifySignedManifest, type Manifest, type SignedManifest } from '../../proto/index.js';
import { FLEET_KEYS_FILE, FLEET_KEY_FILE, FLEET_PUBLIC_KEY_FILE, FleetKeyring, loadFleetKeys, rotateFleetKey } from '../../fleet-server/registry/keys.js';
import { cleanup, tempDir } from '../helpers/fleet.js';

afterAll(cleanup);

const manifest = (version: number): Manifest => ({
  schema: 1,
  name: 'iris',
  version,
  runtime: 'onnx',
  entry: 'model.onnx',
  files: [{ path: 'model.onnx', sha256: 'a'.repeat(64), size: 10 }],
  inputs: [{ name: 'x', dtype: 'float32', shape: [-1, 4] }],
  outputs: [{ name: 'y', dtype: 'float32', shape: [-1, 3] }],
  golden: { tolerance: { abs: 1e-4, rel: 1e-3 }, vectors: [] },
  health: {
    probationRequests: 50,
    probationSec: 60,
    latencyRatioMax: 2,
    latencySlackMs: 2,
    errorRateMax: 0.01,
    nanRateMax: 0,
    memoryGrowthMb: 64,
    psiMax: 0.25,
    watchWindowRequests: 500,
    afterCommit: 'report',
  },
  baseline: { inputs: {}, outputs: {} },
  lineage: { parent: null, method: 'upload' },
  createdAt: 1,
  expiresAt: null,
});

const pubOf = (dir: string): string => readFileSync(join(dir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim();

describe('fleet key', () => {
  it('is created on first start with mode 0600, published as raw base64, and reused after', () => {
    const dir = tempDir();
    const first = loadFleetKeys({ dataDir: dir }, 1000);
    expect(statSync(join(dir, FLEET_KEY_FILE)).mode & 0o777).toBe(0o600);
    expect(Buffer.from(pubOf(dir), 'base64')).toHaveLength(32);
    expect(pubOf(dir)).toBe(first.publicKey);
    expect(keyIdOf(first.publicKey)).toBe(first.keyId);
    expect(first.chain).toEqual([]);
    const again = loadFleetKeys({ dataDir: dir }, 2000);
    expect(again.keyId).toBe(first.keyId);
    expect(again.root).toEqual(first.root);
  });

  it('uses a configured key file, and refuses one that others can read', () => {
    const dir = tempDir();
    const keyFile = join(tempDir(), 'signing.pem');
    const key = generateKeyPairSync('ed25519').privateKey;
    writeFileSync(keyFile, key.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
    const loaded = loadFleetKeys({ dataDir: dir, keyFile }, 1);
    expect(loaded.publicKey).toBe(rawPublicKey(createPublicKey(key)).toString('base64'));
    expect(existsSync(join(dir, FLEET_KEY_FILE))).toBe(false);
    chmodSync(keyFile, 0o644);
    expect(() => loadFleetKeys({ dataDir: dir, keyFile }, 1)).toThrow(/readable by others/);
  });

  it('after rotation, an agent that trusts only the old key verifies new manifests and learns the new key', () => {
    const dir = tempDir();
    const ring = new FleetKeyring({ dataDir: dir }, () => 5);
    const oldPub = ring.current.publicKey;
    const { previous, current } = ring.rotate();
    expect(previous).toBe(keyIdOf(oldPub));
    expect(current.keyId).not.toBe(previous);
    expect(pubOf(dir)).toBe(current.publicKey);
    expect(statSync(join(dir, FLEET_KEY_FILE)).mode & 0o777).toBe(0o600);

    const signed = ring.sign(manifest(2));
    expect(signed.signature.keyId).toBe(current.keyId);
    expect(signed.keyChain).toHaveLength(1);
    expect(verifySignedManifest(signed, [oldPub]).learnedKeys).toEqual([current.publicKey]);
    // A second rotation: the root still reaches the newest key through two links.
    ring.rotate();
    const later = ring.sign(manifest(3));
    expect(later.keyChain).toHaveLength(2);
    expect(() => verifySignedManifest(later, [oldPub])).not.toThrow();
    // A restart signs with the same (newest) key and chain.
    const reloaded = loadFleetKeys({ dataDir: dir }, 9);
    expect(reloaded.keyId).toBe(ring.current.keyId);
    expect(reloaded.chain).toEqual(ring.current.chain);
    expect(reloaded.root.publicKey).toBe(oldPub);
  });

  it('refuses a chain link signed by a key the agent does not trust', () => {
    const dir = tempDir();
    const trusted = loadFleetKeys({ dataDir: dir }, 1).publicKey;
    const attacker = generateKeyPairSync('ed25519').privateKey;
    const mallory = generateKeyPairSync('ed25519').privateKey;
    const malloryRaw = rawPublicKey(createPublicKey(mallory));
    // Endorsed by a key nobody trusts: the link is not followed, so the signer stays unknown.
    const byStranger: SignedManifest = signManifest(manifest(1), mallory, [endorseKey(attacker, malloryRaw, 1)]);
    expect(() => verifySignedManifest(byStranger, [trusted])).toThrow(/does not trust/);
    // Claims the trusted key endorsed it, but the signature is the attacker's.
    const forged = endorseKey(attacker, malloryRaw, 1);
    forged.endorsedBy = keyIdOf(trusted);
    expect(() => verifySignedManifest(signManifest(manifest(1), mallory, [forged]), [trusted])).toThrow(/does not verify/);
  });

  it('finishes a rotation cut off after the history named the new key, and drops one cut off before', () => {
    const dir = tempDir();
    const before = loadFleetKeys({ dataDir: dir }, 1);
    const keyFile = join(dir, FLEET_KEY_FILE);
    const historyFile = join(dir, FLEET_KEYS_FILE);
    const oldKeyPem = readFileSync(keyFile);
    const rotated = rotateFleetKey({ dataDir: dir }, 2);
    // Replay the crash: the new key still at .next, the old one in place, the history already updated.
    renameSync(keyFile, `${keyFile}.next`);
    writeFileSync(keyFile, oldKeyPem, { mode: 0o600 });
    expect(loadFleetKeys({ dataDir: dir }, 3).keyId).toBe(rotated.keyId);
    expect(existsSync(`${keyFile}.next`)).toBe(false);

    // A .next the history does not name: the rotation never happened.
    const stray = generateKeyPairSync('ed25519').privateKey;
    writeFileSync(`${keyFile}.next`, stray.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
    expect(loadFleetKeys({ dataDir: dir }, 4).keyId).toBe(rotated.keyId);
    expect(existsSync(`${keyFile}.next`)).toBe(false);
    expect((JSON.parse(readFileSync(historyFile, 'utf8')) as { root: { keyId: string } }).root.keyId).toBe(before.keyId);
  });

  it('refuses a key file swapped for one the history does not know', () => {
    const dir = tempDir();
    loadFleetKeys({ dataDir: dir }, 1);
    const other = generateKeyPairSync('ed25519').privateKey;
    writeFileSync(join(dir, FLEET_KEY_FILE), other.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
    expect(() => loadFleetKeys({ dataDir: dir }, 2)).toThrow(/neither the root/);
  });
});
