import { afterEach, describe, expect, it } from 'vitest';
import { crc32 } from 'node:zlib';
import mqtt from 'mqtt';
import { FRAME_FL_UPDATE, Manifest, defaultDesiredDoc, encodeBundle, encodeFlFrame, topics, type RoundView, type UpdateMeta } from '../../proto/index.js';
import type { Agent } from '../../agent/agent.js';
import { irisSamples } from '../../scripts/train-iris.js';
import { addDevice, waitFor, type Credential } from '../helpers/fleet.js';
import { assign, publishTrainable, serving, startModelAgent, startModelFleet, type ModelFleet } from '../helpers/models.js';

/**
 * Federated rounds end to end: a fleet with its embedded broker, three real agents serving the
 * iris `wrong` variant (trained on scrambled labels) and holding the true labels of a label-skewed
 * share of the iris rows. A round trains on them, aggregates, evaluates the candidate on the
 * agents' holdouts, and registers it with its lineage.
 */

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Setup {
  fleet: ModelFleet;
  agents: { agent: Agent; cred: Credential }[];
  base: { version: number; manifestSha256: string };
}

async function setup(devices = 3): Promise<Setup> {
  const fleet = await startModelFleet();
  cleanups.push(() => fleet.stop());
  const base = await publishTrainable(fleet, 'wrong', { production: true });
  const agents: Setup['agents'] = [];
  for (let i = 0; i < devices; i++) {
    // The CPU gate off: the test machine is busy with the test itself (and the other agents' training).
    const a = await startModelAgent(fleet, { deviceId: `learner-${i}`, learner: { maxCpuLoad: 1 } });
    cleanups.push(() => a.agent.stop());
    agents.push(a);
  }
  await assign(fleet, 'iris', base.version, agents.map((a) => a.cred.username));
  await waitFor('agents serve the base', () => agents.every((a) => serving(a.agent, 'iris', base.version)), 60_000);
  // Label skew: each device holds mostly one class (and a little of the others), with true labels.
  const { features, labels } = irisSamples();
  agents.forEach(({ agent }, d) => {
    features.forEach((row, r) => {
      if (labels[r] === d % 3 || r % 5 === d) agent.models.addSample('iris', Float32Array.from(row), [4], labels[r]);
    });
  });
  await waitFor('the fleet sees the samples', () => agents.every((a) => ((fleet.server.fleetStore.reported.get(a.cred.username)?.doc.models.iris?.samples ?? 0) >= 50)), 30_000);
  return { fleet, agents, base };
}

/**
 * Devices the test speaks for: provisioned, online, reporting the base with 50 samples, but with no
 * agent behind them. A round invites them and waits; the test sends their updates by hand.
 */
async function forgedSetup(devices = 3): Promise<{ fleet: ModelFleet; clients: { id: string; client: mqtt.MqttClient }[] }> {
  const fleet = await startModelFleet();
  cleanups.push(() => fleet.stop());
  const base = await publishTrainable(fleet, 'wrong', { production: true });
  const clients: { id: string; client: mqtt.MqttClient }[] = [];
  for (let i = 0; i < devices; i++) {
    const id = `forged-${i}`;
    const cred = await addDevice(fleet, id);
    const client = await mqtt.connectAsync(fleet.server.brokerUrl, { clientId: id, username: id, password: cred.password, clean: true });
    cleanups.push(() => client.endAsync());
    await client.publishAsync(topics.up(id, 'status'), JSON.stringify({ state: 'online', session: 1 }), { qos: 1, retain: true });
    const slot = { state: 'idle', active: base.version, activeSha256: base.manifestSha256, desired: base.version, history: [base.version], failed: [], fallback: base.version, lastVerdict: null, samples: 50 };
    await client.publishAsync(topics.up(id, 'reported'), JSON.stringify({ ts: Date.now(), desiredVersion: 1, agent: defaultDesiredDoc().agent, models: { iris: slot } }), { qos: 1 });
    clients.push({ id, client });
  }
  await waitFor('the fleet sees the forged devices', () => clients.every(({ id }) => fleet.server.fleetStore.reported.get(id)?.doc.models.iris?.samples === 50 && fleet.server.fleetStore.devices.get(id)?.presence === 'online'), 30_000);
  return { fleet, clients };
}

