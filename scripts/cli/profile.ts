import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { EdgefleetError } from '../../proto/index.js';

export interface Profile {
  url: string;
  username: string;
  password: string;
  /** The fleet's artifact server, where `model publish` uploads; absent in profiles of older fleets. */
  artifactsUrl?: string | undefined;
  source: string;
}

/**
 * Where the CLI finds its broker and operator credential, first match wins per field:
 * flags (--url, --user, --password, --artifacts-url), environment (EDGEFLEET_URL, EDGEFLEET_USER,
 * EDGEFLEET_PASSWORD, EDGEFLEET_ARTIFACTS_URL), then a profile file: --profile, EDGEFLEET_PROFILE, or ./data/cli.json (the
 * one `npm start` and a default fleet server write).
 */
export function resolveProfile(
  flags: { profile?: string | undefined; url?: string | undefined; user?: string | undefined; password?: string | undefined; 'artifacts-url'?: string | undefined },
  env = process.env,
): Profile {
  const file = flags.profile ?? env.EDGEFLEET_PROFILE ?? (existsSync('data/cli.json') ? 'data/cli.json' : undefined);
  let fromFile: Partial<Profile> = {};
  if (file !== undefined) {
    try {
      fromFile = JSON.parse(readFileSync(file, 'utf8')) as Partial<Profile>;
    } catch (e) {
      throw new EdgefleetError('EF_CONFIG_INVALID', `cannot read profile ${file}: ${(e as Error).message}`);
    }
  }
  const url = flags.url ?? env.EDGEFLEET_URL ?? fromFile.url;
  const username = flags.user ?? env.EDGEFLEET_USER ?? fromFile.username;
  const password = flags.password ?? env.EDGEFLEET_PASSWORD ?? fromFile.password;
  if (!url || !username || !password) {
    throw new EdgefleetError(
      'EF_CONFIG_INVALID',
      'no operator credentials: run from the folder holding data/cli.json, or give --profile <file>, or --url/--user/--password (or EDGEFLEET_URL/EDGEFLEET_USER/EDGEFLEET_PASSWORD)',
    );
  }
  const artifactsUrl = flags['artifacts-url'] ?? env.EDGEFLEET_ARTIFACTS_URL ?? fromFile.artifactsUrl;
  return { url, username, password, artifactsUrl, source: file ? resolve(file) : 'flags/environment' };
}
