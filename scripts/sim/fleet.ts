import { EventEmitter } from 'node:events';
import { EdgefleetError } from '../../proto/index.js';
import { SimDevice, type SimDeviceSnapshot, type SimEvents } from './device.js';
import type { RawEcho } from './link.js';
import { SimLearning, type SimLearningOptions } from './learner.js';
import { DEFAULT_TIMING, DeviceProfile, assignRules, prng, stableHash, type Scenario, type SimTiming } from './scenario.js';

/**
 * A fleet of simulated devices in one process, each a real MQTT connection speaking the device
 * protocol (scripts/sim/device.ts). Tests, the rollout benchmark and operators rehearsing a plan
 * drive it; the fleet server on the other side cannot tell it from real agents, except by the
 * `agentVersion` in their status and the facts and telemetry they never send.
 */

export type { DisconnectCause, SimDeviceSnapshot, SimEvents } from './device.js';
export { BEHAVIOURS, DEFAULT_TIMING, deviceIds, parseRuleSpec } from './scenario.js';
export type { Behaviour, MetricsProfile, Scenario, ScenarioRule, SimTiming } from './scenario.js';
export { FL_DATASETS, type FlActivity, type FlDataset, type SimLearningOptions } from './learner.js';

export interface RawEchoOptions {
  /** Where a device receives the benchmark's message; default `bench/raw/{deviceId}`. */
  request?: (deviceId: string) => string;
  /** Where it replies; default `bench/raw/{deviceId}/r`. */
  reply?: (deviceId: string) => string;
  /** Only the echo: no will, status, desired state or reports (default false: the echo beside the protocol). */
  only?: boolean;
}

export const DEFAULT_RAW_TOPICS = {
  request: (deviceId: string): string => `bench/raw/${deviceId}`,
  reply: (deviceId: string): string => `bench/raw/${deviceId}/r`,
} as const;

export interface SimFleetOptions {
  url: string;
  scenario: Scenario;
  /** Per device id; absent: username = device id, no password (an anonymous broker). */
  credentials?: Record<string, { username: string; password: string }>;
  /** Connections opened at once by start(); default 100. */
  connectConcurrency?: number;
  protocolVersion?: 4 | 5;
  /** Default 300: a long keepalive, so 10,000 idle devices cost the broker little. */
  keepaliveSec?: number;
  probationMs?: number;
  reportIntervalMs?: number;
  timing?: Partial<SimTiming>;
  /** Versions every device starts out holding, committed, as if installed earlier. */
  initial?: { models: Record<string, number> };
  /**
   * Each device also answers a bare echo (QoS 1 in, QoS 1 out, nothing else done): the floor a
   * rollout's round trip is compared with.
   */
  raw?: boolean | RawEchoOptions;
  /** start() gives up after this long; default 120 s. */
  startTimeoutMs?: number;
  /**
   * Federated learning: every device holds a shard of a dataset as its samples and takes part in
   * the fleet's rounds with the agent's own Participant. Needs `credentials` (the devices fetch
   * the base's files from the fleet's artifact server with them).
   */
  learning?: SimLearningOptions;
}

export interface SlotCounts {
  /** Devices serving each version; `none` when the slot is missing or empty. */
  serving: Record<string, number>;
  downloading: number;
  probation: number;
}

export interface FleetStatus {
  devices: number;
  online: number;
  connected: number;
  restarting: number;
  desiredVersions: { min: number; max: number };
  models: Record<string, SlotCounts>;
}

const DEFAULT_CONCURRENCY = 100;

export class SimFleet extends EventEmitter<SimEvents> {
  readonly ids: readonly string[];
  private readonly devices = new Map<string, SimDevice>();
  private started = false;
  private stopped = false;
  private readonly learning: SimLearning | null;

  constructor(private readonly opts: SimFleetOptions) {
    super();
    // Callers may well listen once per device they watch; Node's leak warning at 10 means nothing here.
    this.setMaxListeners(0);
    const timing: SimTiming = { ...DEFAULT_TIMING, ...opts.timing };
    if (opts.probationMs !== undefined) timing.probationMs = opts.probationMs;
    if (opts.reportIntervalMs !== undefined) timing.reportIntervalMs = opts.reportIntervalMs;
    const rules = assignRules(opts.scenario);
    const seed = opts.scenario.seed ?? 'edgefleet-sim';
    const initial = opts.initial?.models ?? {};
    const raw = opts.raw === true ? {} : opts.raw || null;
    if (opts.learning && !opts.credentials) throw new RangeError('federated learning needs device credentials: the devices fetch model files from the fleet with them');
    this.learning = opts.learning ? new SimLearning(opts.learning, [...rules.keys()]) : null;
    for (const [id, deviceRules] of rules) {
      const random = prng(stableHash(`${seed}/timing`, id));
      const cred = opts.credentials?.[id];
      const echo: RawEcho | null = raw
        ? { request: (raw.request ?? DEFAULT_RAW_TOPICS.request)(id), reply: (raw.reply ?? DEFAULT_RAW_TOPICS.reply)(id), only: raw.only ?? false }
        : null;
      this.devices.set(
        id,
        new SimDevice({
          id,
          url: opts.url,
          username: cred?.username ?? id,
          password: cred?.password,
          protocolVersion: opts.protocolVersion ?? 4,
          keepaliveSec: opts.keepaliveSec ?? 300,
          timing,
          profile: new DeviceProfile(deviceRules, initial, timing, random),
          initial,
          raw: echo,
          random,
          noise: prng(stableHash(`${seed}/noise`, id)),
          events: this,
          learning: this.learning,
        }),
      );
    }
    this.ids = [...this.devices.keys()];
  }

