import { existsSync, readFileSync } from 'node:fs';
import { z } from 'zod';
import { isEdgefleetError } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';
import { OpsClient } from '../ops-client.js';
import type { Profile } from '../cli/profile.js';

/**
 * Credentials for simulated devices on a fleet's own broker, which authenticates every device:
 * provisioned through the operator channel (`devices.add`) like any device, and cached in a file
 * (mode 0600) so the next run reuses them instead of provisioning again.
 */

const Credential = z.object({ username: z.string(), password: z.string(), brokerUrl: z.string() });
export type DeviceCredential = z.infer<typeof Credential>;

/** Which fleet the credentials belong to, so a cache from another fleet is not offered to this one. */
const CacheFile = z.object({ fleetUrl: z.string(), devices: z.record(z.string(), Credential) });
type CacheFile = z.infer<typeof CacheFile>;

export interface ProvisionOptions {
  profile: Profile;
  ids: readonly string[];
  cacheFile: string;
  /** Tags for new devices, and added to cached ones. */
  tags: readonly string[];
  /** Versions the simulated devices start out holding: new devices get them in desired state too. */
  models: Readonly<Record<string, number>>;
  /** ops calls in flight at once. */
  concurrency?: number;
  progress?: (done: number, total: number) => void;
}

/** Flushes the cache every this many new devices, so an interrupted run keeps most of its work. */
const FLUSH_EVERY = 100;

function readCache(file: string, fleetUrl: string): CacheFile {
  if (!existsSync(file)) return { fleetUrl, devices: {} };
  try {
    const parsed = CacheFile.safeParse(JSON.parse(readFileSync(file, 'utf8')));
    if (parsed.success && parsed.data.fleetUrl === fleetUrl) return parsed.data;
  } catch {
    // unreadable: provision again
  }
  return { fleetUrl, devices: {} };
}

export async function provisionDevices(opts: ProvisionOptions): Promise<Record<string, DeviceCredential>> {
  const cache = readCache(opts.cacheFile, opts.profile.url);
  const missing = opts.ids.filter((id) => !cache.devices[id]);
  const known = opts.ids.filter((id) => cache.devices[id]);
  if (missing.length === 0 && opts.tags.length === 0) return cache.devices;
  const client = await OpsClient.connect({ ...opts.profile, timeoutMs: 30_000 });
  const save = (): void => writeFileAtomic(opts.cacheFile, JSON.stringify(cache, null, 2) + '\n', 0o600);
  let done = 0;
  try {
    if (opts.tags.length > 0 && known.length > 0) await client.call('devices.tag', { deviceIds: known, add: [...opts.tags], remove: [] });
    const patch = Object.entries(opts.models).map(([name, version]) => ({ op: 'add' as const, path: `/models/${name}`, value: { version } }));
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < missing.length) {
        const id = missing[next++] as string;
        cache.devices[id] = await addDevice(client, id, opts.tags);
        // A device holding a version the fleet does not name would drop it on its first desired state.
        if (patch.length > 0) await client.call('desired.set', { deviceId: id, patch });
        done += 1;
        opts.progress?.(done, missing.length);
        if (done % FLUSH_EVERY === 0) save();
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(opts.concurrency ?? 16, missing.length)) }, worker));
  } finally {
    if (done > 0) save();
    await client.close();
  }
  return cache.devices;
}

/** `devices.add`; a device the fleet already knows (its credential not in our cache) is replaced. */
async function addDevice(client: OpsClient, deviceId: string, tags: readonly string[]): Promise<DeviceCredential> {
  const params = tags.length > 0 ? { deviceId, tags: [...tags] } : { deviceId };
  try {
    return (await client.call('devices.add', params)).credential;
  } catch (e) {
    if (!isEdgefleetError(e) || e.code !== 'EF_DEVICE_EXISTS') throw e;
    await client.call('devices.remove', { deviceId });
    return (await client.call('devices.add', params)).credential;
  }
}