async function until(fleet: ModelFleet, id: number, done: (v: RoundView) => boolean, timeoutMs = 120_000): Promise<RoundView> {
  let view!: RoundView;
  await waitFor(`round ${id}`, async () => done((view = await fleet.admin.call('fl.show', { id }))), timeoutMs);
  return view;
}

/** Updates as a device would send them for round `id`, built by hand. */
function forge(fleet: ModelFleet, id: number): { meta: (over?: Partial<UpdateMeta>) => UpdateMeta; tensors: (scale: number, value?: number) => { name: string; shape: number[]; data: Float32Array }[] } {
  const row = fleet.server.fleetStore.fl.getRound(id)!;
  const specs = fleet.server.rounds.base(row).shared.specs;
  const meta = (over: Partial<UpdateMeta> = {}): UpdateMeta => ({
    kind: 'fl-update',
    roundId: id,
    baseManifestSha256: row.baseManifestSha256,
    sampleCount: 40,
    normBeforeClip: 1,
    clipped: false,
    localNoiseStd: 0,
    metrics: { lossBefore: 1, lossAfter: 0.5, accuracyBefore: 0.3, accuracyAfter: 0.9, holdoutCount: 10 },
    steps: 10,
    stoppedBy: 'done',
    trainMs: 5,
    ...over,
  });
  const tensors = (scale: number, value = 0.01) => specs.map((s) => ({ name: s.name, shape: s.shape, data: new Float32Array(s.size).fill(value * scale) }));
  return { meta, tensors };
}

const config = (over: Record<string, unknown> = {}): Record<string, unknown> => ({
  model: 'iris',
  selection: { minSamples: 20, minParticipants: 3, maxParticipants: 10 },
  train: { epochs: 30, batchSize: 16, learningRate: 0.05, optimizer: 'adam', clipNorm: 50 },
  deadlineSec: 90,
  evaluation: { minDevices: 3, deadlineSec: 60, maxAccuracyDrop: 0.02 },
  ...over,
});