  /**
   * Connects every device not scripted `offline`, at most connectConcurrency at once; resolves when
   * all are connected and subscribed. Rejects when the broker refuses one or the timeout passes;
   * call stop() then, as after any start.
   */
  async start(): Promise<void> {
    if (this.started) throw new Error('SimFleet.start: already started');
    this.started = true;
    await this.learnBaseSha256();
    const targets = [...this.devices.values()].filter((d) => d.online);
    const timeoutMs = this.opts.startTimeoutMs ?? 120_000;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const missing = targets.filter((d) => !d.connected).length;
        reject(new EdgefleetError('EF_TIMEOUT', `${missing} of ${targets.length} devices not connected after ${timeoutMs} ms`));
      }, timeoutMs);
    });
    try {
      await Promise.race([eachLimited(targets, this.opts.connectConcurrency ?? DEFAULT_CONCURRENCY, (d) => d.connect(), () => this.stopped), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Ends every device: each says `offline` (clearRetained: leaves no retained status) and disconnects cleanly. */
  async stop(opts: { clearRetained?: boolean } = {}): Promise<void> {
    this.stopped = true;
    this.learning?.close();
    const results = await Promise.allSettled([...this.devices.values()].map((d) => d.stop(opts.clearRetained ?? false)));
    const failed = results.filter((r) => r.status === 'rejected').length;
    if (failed > 0) throw new Error(`SimFleet.stop: ${failed} devices did not close cleanly`);
  }

  /** Offline: the link drops abruptly (the broker publishes the will), the device keeps running. Online: connects. */
  setOnline(id: string, online: boolean): Promise<void> {
    return this.get(id).setOnline(online);
  }

  device(id: string): SimDeviceSnapshot {
    return this.get(id).snapshot();
  }

  /** How many devices serve each version of `model` (`none`: not at all), connected or not. */
  counts(model: string): Record<string, number> {
    const out: Record<string, number> = {};
    for (const d of this.devices.values()) {
      const key = String(d.serving(model) ?? 'none');
      out[key] = (out[key] ?? 0) + 1;
    }
    return out;
  }

  status(): FleetStatus {
    const s: FleetStatus = { devices: this.devices.size, online: 0, connected: 0, restarting: 0, desiredVersions: { min: Infinity, max: 0 }, models: {} };
    for (const d of this.devices.values()) {
      if (d.online) s.online += 1;
      if (d.connected) s.connected += 1;
      if (d.restarting) s.restarting += 1;
      s.desiredVersions.min = Math.min(s.desiredVersions.min, d.desiredVersion);
      s.desiredVersions.max = Math.max(s.desiredVersions.max, d.desiredVersion);
      for (const m of d.slotSummary()) {
        const c = (s.models[m.model] ??= { serving: {}, downloading: 0, probation: 0 });
        const key = String(m.active ?? 'none');
        c.serving[key] = (c.serving[key] ?? 0) + 1;
        if (m.state === 'downloading') c.downloading += 1;
        if (m.state === 'probation') c.probation += 1;
      }
    }
    if (s.devices === 0) s.desiredVersions.min = 0;
    return s;
  }

  /**
   * Resolves once `predicate` holds, checking now and then every `pollMs`; rejects after
   * `timeoutMs` with the fleet's status in the message.
   */
  waitFor(predicate: (fleet: SimFleet) => boolean, timeoutMs: number, pollMs = 25): Promise<void> {
    return new Promise((resolve, reject) => {
      const started = Date.now();
      const check = (): void => {
        let ok: boolean;
        try {
          ok = predicate(this);
        } catch (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
          return;
        }
        if (ok) resolve();
        else if (Date.now() - started >= timeoutMs) reject(new EdgefleetError('EF_TIMEOUT', `SimFleet.waitFor: not true after ${timeoutMs} ms; ${JSON.stringify(this.status())}`));
        else setTimeout(check, pollMs);
      };
      check();
    });
  }

  /** Samples per device for the learning model (smallest, largest, total); null without federated learning. */
  samples(): { model: string; min: number; max: number; total: number } | null {
    return this.learning ? { model: this.learning.model, ...this.learning.sampleRange() } : null;
  }

  /**
   * With federated learning, the devices starting out on a version of the learning model report
   * its real manifest sha256, fetched from the fleet, instead of the stand-in: the fleet invites
   * only devices serving exactly the base.
   */
  private async learnBaseSha256(): Promise<void> {
    const learning = this.learning;
    const version = learning ? this.opts.initial?.models[learning.model] : undefined;
    if (!learning || version === undefined) return;
    const first = this.ids[0];
    const cred = first === undefined ? undefined : this.opts.credentials?.[first];
    if (!cred) return;
    const { sha256 } = await learning.cache.manifest(learning.model, version, cred);
    for (const d of this.devices.values()) d.learnSha256(learning.model, version, sha256);
  }

  private get(id: string): SimDevice {
    const d = this.devices.get(id);
    if (!d) throw new RangeError(`no simulated device ${JSON.stringify(id)}`);
    return d;
  }
}

/** Runs `fn` over `items`, at most `limit` at a time; stops launching on the first failure or when `halt` says so. */
async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>, halt: () => boolean): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && !halt() && next < items.length) {
      const item = items[next++] as T;
      try {
        await fn(item);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
}
