import { hostname } from 'node:os';
import si from 'systeminformation';
import type { FactsMessage } from '../../proto/index.js';
import type { RuntimeInfo } from '../runtime/backends.js';

async function settle<T>(p: Promise<T>, fallback: T, timeoutMs: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<T>((resolve) => (timer = setTimeout(() => resolve(fallback), timeoutMs)))]);
  } catch {
    return fallback;
  } finally {
    clearTimeout(timer);
  }
}

const clip = (s: string | undefined | null, n: number): string => (s ?? '').slice(0, n);

/**
 * What this device is: board, OS, CPU, memory, disks and temperature (where the hardware has a
 * sensor: null otherwise). Each probe has its own time limit; a probe that fails leaves its field
 * empty rather than holding up the report.
 */
export async function collectFacts(agentVersion: string, runtimes: RuntimeInfo, timeoutMs = 5000): Promise<FactsMessage> {
  const [system, os, cpu, mem, disks, temp] = await Promise.all([
    settle(si.system(), null, timeoutMs),
    settle(si.osInfo(), null, timeoutMs),
    settle(si.cpu(), null, timeoutMs),
    settle(si.mem(), null, timeoutMs),
    settle(si.fsSize(), [], timeoutMs),
    settle(si.cpuTemperature(), null, timeoutMs),
  ]);
  const t = temp?.main;
  return {
    collectedAt: Date.now(),
    hostname: clip(hostname(), 255),
    agentVersion: clip(agentVersion, 64),
    node: clip(process.version, 64),
    os: {
      platform: clip(os?.platform ?? process.platform, 64),
      distro: clip(os?.distro, 128),
      release: clip(os?.release, 128),
      kernel: clip(os?.kernel, 128),
      arch: clip(os?.arch ?? process.arch, 32),
    },
    board: { manufacturer: clip(system?.manufacturer, 128), model: clip(system?.model, 128) },
    cpu: { brand: clip(cpu?.brand, 128), cores: cpu?.cores ?? 0, speedGHz: cpu?.speed ?? null },
    memory: { totalBytes: mem?.total ?? 0, availableBytes: mem?.available ?? 0 },
    disks: disks.slice(0, 64).map((d) => ({ mount: clip(d.mount, 255), sizeBytes: d.size, usedBytes: d.used })),
    temperatureC: typeof t === 'number' && Number.isFinite(t) && t > -100 && t < 250 ? t : null,
  runtimes,
  };
}
