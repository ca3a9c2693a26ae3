/**
 * The fleet simulator (scripts/sim) against the machine's Mosquitto at 127.0.0.1:1883: simulated
 * devices are real MQTT connections, so this test plays the fleet's side by hand. It publishes
 * desired documents (retained, as the fleet does) and reads what the devices publish through the
 * proto schemas, so a device that spoke anything but the contract would fail here. Device ids carry
 * a random prefix (suites share the broker), and every retained message is cleared at the end.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import {
  DesiredDoc,
  MAX_PAYLOAD_BYTES,
  ReportedMessage,
  ResyncMessage,
  StatusMessage,
  decodeJson,
  desiredDigest,
  encodeJson,
  parseTopic,
  topics,
  type DesiredMessage,
} from '../../proto/index.js';
import { SimFleet, type SimFleetOptions } from '../../scripts/sim/fleet.js';
import { assignRules, deviceIds, parseRuleSpec } from '../../scripts/sim/scenario.js';

const BROKER = process.env.EDGEFLEET_TEST_BROKER_URL ?? 'mqtt://127.0.0.1:1883';
const probe = (url: string): Promise<boolean> =>
  mqtt
    .connectAsync(url, { clientId: `probe-${randomBytes(4).toString('hex')}`, reconnectPeriod: 0, connectTimeout: 3000 })
    .then((c) => c.endAsync().then(() => true))
    .catch(() => false);
const reachable = await probe(BROKER);
const mosquittoInstalled = spawnSync('mosquitto', ['-h'], { stdio: 'ignore' }).error === undefined;

/**
 * A Mosquitto of this suite's own, on a free port, for the thousand-device test. On the shared
 * broker a thousand devices reporting at once would reach every fleet another suite runs there at
 * the same time (a fleet subscribes to every device's `up/+`) and overflow its QoS 1 queue, so that
 * suite's operator requests would time out.
 */
