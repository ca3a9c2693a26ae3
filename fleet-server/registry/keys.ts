import { generateKeyPairSync, createPublicKey, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import {
  EdgefleetError,
  KeyEndorsement,
  endorseKey,
  keyIdOf,
  privateKeyFromPem,
  rawPublicKey,
  signManifest,
  type Manifest,
  type SignedManifest,
} from '../../proto/index.js';
import { fsyncDir, writeFileAtomic } from '../../common/files.js';

/**
 * The fleet signing key (Ed25519) and its history.
 *
 * - `<dataDir>/fleet-key.pem` (or `signing.keyFile`): the current private key, mode 0600, created on
 *   first start.
 * - `<dataDir>/fleet-key.pub`: the current public key, raw 32 bytes in base64: what a new agent is
 *   provisioned to trust.
 * - `<dataDir>/fleet-keys.json`: the root (the first key) and the chain of endorsements from it to
 *   the current key. Every manifest carries that chain, so an agent provisioned with any earlier key
 *   learns the newer ones (proto/model.ts `verifySignedManifest`). Old private keys are not kept.
 *
 * Rotation is the `keys.rotate` admin method (`edgefleet key rotate`): it runs inside the server
 * that holds the key, so there is no second writer to race with, and it is audited like any other
 * operator request. `rotateFleetKey` is the same step for a stopped fleet (tests, recovery scripts).
 */
export const FLEET_KEY_FILE = 'fleet-key.pem';
export const FLEET_PUBLIC_KEY_FILE = 'fleet-key.pub';
export const FLEET_KEYS_FILE = 'fleet-keys.json';

const PublicKeyRecord = z.object({ keyId: z.string().regex(/^[0-9a-f]{16}$/), publicKey: z.string(), createdAt: z.number().int().min(0) }).strict();
export type PublicKeyRecord = z.infer<typeof PublicKeyRecord>;

const KeysFile = z.object({ version: z.literal(1), root: PublicKeyRecord, chain: z.array(KeyEndorsement).max(32) }).strict();
type KeysFile = z.infer<typeof KeysFile>;

export interface FleetKeys {
  privateKey: KeyObject;
  keyId: string;
  /** Raw public key, base64. */
  publicKey: string;
  root: PublicKeyRecord;
  /** Endorsements from the root to this key; empty when this key is the root. */
  chain: KeyEndorsement[];
}

export interface KeyLocation {
  dataDir: string;
  /** Default `<dataDir>/fleet-key.pem`. */
  keyFile?: string | undefined;
}

const keyFileOf = (loc: KeyLocation): string => loc.keyFile ?? join(loc.dataDir, FLEET_KEY_FILE);

function readPrivateKey(file: string): KeyObject {
  const mode = statSync(file).mode & 0o777;
  if ((mode & 0o077) !== 0) {
    // Like ssh: a signing key others can read is refused, never silently used.
    throw new EdgefleetError('EF_CONFIG_INVALID', `fleet key ${file} is readable by others (mode ${mode.toString(8)}); chmod 600 it`);
  }
  return privateKeyFromPem(readFileSync(file, 'utf8'));
}

function writePrivateKey(file: string, key: KeyObject): void {
  writeFileAtomic(file, key.export({ format: 'pem', type: 'pkcs8' }), 0o600);
}

function publicOf(key: KeyObject): string {
  return rawPublicKey(createPublicKey(key)).toString('base64');
}

function readKeysFile(path: string): KeysFile | null {
  if (!existsSync(path)) return null;
  const parsed = KeysFile.safeParse(JSON.parse(readFileSync(path, 'utf8')));
  if (!parsed.success) throw new EdgefleetError('EF_CONFIG_INVALID', `${path} is not a fleet key history`);
  return parsed.data;
}

function writeKeysFile(path: string, k: KeysFile): void {
  writeFileAtomic(path, JSON.stringify(k, null, 2) + '\n', 0o600);
}

/** The endorsements from the root up to `keyId`, or null when the history does not reach it. */
function chainTo(k: KeysFile, keyId: string): KeyEndorsement[] | null {
  if (k.root.keyId === keyId) return [];
  const i = k.chain.findIndex((e) => e.keyId === keyId);
  return i < 0 ? null : k.chain.slice(0, i + 1);
}

function writePublicFile(dataDir: string, publicKey: string): void {
  const file = join(dataDir, FLEET_PUBLIC_KEY_FILE);
  if (existsSync(file) && readFileSync(file, 'utf8').trim() === publicKey) return;
  writeFileAtomic(file, publicKey + '\n', 0o644);
}

/**
 * Loads the fleet key, creating it (and its history) on first start. Finishes a rotation that a
 * crash interrupted: the new key is written to `<keyFile>.next` before the history names it, and
 * moved over the key file after, so on start either the history does not name `.next` (the
 * rotation never happened: it is dropped) or it does (the move is completed).
 */
export function loadFleetKeys(loc: KeyLocation, now: number): FleetKeys {
  const keyFile = keyFileOf(loc);
  const next = `${keyFile}.next`;
  const historyFile = join(loc.dataDir, FLEET_KEYS_FILE);
  let history = readKeysFile(historyFile);

  if (existsSync(next)) {
    const pending = readPrivateKey(next);
    if (history && history.chain.at(-1)?.keyId === keyIdOf(publicOf(pending))) {
      renameSync(next, keyFile);
      fsyncDir(dirname(keyFile));
    } else {
      rmSync(next, { force: true });
    }
  }

  if (!existsSync(keyFile)) {
    if (history) {
      throw new EdgefleetError(
        'EF_CONFIG_INVALID',
        `fleet key ${keyFile} is missing but ${historyFile} records key ${history.chain.at(-1)?.keyId ?? history.root.keyId}: ` +
          'restore the key file, or remove the history to start a new trust root (devices will then refuse new manifests)',
      );
    }
    writePrivateKey(keyFile, generateKeyPairSync('ed25519').privateKey);
  }

  const privateKey = readPrivateKey(keyFile);
  const publicKey = publicOf(privateKey);
  const keyId = keyIdOf(publicKey);
  if (!history) {
    history = { version: 1, root: { keyId, publicKey, createdAt: now }, chain: [] };
    writeKeysFile(historyFile, history);
  }
  const chain = chainTo(history, keyId);
  if (chain === null) {
    throw new EdgefleetError(
      'EF_CONFIG_INVALID',
      `fleet key ${keyId} (${keyFile}) is neither the root of ${historyFile} nor endorsed in it: ` +
        'rotate keys with `edgefleet key rotate` instead of replacing the file, or remove the history to start a new trust root',
    );
  }
  writePublicFile(loc.dataDir, publicKey);
  return { privateKey, keyId, publicKey, root: history.root, chain };
}

/**
 * Replaces the fleet key with a new one that the old one endorses. Later manifests are signed with
 * the new key and carry the chain; the old public key stays in the history, the old private key
 * is gone once this returns.
 */
export function rotateFleetKey(loc: KeyLocation, now: number): FleetKeys {
  const current = loadFleetKeys(loc, now);
  const keyFile = keyFileOf(loc);
  const historyFile = join(loc.dataDir, FLEET_KEYS_FILE);
  const history = readKeysFile(historyFile) as KeysFile;
  if (current.chain.length >= 32) {
    throw new EdgefleetError('EF_CONFIG_INVALID', 'the key chain is at its limit of 32 endorsements; start a new trust root and re-provision devices');
  }
  const fresh = generateKeyPairSync('ed25519').privateKey;
  const freshRaw = rawPublicKey(createPublicKey(fresh));
  const endorsement = endorseKey(current.privateKey, freshRaw, now);
  // 1. the new key beside the old; 2. the history names it; 3. it replaces the old. See loadFleetKeys.
  writePrivateKey(`${keyFile}.next`, fresh);
  writeKeysFile(historyFile, { ...history, chain: [...current.chain, endorsement] });
  renameSync(`${keyFile}.next`, keyFile);
  fsyncDir(dirname(keyFile));
  writePublicFile(loc.dataDir, endorsement.publicKey);
  return { privateKey: fresh, keyId: endorsement.keyId, publicKey: endorsement.publicKey, root: history.root, chain: [...current.chain, endorsement] };
}

/** The key the running fleet signs with; `rotate` swaps it for every later signature. */
export class FleetKeyring {
  private keys: FleetKeys;

  constructor(
    private readonly loc: KeyLocation,
    private readonly now: () => number = Date.now,
  ) {
    this.keys = loadFleetKeys(loc, now());
  }

  get current(): Readonly<FleetKeys> {
    return this.keys;
  }

  sign(m: Manifest): SignedManifest {
    return signManifest(m, this.keys.privateKey, [...this.keys.chain]);
  }

  rotate(): { previous: string; current: FleetKeys } {
    const previous = this.keys.keyId;
    this.keys = rotateFleetKey(this.loc, this.now());
    return { previous, current: this.keys };
  }
}
