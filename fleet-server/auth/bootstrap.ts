import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../../common/files.js';
import type { FleetStore } from '../store/types.js';
import { generateSecret, hashSecret, verifySecret } from './credentials.js';

/** The local CLI profile: where `edgefleet` finds the broker and its operator credential. */
export interface CliProfile {
  url: string;
  username: string;
  password: string;
}

export const CLI_PROFILE_FILE = 'cli.json';
export const FLEET_SECRET_FILE = 'fleet.secret';

/**
 * The fleet server's own broker identity. Its secret lives in <dataDir>/fleet.secret (0600); if the
 * file is missing or does not match the stored hash, a new secret replaces both.
 */
export function ensureFleetIdentity(store: FleetStore, dataDir: string, name: string, now: number): string {
  const file = join(dataDir, FLEET_SECRET_FILE);
  const existing = existsSync(file) ? readFileSync(file, 'utf8').trim() : null;
  const row = store.principals.get(name);
  if (row && existing && verifySecret(existing, row.secretHash)) return existing;
  const secret = generateSecret();
  writeFileAtomic(file, secret + '\n', 0o600);
  if (row) store.principals.setSecret(name, hashSecret(secret));
  else store.principals.insert({ name, kind: 'fleet', role: null, secretHash: hashSecret(secret), createdAt: now });
  return secret;
}

/**
 * On a fleet with no operator yet: an `admin` operator and a CLI profile (<dataDir>/cli.json, 0600)
 * so that the `edgefleet` CLI run from the folder above works without flags. On later starts, the
 * profile's URL follows the broker (an embedded broker may have bound another port).
 * Returns true when the admin was created.
 */
export function ensureBootstrapOperator(store: FleetStore, dataDir: string, url: string, now: number): boolean {
  const file = join(dataDir, CLI_PROFILE_FILE);
  if (store.principals.list('operator').length > 0) {
    if (existsSync(file)) {
      const profile = JSON.parse(readFileSync(file, 'utf8')) as CliProfile;
      if (profile.url !== url) writeFileAtomic(file, JSON.stringify({ ...profile, url }, null, 2) + '\n', 0o600);
    }
    return false;
  }
  const password = generateSecret();
  store.principals.insert({ name: 'admin', kind: 'operator', role: 'admin', secretHash: hashSecret(password), createdAt: now });
  const profile: CliProfile = { url, username: 'admin', password };
  writeFileAtomic(file, JSON.stringify(profile, null, 2) + '\n', 0o600);
  return true;
}