async function privateMosquitto(): Promise<{ url: string; stop: () => void }> {
  const port = await new Promise<number>((resolve) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-sim-mosquitto-'));
  const conf = join(dir, 'mosquitto.conf');
  writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n`);
  const child = spawn('mosquitto', ['-c', conf], { stdio: 'ignore' });
  const stop = (): void => {
    child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  };
  const url = `mqtt://127.0.0.1:${port}`;
  for (let i = 0; i < 100 && !(await probe(url)); i++) await new Promise((r) => setTimeout(r, 50));
  return { url, stop };
}

/** Quick timings: downloads of 20–60 ms, probation 200 ms. */
const FAST = { probationMs: 200, reportIntervalMs: 1000, timing: { applyMs: [20, 60] as const, crashRestartMs: 200, reconnectMs: [100, 200] as const } };

/** The fleet's side, by hand: what each device published last (validated), and a way to set its desired state. */
class FleetSide {
  readonly status = new Map<string, StatusMessage[]>();
  readonly reported = new Map<string, ReportedMessage>();
  readonly resync = new Map<string, ResyncMessage[]>();
  private readonly ids = new Set<string>();
  private readonly versions = new Map<string, { version: number; doc: DesiredDoc }>();

  private constructor(private readonly client: MqttClient) {
    client.on('message', (topic, payload) => {
      const t = parseTopic(topic);
      if (t?.dir !== 'up' || payload.length === 0) return;
      const schema = { status: StatusMessage, reported: ReportedMessage, resync: ResyncMessage }[t.kind as 'status' | 'reported' | 'resync'];
      const decoded = decodeJson(schema, payload, MAX_PAYLOAD_BYTES[t.kind]);
      if (!decoded.ok) throw new Error(`${topic}: ${decoded.error.message}`);
      if (t.kind === 'status') this.status.set(t.deviceId, [...(this.status.get(t.deviceId) ?? []), decoded.value as StatusMessage]);
      if (t.kind === 'reported') this.reported.set(t.deviceId, decoded.value as ReportedMessage);
      if (t.kind === 'resync') this.resync.set(t.deviceId, [...(this.resync.get(t.deviceId) ?? []), decoded.value as ResyncMessage]);
    });
  }

  static async open(url = BROKER): Promise<FleetSide> {
    return new FleetSide(await mqtt.connectAsync(url, { clientId: `fleetside-${randomBytes(4).toString('hex')}`, reconnectPeriod: 0, clean: true }));
  }

  /**
   * QoS 0 on purpose: Mosquitto queues at most 1,000 QoS 1 messages per subscriber beyond those in
   * flight (max_queued_messages) and drops the rest, and a thousand devices reporting at once is
   * more than that. QoS 0 to a connected client goes straight to its socket, over loopback.
   */
  async watch(ids: readonly string[]): Promise<void> {
    const filters: Record<string, { qos: 0 }> = {};
    for (const id of ids) {
      this.ids.add(id);
      for (const kind of ['status', 'reported', 'resync'] as const) filters[topics.up(id, kind)] = { qos: 0 };
    }
    await this.client.subscribeAsync(filters);
  }

  /** The next full document for each device (its version one above the last one sent). */
  async setDesired(ids: readonly string[], partial: unknown): Promise<void> {
    const doc = DesiredDoc.parse(partial);
    await Promise.all(
      ids.map((id) => {
        const version = (this.versions.get(id)?.version ?? 0) + 1;
        this.versions.set(id, { version, doc });
        return this.send(id, { kind: 'full', version, digest: desiredDigest(doc), doc });
      }),
    );
  }

  send(id: string, msg: DesiredMessage | Buffer): Promise<unknown> {
    return this.client.publishAsync(topics.down(id, 'desired'), Buffer.isBuffer(msg) ? msg : encodeJson(msg), { qos: 1, retain: true });
  }

  serving(id: string, model: string): number | null | undefined {
    return this.reported.get(id)?.models[model]?.active;
  }

  async until(what: string, cond: () => boolean, timeoutMs = 8000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out waiting for: ${what}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Leaves the shared broker as found: no retained desired documents, statuses or wills. */
  async close(): Promise<void> {
    const empty = Buffer.alloc(0);
    await Promise.all(
      [...this.ids].flatMap((id) => [topics.down(id, 'desired'), topics.up(id, 'status')].map((t) => this.client.publishAsync(t, empty, { qos: 1, retain: true }))),
    );
    await this.client.endAsync();
  }
}

const opened: { fleet: SimFleet; side: FleetSide }[] = [];
afterAll(async () => {
  for (const { fleet, side } of opened) {
    await fleet.stop().catch(() => undefined);
    await side.close();
  }
});

async function setup(opts: Omit<SimFleetOptions, 'url'>, url = BROKER): Promise<{ fleet: SimFleet; side: FleetSide; ids: readonly string[] }> {
  const fleet = new SimFleet({ url, ...FAST, ...opts });
  const side = await FleetSide.open(url);
  opened.push({ fleet, side });
  await side.watch(fleet.ids);
  await fleet.start();
  return { fleet, side, ids: fleet.ids };
}

const prefix = (): string => `s${randomBytes(4).toString('hex')}`;
const SHA = 'ab'.repeat(32);

describe('scenario assignment', () => {
  it('gives exact, disjoint shares, the same on every run, and reads rules as the CLI writes them', () => {
    const scenario = { devices: 200, prefix: 'x', rules: [parseRuleSpec('failing-probation:0.1@3'), parseRuleSpec('slow:0.2'), { behaviour: 'offline' as const, ids: ['x-0001'] }] };
    const a = assignRules(scenario);
    const count = (b: string): number => [...a.values()].filter((rules) => rules.some((r) => r.behaviour === b)).length;
    expect([count('failing-probation'), count('slow'), count('offline')]).toEqual([20, 40, 1]);
    const both = [...a.values()].filter((rules) => rules.some((r) => r.behaviour === 'slow') && rules.some((r) => r.behaviour === 'failing-probation'));
    expect(both).toEqual([]);
    expect([...assignRules(scenario)]).toEqual([...a]);
    expect([...assignRules({ ...scenario, seed: 'other' })]).not.toEqual([...a]);
    expect(parseRuleSpec('degraded:0.05@4,5#iris')).toEqual({ behaviour: 'degraded', share: 0.05, versions: [4, 5], model: 'iris' });
    expect(() => parseRuleSpec('melting:0.1')).toThrow(/unknown behaviour/);
    expect(() => assignRules({ devices: 10, rules: [{ behaviour: 'slow', share: 0.7 }, { behaviour: 'crashing', share: 0.4 }] })).toThrow(/more than 1/);
    expect(deviceIds({ devices: 3, prefix: 'p' })).toEqual(['p-0001', 'p-0002', 'p-0003']);
  });
});

describe.skipIf(!reachable)('simulated devices against Mosquitto', () => {
  it('apply desired state, install a new version, commit it, and report as an agent does', async () => {
    const startedAt = Date.now();
    const { fleet, side, ids } = await setup({ scenario: { devices: 20, prefix: prefix() }, initial: { models: { m: 1 } } });
    const applied: number[] = [];
    fleet.on('applied', (_id, v) => applied.push(v));
    await side.until('online, and a first report', () => ids.every((id) => side.status.get(id)?.at(-1)?.state === 'online' && side.reported.get(id)?.desiredVersion === 0));
    // Sessions count on from the clock, so a second run's sessions are above the first's.
    const status = side.status.get(ids[0] as string)?.[0];
    expect(status).toMatchObject({ state: 'online', agentVersion: expect.any(String) as string });
    expect(status?.session).toBeGreaterThanOrEqual(startedAt);

    await side.setDesired(ids, { models: { m: { version: 2, manifestSha256: SHA } } });
    await side.until('all committed 2', () => ids.every((id) => side.reported.get(id)?.models.m?.state === 'idle' && side.serving(id, 'm') === 2));
    const r = side.reported.get(ids[0] as string) as ReportedMessage;
    expect(r.desiredVersion).toBe(1);
    expect(r.models.m).toMatchObject({ active: 2, activeSha256: SHA, desired: 2, history: [2, 1], failed: [], fallback: 1, lastVerdict: { version: 2, ok: true } });
    expect(r.models.m?.metrics?.version).toBe(2);
    expect(applied.length).toBe(20);
    expect(fleet.counts('m')).toEqual({ 2: 20 });

    // A patch from 1 to 2, as the fleet sends small changes.
    const id = ids[0] as string;
    const next = DesiredDoc.parse({ agent: { reportIntervalSec: 60 }, models: { m: { version: 2, manifestSha256: SHA } } });
    await side.send(id, { kind: 'patch', from: 1, to: 2, digest: desiredDigest(next), patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }] });
    await side.until('patch applied', () => side.reported.get(id)?.desiredVersion === 2);
    expect(side.reported.get(id)?.agent.reportIntervalSec).toBe(60);
    // Figures move with time: requests grow on the serving version.
    const before = side.reported.get(id)?.models.m?.metrics?.requests ?? 0;
    await side.until('a periodic report with more requests', () => (side.reported.get(id)?.models.m?.metrics?.requests ?? 0) > before, 3000);
  });

  it('ask for a resync when a patch does not line up, and ignore stale and cleared messages', async () => {
    const { fleet, side, ids } = await setup({ scenario: { devices: 2, prefix: prefix() } });
    const [a, b] = ids as [string, string];
    await side.setDesired(ids, {});
    await side.until('applied', () => ids.every((id) => side.reported.get(id)?.desiredVersion === 1));
    const next = DesiredDoc.parse({ agent: { logLevel: 'debug' } });
    await side.send(a, { kind: 'patch', from: 1, to: 2, digest: 'f'.repeat(64), patch: [{ op: 'replace', path: '/agent/logLevel', value: 'debug' }] });
    await side.send(b, { kind: 'patch', from: 4, to: 5, digest: desiredDigest(next), patch: [] });
    await side.until('resync requests', () => side.resync.has(a) && side.resync.has(b));
    expect(side.resync.get(a)).toEqual([{ have: 1, reason: 'digest-mismatch' }]);
    expect(side.resync.get(b)).toEqual([{ have: 1, reason: 'version-gap' }]);
    await side.send(a, Buffer.from('{"kind":"full"'));
    await side.until('invalid message', () => side.resync.get(a)?.at(-1)?.reason === 'invalid-message');
    // A stale full document and an empty (cleared) retained message change nothing.
    await side.send(a, { kind: 'full', version: 1, digest: desiredDigest(next), doc: next });
    await side.send(b, Buffer.alloc(0));
    await new Promise((r) => setTimeout(r, 200));
    expect([fleet.device(a).desiredVersion, fleet.device(b).desiredVersion]).toEqual([1, 1]);
  });

  it('roll back a version that fails probation, and never try it again', async () => {
    const { fleet, side, ids } = await setup({ scenario: { devices: 10, prefix: prefix(), rules: [{ behaviour: 'failing-probation', share: 0.3, versions: [2] }] }, initial: { models: { m: 1 } } });
    const failing = ids.filter((id) => fleet.device(id).behaviours.includes('failing-probation'));
    expect(failing.length).toBe(3);
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    await side.until('verdicts', () => ids.every((id) => side.reported.get(id)?.models.m?.lastVerdict !== null && side.reported.get(id)?.models.m?.state === 'idle'));
    for (const id of failing) expect(side.reported.get(id)?.models.m).toMatchObject({ active: 1, failed: [2], history: [1], lastVerdict: { version: 2, ok: false, reason: 'errors' } });
    expect(fleet.counts('m')).toEqual({ 1: 3, 2: 7 });
    // Desired state moves on (same version): the failed version stays refused.
    await side.setDesired(ids, { agent: { logLevel: 'warn' }, models: { m: { version: 2 } } });
    await side.until('applied', () => ids.every((id) => side.reported.get(id)?.desiredVersion === 2));
    await new Promise((r) => setTimeout(r, 150));
    expect(fleet.counts('m')).toEqual({ 1: 3, 2: 7 });
    expect(failing.every((id) => fleet.device(id).models.m?.state === 'idle')).toBe(true);
  });

  it('serve the pinned fallback in safe mode and go back when it ends, without downloads', async () => {
    const { fleet, side, ids } = await setup({ scenario: { devices: 5, prefix: prefix() }, initial: { models: { m: 1 } } });
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    await fleet.waitFor((f) => f.status().models.m?.serving['2'] === 5 && f.status().models.m?.probation === 0, 5000);
    const states: string[] = [];
    fleet.on('reported', (_id, r) => states.push(r.models.m?.state ?? 'none'));
    await side.setDesired(ids, { models: { m: { version: 2 } }, safeMode: true });
    await side.until('on the fallback', () => ids.every((id) => side.reported.get(id)?.desiredVersion === 2 && side.serving(id, 'm') === 1));
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    await side.until('back on 2', () => ids.every((id) => side.reported.get(id)?.desiredVersion === 3 && side.serving(id, 'm') === 2));
    expect(new Set(states)).toEqual(new Set(['idle']));
    expect(side.reported.get(ids[0] as string)?.models.m).toMatchObject({ history: [2, 1], fallback: 1, failed: [] });
  });

  it('keep offline devices away until set online, then they catch up from the retained document', async () => {
    const p = prefix();
    const away = [`${p}-0001`, `${p}-0002`];
    const { fleet, side, ids } = await setup({ scenario: { devices: 6, prefix: p, rules: [{ behaviour: 'offline', ids: away }] }, initial: { models: { m: 1 } } });
    expect(away.map((id) => fleet.device(id).connected)).toEqual([false, false]);
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    const present = ids.filter((id) => !away.includes(id));
    await side.until('present devices on 2', () => present.every((id) => side.serving(id, 'm') === 2 && side.reported.get(id)?.models.m?.state === 'idle'));
    expect(away.map((id) => side.reported.has(id))).toEqual([false, false]);
    for (const id of away) await fleet.setOnline(id, true);
    await side.until('late devices on 2', () => away.every((id) => side.serving(id, 'm') === 2 && side.reported.get(id)?.models.m?.state === 'idle'));
    // Set offline again: the link drops without goodbye, so the broker says so with the will.
    await fleet.setOnline(away[0] as string, false);
    await side.until('will', () => side.status.get(away[0] as string)?.at(-1)?.state === 'offline');
  });

  it('crash on a crashing version (the will says offline), and after two crashes keep the stable one', async () => {
    const p = prefix();
    const { fleet, side, ids } = await setup({ scenario: { devices: 2, prefix: p, rules: [{ behaviour: 'crashing', ids: [`${p}-0001`], versions: [2] }] }, initial: { models: { m: 1 } } });
    const [crashing, healthy] = ids as [string, string];
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    await side.until('crash loop ends', () => side.reported.get(crashing)?.models.m?.lastVerdict?.reason === 'crash-loop', 8000);
    expect(side.reported.get(crashing)?.models.m).toMatchObject({ active: 1, failed: [2], state: 'idle' });
    // Each session's will carries that session's number; the device came back after each.
    const statuses = side.status.get(crashing) ?? [];
    const first = statuses[0]?.session ?? 0;
    expect(statuses.map((s) => `${s.state}:${s.session - first}`)).toEqual(['online:0', 'offline:0', 'online:1', 'offline:1', 'online:2']);
    expect(fleet.device(crashing).crashes).toBe(2);
    expect(side.serving(healthy, 'm')).toBe(2);
  });

  it('echo a raw message and nothing else, for the benchmark floor', async () => {
    const both = await setup({ scenario: { devices: 5, prefix: prefix() }, raw: true });
    const only = await setup({ scenario: { devices: 5, prefix: prefix() }, raw: { only: true } });
    const ids = [...both.ids, ...only.ids];
    const replies = new Set<string>();
    const c = await mqtt.connectAsync(BROKER, { clientId: `raw-${randomBytes(4).toString('hex')}`, reconnectPeriod: 0 });
    c.on('message', (t) => replies.add(t));
    await c.subscribeAsync(ids.map((id) => `bench/raw/${id}/r`), { qos: 1 });
    await Promise.all(ids.map((id) => c.publishAsync(`bench/raw/${id}`, 'x', { qos: 1 })));
    await both.side.until('replies', () => replies.size === 10);
    await c.endAsync();
    // Beside the protocol, or alone: then no status, no report, no will.
    await both.side.until('reports', () => both.ids.every((id) => both.side.reported.has(id)));
    expect(only.ids.filter((id) => only.side.status.has(id) || only.side.reported.has(id))).toEqual([]);
  });

  it('flap: the link drops without goodbye every so often, and the device catches up on return', async () => {
    const { fleet, side, ids } = await setup({
      scenario: { devices: 2, prefix: prefix(), rules: [{ behaviour: 'flapping', share: 0.5 }] },
      initial: { models: { m: 1 } },
      timing: { ...FAST.timing, flapUpMs: [150, 250], flapDownMs: 100 },
    });
    const flapping = ids.find((id) => fleet.device(id).behaviours.includes('flapping')) as string;
    await side.until('two wills', () => (side.status.get(flapping) ?? []).filter((s) => s.state === 'offline').length >= 2);
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    await side.until('both on 2', () => ids.every((id) => side.serving(id, 'm') === 2 && side.reported.get(id)?.models.m?.state === 'idle'));
    const other = ids.find((id) => id !== flapping) as string;
    expect((side.status.get(other) ?? []).map((s) => s.state)).toEqual(['online']);
  });

  it('report degraded figures on a degraded version, which the device itself commits', async () => {
    const p = prefix();
    const { side, ids } = await setup({
      scenario: { devices: 2, prefix: p, rules: [{ behaviour: 'degraded', ids: [`${p}-0001`], versions: [2] }] },
      initial: { models: { m: 1 } },
      timing: { ...FAST.timing, requestsPerSec: 400 },
      reportIntervalMs: 200,
    });
    const [bad, good] = ids as [string, string];
    await side.setDesired(ids, { models: { m: { version: 2 } } });
    const metrics = (id: string): NonNullable<ReportedMessage['models'][string]['metrics']> | null | undefined => side.reported.get(id)?.models.m?.metrics;
    await side.until('committed, with figures', () => ids.every((id) => side.reported.get(id)?.models.m?.state === 'idle' && side.serving(id, 'm') === 2 && (metrics(id)?.requests ?? 0) > 100));
    const [b, g] = [metrics(bad), metrics(good)];
    expect(side.reported.get(bad)?.models.m?.lastVerdict).toMatchObject({ version: 2, ok: true });
    expect((b?.errors ?? 0) / (b?.requests ?? 1)).toBeGreaterThan(0.05);
    expect(g?.errors).toBe(0);
    // Healthy p95 lies within 5–10 ms on every device (±3%); degraded is three times the device's own.
    expect(g?.p95Ms ?? Infinity).toBeLessThan(10.5);
    expect(b?.p95Ms ?? 0).toBeGreaterThan(14);
    expect(b?.meanConfidence ?? 1).toBeLessThan((g?.meanConfidence ?? 0) - 0.2);
  });

});

describe.skipIf(!mosquittoInstalled)('a thousand simulated devices on a Mosquitto of their own', () => {
  it('moves 1,000 devices to a new version and every one reports it', async () => {
    const broker = await privateMosquitto();
    try {
      const { fleet, side, ids } = await setup({ scenario: { devices: 1000, prefix: prefix() }, initial: { models: { m: 1 } }, connectConcurrency: 200, reportIntervalMs: 30_000 }, broker.url);
      await side.setDesired(ids, { models: { m: { version: 2 } } });
      await side.until('all report 2, committed', () => ids.every((id) => side.serving(id, 'm') === 2 && side.reported.get(id)?.models.m?.state === 'idle'), 20_000);
      expect(fleet.counts('m')).toEqual({ 2: 1000 });
      const { fleet: f, side: s } = opened.pop() as (typeof opened)[number];
      await f.stop();
      await s.close();
    } finally {
      broker.stop();
    }
  }, 40_000);
});
