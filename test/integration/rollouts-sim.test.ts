/**
 * Staged rollouts at fleet scale: a real fleet server (embedded broker, SQLite, registry) and 1,000
 * simulated devices, each its own MQTT connection speaking the device protocol (scripts/sim). The
 * behaviours are scripted per version: v2 healthy, v3 fails probation everywhere, v4 serves with a
 * 30 % error rate (a runtime gate must catch it; the devices accept it).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import mqtt from 'mqtt';
import { encodeJson, topics, type ReportedMessage, type RolloutPlanInput, type RolloutView } from '../../proto/index.js';
import { OpsClient } from '../../scripts/ops-client.js';
import { SimFleet } from '../../scripts/sim/fleet.js';
import { provisionDevices } from '../../scripts/sim/provision.js';
import { addFleetIdentity, cleanup, onCleanup, tempDir, uniq, waitFor } from '../helpers/fleet.js';
import { irisModels, irisPublish, publishModel, startModelFleet, type ModelFleet } from '../helpers/models.js';

const N = 1000;
const OFFLINE = 20;
let fleet: ModelFleet;
let sim: SimFleet;
let ids: readonly string[];
let offline: string[];
const versions: number[] = [];

const GATES = { minRequests: 5 };
const fast = (waves: number[], extra: Partial<Record<'timeoutSec' | 'minAppliedShare', number>> = {}): RolloutPlanInput => ({
  steps: waves.flatMap((p) => [
    { type: 'wave' as const, percent: p, ...extra },
    { type: 'analysis' as const, windowSec: 1, gates: GATES },
  ]),
});

beforeAll(async () => {
  const { good } = await irisModels();
  fleet = await startModelFleet();
  // Simulated devices download nothing; the registry still holds real, signed versions.
  for (let i = 0; i < 7; i++) versions.push((await publishModel(fleet, good.dir, irisPublish({}))).version);
  expect(versions).toEqual([1, 2, 3, 4, 5, 6, 7]);
  const prefix = uniq('sim');
  const scenario = {
    devices: N,
    prefix,
    rules: [
      { behaviour: 'failing-probation' as const, versions: [3] },
      { behaviour: 'degraded' as const, versions: [4], metrics: { errorRate: 0.3 } },
    ],
  };
  const probe = new SimFleet({ url: fleet.server.brokerUrl, scenario });
  ids = probe.ids;
  offline = ids.slice(0, OFFLINE);
  const credentials = await provisionDevices({ profile: { ...fleet.profile, source: 'test' }, ids, cacheFile: `${tempDir()}/creds.json`, tags: ['sim'], models: { iris: 1 }, concurrency: 32 });
  sim = new SimFleet({
    url: fleet.server.brokerUrl,
    scenario: { ...scenario, rules: [...scenario.rules, { behaviour: 'offline' as const, ids: offline }] },
    credentials,
    initial: { models: { iris: 1 } },
    probationMs: 300,
    reportIntervalMs: 1000,
    timing: { applyMs: [10, 80] },
  });
  onCleanup(() => sim.stop());
  await sim.start();
  await waitFor('every online device reported', () => fleet.server.fleetStore.reported.get(ids[N - 1] as string) !== null, 60_000);
}, 300_000);

afterAll(cleanup);

/** A test that failed part-way must not hold the model for the next one. */
async function abortLeftovers(): Promise<void> {
  for (const r of (await fleet.admin.call('rollouts.list', { active: true })).rollouts) await fleet.admin.call('rollouts.abort', { id: r.id, reason: 'left by an earlier test' });
}

async function start(version: number, plan: RolloutPlanInput): Promise<RolloutView> {
  await abortLeftovers();
  const { rollout, noop } = await fleet.admin.call('rollouts.start', { name: 'iris', version, plan });
  if (!rollout) throw new Error(`no rollout: ${noop}`);
  return rollout;
}

/**
 * The rollout as the fleet shows it, or null when the reply is slow. The fleet, its broker and the
 * 1,000 devices share this process: right after a fleet restart, with every device reconnecting
 * and resyncing at once, one reply took more than the client's 10 s. A poll just asks again.
 */
async function show(id: number): Promise<RolloutView | null> {
  return fleet.admin.call('rollouts.show', { id }).catch((e: unknown) => {
    if ((e as { code?: string }).code === 'EF_TIMEOUT') return null;
    throw e;
  });
}

