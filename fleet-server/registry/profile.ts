import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../../common/files.js';
import { CLI_PROFILE_FILE } from '../auth/bootstrap.js';

/**
 * Adds the artifact server's URL to the local CLI profile (<dataDir>/cli.json), so that `edgefleet
 * model publish` finds where to upload; rewritten only when it changed (a port of 0 binds anew on
 * every start). A fleet without a profile (operators made elsewhere) is left alone.
 */
export function setProfileArtifactsUrl(dataDir: string, artifactsUrl: string): void {
  const file = join(dataDir, CLI_PROFILE_FILE);
  if (!existsSync(file)) return;
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  if (profile.artifactsUrl === artifactsUrl) return;
  writeFileAtomic(file, JSON.stringify({ ...profile, artifactsUrl }, null, 2) + '\n', 0o600);
}