describe('federated rounds with real agents', { timeout: 240_000 }, () => {
  it('trains on the devices, evaluates on their holdouts and registers a better candidate with its lineage', async () => {
    const { fleet, base } = await setup();
    // A passing candidate goes straight into a rollout of one wave.
    const started = await fleet.admin.call('fl.start', { config: config({ rollout: { plan: { steps: [{ type: 'wave', percent: 100 }] } } }) });
    expect(started.state).toBe('collecting');
    expect(started.counts).toMatchObject({ eligible: 3, invited: 3 });
    const done = await until(fleet, started.id, (v) => v.state === 'succeeded' || v.state === 'failed');
    expect(done.reason).toBeNull();
    expect(done.state).toBe('succeeded');
    expect(done.counts).toMatchObject({ updates: 3, evaluations: 3, failed: 0 });
    expect(done.local!.accuracyAfter!).toBeGreaterThan(done.local!.accuracyBefore!);
    const ev = done.evaluation!;
    expect(ev.passed).toBe(true);
    expect(ev.candidateAccuracy!).toBeGreaterThan(ev.baseAccuracy! + 0.2);
    const version = done.candidate!.version;
    const shown = await fleet.admin.call('models.show', { name: 'iris', version });
    const manifest = Manifest.parse(shown.signed.manifest);
    expect(shown.status).toBe('candidate');
    expect(manifest.lineage).toMatchObject({ parent: base.version, method: 'federated', federatedRound: started.id });
    expect(manifest.lineage.metrics!.participants).toBe(3);
    expect(manifest.lineage.metrics!.evalAccuracy).toBeCloseTo(ev.candidateAccuracy!, 6);
    expect(manifest.golden.vectors.length).toBeGreaterThan(0);
    const rollout = await fleet.admin.call('rollouts.show', { id: done.candidate!.rolloutId! });
    expect(rollout).toMatchObject({ name: 'iris', version });
  });

  it('fails cleanly when the quorum cannot be met, and says why', async () => {
    const { fleet } = await setup();
    const v = await fleet.admin.call('fl.start', { config: config({ selection: { minSamples: 20, minParticipants: 5 } }) });
    expect(v.state).toBe('failed');
    expect(v.reason).toMatch(/quorum not met: 3 eligible devices.*5 needed/);
  });

  it('rejects and counts late, duplicate, stale and malformed updates', async () => {
    const { fleet, clients } = await forgedSetup();
    const started = await fleet.admin.call('fl.start', { config: config({ deadlineSec: 3600 }) });
    expect(started.state).toBe('collecting');
    const { id: deviceId, client } = clients[0]!;
    const { meta, tensors } = forge(fleet, started.id);
    const send = (bytes: Uint8Array): Promise<unknown> => client.publishAsync(topics.up(deviceId, 'update'), Buffer.from(bytes), { qos: 1 });
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta({ baseManifestSha256: 'f'.repeat(64) }) })));
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1).slice(1), meta: meta() })));
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1e6), meta: meta() })));
    await send(Buffer.concat([encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta() })).subarray(0, 20), Buffer.from('garbage')]));
    // A NaN in the last weight, with a checksum that matches: only the values are wrong.
    const poisoned = Buffer.from(encodeBundle({ tensors: tensors(1), meta: meta() }));
    poisoned.writeFloatLE(Number.NaN, poisoned.length - 8);
    poisoned.writeUInt32LE(crc32(poisoned.subarray(0, poisoned.length - 4)), poisoned.length - 4);
    await send(encodeFlFrame(FRAME_FL_UPDATE, poisoned));
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta() })));
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta() })));
    const v = await until(fleet, started.id, (x) => x.counts.updates === 1 && Object.values(x.rejected).reduce((a, b) => a + b, 0) >= 6, 30_000);
    expect(v.rejected).toEqual({ 'stale-base': 1, 'wrong-tensors': 1, 'norm-above-bound': 1, malformed: 1, 'non-finite': 1, duplicate: 1 });
    expect(v.counts.samples).toBe(40);
    await fleet.admin.call('fl.abort', { id: started.id });
    await send(encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta() })));
    const after = await until(fleet, started.id, (x) => x.state === 'aborted' && x.rejected.late === 1);
    expect(after.counts.updates).toBe(1);
  });

  it('resumes a round after a fleet restart, with its updates, and never counts one twice', async () => {
    const { fleet, clients } = await forgedSetup();
    const started = await fleet.admin.call('fl.start', { config: config({ deadlineSec: 3600 }) });
    const { id: deviceId, client } = clients[0]!;
    const { meta, tensors } = forge(fleet, started.id);
    const update = encodeFlFrame(FRAME_FL_UPDATE, encodeBundle({ tensors: tensors(1), meta: meta() }));
    await client.publishAsync(topics.up(deviceId, 'update'), update, { qos: 1 });
    await until(fleet, started.id, (x) => x.counts.updates === 1);
    await fleet.restart();
    const resumed = await fleet.admin.call('fl.show', { id: started.id });
    expect(resumed).toMatchObject({ state: 'collecting', counts: { updates: 1, samples: 40, invited: 3 } });
    // The same update again, as a device that never heard its first one was counted (mqtt.js reconnects on its own).
    await client.publishAsync(topics.up(deviceId, 'update'), update, { qos: 1 });
    const v = await until(fleet, started.id, (x) => x.rejected.duplicate === 1);
    expect(v.counts).toMatchObject({ updates: 1, samples: 40 });
    await fleet.admin.call('fl.abort', { id: started.id });
  });
});