async function until(id: number, states: string[], timeoutMs = 60_000): Promise<RolloutView> {
  let v: RolloutView | null = null;
  await waitFor(
    `rollout ${id} ${states.join('|')}`,
    async () => {
      v = (await show(id)) ?? v;
      return v !== null && states.includes(v.status.state);
    },
    timeoutMs,
  ).catch((e: unknown) => {
    throw new Error(`${(e as Error).message}; last: ${JSON.stringify(v?.status)}`);
  });
  return v as unknown as RolloutView;
}

function serving(version: number): number {
  return sim.counts('iris')[String(version)] ?? 0;
}

function desiredOf(id: string): number | undefined {
  return fleet.server.fleetStore.desired.get(id)?.doc.models.iris?.version;
}

async function modelStatus(version: number): Promise<string> {
  return (await fleet.admin.call('models.show', { name: 'iris', version })).status;
}

describe(`rollouts over ${N} simulated devices`, () => {
  it('reaches 100 %; devices offline during the waves catch up when they return', async () => {
    // A wave's timeout long enough for a loaded machine (the suites share two cores with TF.js training).
    const r = await start(2, fast([1, 10, 100], { timeoutSec: 45, minAppliedShare: 0.95 }));
    const done = await until(r.id, ['succeeded', 'halted', 'paused'], 200_000);
    expect(done.status.state, done.status.reason ?? '').toBe('succeeded');
    expect(done.status.total.members).toBe(N);
    expect(done.status.total.failed).toBe(0);
    expect(serving(2)).toBe(N - OFFLINE);
    expect(await modelStatus(2)).toBe('production');
    // The offline devices have v2 in desired state; they take it when they come back.
    expect(offline.every((id) => desiredOf(id) === 2)).toBe(true);
    for (const id of offline) await sim.setOnline(id, true);
    await sim.waitFor(() => serving(2) === N, 30_000);
  }, 240_000);

  it('a version that fails probation halts at the canary; every device that took it is back on the previous version', async () => {
    const r = await start(3, fast([5, 25, 100]));
    const halted = await until(r.id, ['halted', 'succeeded']);
    expect(halted.status.state).toBe('halted');
    expect(halted.status.reason).toMatch(/failed-share/);
    // Halted within the first wave (5 %): most of the fleet never saw v3.
    expect(halted.status.total.members).toBeLessThanOrEqual(Math.ceil(N * 0.05));
    expect(ids.filter((id) => desiredOf(id) === 3)).toEqual([]);
    await sim.waitFor(() => serving(2) === N, 30_000);
    expect(await modelStatus(3)).toBe('quarantined');
    await expect(fleet.admin.call('rollouts.start', { name: 'iris', version: 3 })).rejects.toMatchObject({ code: 'EF_ARTIFACT_REFUSED' });
  }, 120_000);

  it('a version the devices accept but that errors in the field is halted by the error-rate gate and reverted fleet-wide', async () => {
    const r = await start(4, fast([5, 100]));
    const halted = await until(r.id, ['halted', 'succeeded']);
    expect(halted.status.state).toBe('halted');
    expect(halted.status.reason).toMatch(/error-rate/);
    const members = halted.status.total.members;
    expect(members).toBe(Math.ceil(N * 0.05));
    await sim.waitFor(() => serving(2) === N, 30_000);
    const after = await until(r.id, ['halted']);
    await waitFor('revert counted', async () => (await show(r.id))?.status.revert?.reverted === members, 15_000);
    expect(after.status.gates.find((g) => g.gate === 'error-rate')?.verdict).toBe('failed');
  }, 120_000);

  it('an approval gate waits until approved; contradicting reports are counted and never judged', async () => {
    const r = await start(5, { steps: [{ type: 'wave', percent: 10 }, { type: 'pause', untilApproved: true }, { type: 'wave', percent: 100 }] });
    const waiting = await until(r.id, ['awaiting-approval']);
    await new Promise((res) => setTimeout(res, 1500));
    expect((await fleet.admin.call('rollouts.show', { id: r.id })).status.state).toBe('awaiting-approval');
    expect(waiting.status.total.members).toBe(N / 10);

    // A device the rollout did not move claims to serve v5: counted, ignored.
    const members = new Set(fleet.server.fleetStore.rollouts.members(r.id).map((m) => m.deviceId));
    const liar = ids.find((id) => !members.has(id) && !offline.includes(id)) as string;
    // A fleet-kind identity may publish anywhere: the way to put words in a device's mouth.
    const identity = addFleetIdentity(fleet);
    const fleetSide = await mqtt.connectAsync(fleet.server.brokerUrl, { ...identity, clientId: identity.username, reconnectPeriod: 0 });
    const lie: ReportedMessage = { ts: Date.now(), desiredVersion: 1_000_000, agent: { logLevel: 'info', reportIntervalSec: 300, factsIntervalSec: 3600 }, models: { iris: { state: 'idle', active: 5, activeSha256: 'f'.repeat(64), desired: 5, history: [5], failed: [], fallback: 1, lastVerdict: null } } };
    await fleetSide.publishAsync(topics.up(liar, 'reported'), encodeJson(lie), { qos: 1 });
    await fleetSide.endAsync();
    await waitFor('contradiction counted', async () => ((await show(r.id))?.status.contradictions ?? 0) >= 1, 10_000);
    expect((await fleet.admin.call('rollouts.show', { id: r.id })).status.total.serving).toBe(N / 10);

    await fleet.admin.call('rollouts.approve', { id: r.id });
    const done = await until(r.id, ['succeeded']);
    expect(done.status.total.members).toBe(N);
    await sim.waitFor(() => serving(5) === N, 30_000);
  }, 120_000);

  it('a fleet-server restart mid-rollout resumes where it was, with the same devices in the same waves', async () => {
    const r = await start(6, { steps: [{ type: 'wave', percent: 10 }, { type: 'pause', seconds: 4 }, { type: 'wave', percent: 50 }, { type: 'wave', percent: 100 }] });
    await waitFor('first wave applied', async () => (await show(r.id))?.status.step === 1, 30_000);
    const wave1 = fleet.server.fleetStore.rollouts.members(r.id).map((m) => m.deviceId).sort();
    expect(wave1).toHaveLength(N / 10);
    await fleet.restart();
    const done = await until(r.id, ['succeeded'], 90_000);
    expect(done.status.total.members).toBe(N);
    const after = fleet.server.fleetStore.rollouts.members(r.id);
    expect(after.filter((m) => m.wave === 1).map((m) => m.deviceId).sort()).toEqual(wave1);
    expect(after).toHaveLength(N);
    await sim.waitFor(() => serving(6) === N, 60_000);
  }, 180_000);

  it('safe mode puts every device on its pinned fallback, blocks rollouts, and leaving it restores the state from before', async () => {
    await abortLeftovers();
    const on = await fleet.admin.call('safeMode.on', { reason: 'test' });
    expect(on.devices).toBe(N);
    await sim.waitFor(() => serving(1) === N, 30_000);
    await waitFor('converged', async () => (await fleet.admin.call('safeMode.status', {})).converged === N, 30_000);
    await expect(fleet.admin.call('rollouts.start', { name: 'iris', version: 7 })).rejects.toMatchObject({ code: 'EF_SAFE_MODE' });
    const off = await fleet.admin.call('safeMode.off', {});
    expect(off.ended).toHaveLength(1);
    await sim.waitFor(() => serving(6) === N, 30_000);
    expect((await fleet.admin.call('safeMode.status', {})).devices).toBe(0);
    expect(ids.every((id) => desiredOf(id) === 6)).toBe(true);
  }, 120_000);

  it('refuses and audits an unknown rollout, an unauthorized operator and an invalid plan (every error listed)', async () => {
    await expect(fleet.admin.call('rollouts.abort', { id: 9999 })).rejects.toMatchObject({ code: 'EF_UNKNOWN_ROLLOUT' });
    const bad = { steps: [{ type: 'wave', percent: 10, count: 2 }, { type: 'pause' }, { type: 'analysis', windowSec: -1 }] };
    const err = await fleet.admin.call('rollouts.start', { name: 'iris', version: 7, plan: bad }).catch((e: unknown) => e as { code: string; details: string[] });
    expect(err).toMatchObject({ code: 'EF_PLAN_INVALID' });
    expect((err as { details: string[] }).details.length).toBeGreaterThanOrEqual(3);
    const viewer = await fleet.admin.call('operators.add', { name: uniq('viewer'), role: 'viewer' });
    const client = await OpsClient.connect({ url: viewer.credential.brokerUrl, username: viewer.credential.username, password: viewer.credential.password });
    onCleanup(() => client.close());
    await expect(client.call('rollouts.start', { name: 'iris', version: 7 })).rejects.toMatchObject({ code: 'EF_FORBIDDEN' });
    const audit = (await fleet.admin.call('audit.list', { limit: 50 })).entries;
    expect(audit).toContainEqual(expect.objectContaining({ action: 'rollouts.abort', ok: false, target: 'rollout:9999' }));
    expect(audit).toContainEqual(expect.objectContaining({ actor: viewer.name, action: 'rollouts.start', ok: false }));
    const refusedPlan = audit.find((e) => e.action === 'rollouts.start' && (e.detail as { code?: string } | null)?.code === 'EF_PLAN_INVALID');
    expect(refusedPlan?.ok).toBe(false);
  }, 60_000);
});
