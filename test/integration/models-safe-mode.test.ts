/**
 * What fleet rollouts lean on at the device, all real (fleet, broker, artifact server, agent, iris
 * models): the serving version's figures in every report, a fleet revert that switches at once
 * even while the candidate is on probation, and emergency safe mode onto the pinned fallback and
 * back without a download.
 */
import { afterEach, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { ServingMetrics } from '../../proto/index.js';
import { irisSamples } from '../../scripts/train-iris.js';
import { applied, cleanup, waitFor } from '../helpers/fleet.js';
import { ALL_ROWS, assign, inferHttp, irisModels, irisPublish, irisVectorsFile, publishModel, serving, startModelAgent, startModelFleet, trafficUntil, type ModelFleet } from '../helpers/models.js';

afterEach(cleanup);

const QUICK = { probationRequests: 60, probationSec: 0.5, confidenceOutput: 'probabilities' };
/** A window that never closes within a test: only a revert or safe mode ends this probation. */
const LONG = { ...QUICK, probationSec: 600 };
/** Well under the LONG window, well over an MQTT round trip and a verified load. */
const AT_ONCE_MS = 10_000;

const VERSICOLOR = [6.7, 3.1, 4.4, 1.4];

function metricsOf(agent: Agent): ServingMetrics {
  const m = agent.models.report().iris?.metrics;
  if (!m) throw new Error(`no serving metrics: ${JSON.stringify(agent.models.report())}`);
  return m;
}

async function answeredBy(url: string): Promise<string> {
  const res = await inferHttp(url, 'iris', VERSICOLOR);
  return String(res.body.model_version);
}

/**
 * Waits, sending no traffic (traffic could let a probation window judge the candidate instead),
 * until `version` serves, then checks that it answers.
 */
async function servesAtOnce(agent: Agent, url: string, version: number): Promise<void> {
  await waitFor(`iris@${version} serves`, () => agent.models.active('iris')?.version === version, AT_ONCE_MS);
  expect(await answeredBy(url)).toBe(String(version));
}

async function setSafeMode(fleet: ModelFleet, deviceId: string, on: boolean): Promise<number> {
  const patch = on ? [{ op: 'add' as const, path: '/safeMode', value: true }] : [{ op: 'remove' as const, path: '/safeMode' }];
  const r = await fleet.admin.call('desired.set', { deviceId, patch });
  expect(r.doc.safeMode).toBe(on ? true : undefined);
  return r.version;
}

async function telemetry(fleet: ModelFleet, deviceId: string, type: string): Promise<Record<string, unknown>[]> {
  const t = await fleet.admin.call('telemetry.list', { deviceId, limit: 500 });
  return t.records.filter((r) => r.type === type).map((r) => r.body as Record<string, unknown>);
}

/** Starts a fleet and an agent with iris@1 committed. */
async function withV1(models?: Record<string, unknown>): Promise<{ fleet: ModelFleet; agent: Agent; url: string; deviceId: string; stateDir: string; cred: Awaited<ReturnType<typeof startModelAgent>>['cred'] }> {
  const { good } = await irisModels();
  const fleet = await startModelFleet();
  await publishModel(fleet, good.dir, irisPublish(QUICK));
  const { agent, url, cred, stateDir } = await startModelAgent(fleet, models ? { models } : {});
  const deviceId = cred.username;
  await assign(fleet, 'iris', 1, [deviceId]);
  await trafficUntil(agent, 'iris', 'iris@1 committed', () => serving(agent, 'iris', 1));
  return { fleet, agent, url, deviceId, stateDir, cred };
}

/** Publishes a version and assigns it; with QUICK, drives traffic until it commits. */
async function commitNext(fleet: ModelFleet, agent: Agent, deviceId: string, dir: string): Promise<number> {
  const { version } = await publishModel(fleet, dir, irisPublish(QUICK));
  await assign(fleet, 'iris', version, [deviceId]);
  await trafficUntil(agent, 'iris', `iris@${version} committed`, () => serving(agent, 'iris', version));
  return version;
}

/** Publishes a version with a window that does not close and waits until it is on probation. */
async function onProbation(fleet: ModelFleet, agent: Agent, deviceId: string, dir: string): Promise<number> {
  const { version } = await publishModel(fleet, dir, irisPublish(LONG));
  await assign(fleet, 'iris', version, [deviceId]);
  await waitFor(`iris@${version} on probation`, () => agent.models.slotState('iris')?.state === 'probation' && agent.models.slotState('iris')?.serving === version, 60_000);
  return version;
}

describe('serving metrics', () => {
  it('the report carries what the serving version did, and counts requests, errors and non-finite answers after commit too', async () => {
    const { fleet, agent, deviceId } = await withV1();
    const atCommit = metricsOf(agent);
    expect(atCommit).toMatchObject({ version: 1, errors: 0, nonFinite: 0 });
    expect(atCommit.requests).toBeGreaterThanOrEqual(QUICK.probationRequests);

    // After commit the watch window scans the outputs; the version's own figures must go on.
    const { features } = irisSamples();
    for (let i = 0; i < 40; i++) await agent.models.infer('iris', { features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(features[(i * 7) % 150] as number[]) } });
    // An empty batch passes input validation but TF.js cannot run it: a real runtime failure.
    for (let i = 0; i < 2; i++) {
      await expect(agent.models.infer('iris', { features: { dtype: 'float32', shape: [0, 4], data: new Float32Array(0) } })).rejects.toMatchObject({ code: 'EF_RUNTIME_FAILED' });
    }
    const after = metricsOf(agent);
    expect(after).toMatchObject({ version: 1, requests: atCommit.requests + 42, errors: 2, nonFinite: 0 });
    expect(after.p95Ms).toBeGreaterThan(0);
    expect(after.meanConfidence).toBeGreaterThan(0.5);
    expect(after.meanConfidence).toBeLessThanOrEqual(1);
    for (const x of [after.p95Ms ?? 0, after.meanConfidence ?? 0]) expect(Math.round(x * 1000) / 1000).toBe(x);

    // The fleet sees the same figures in the device's reported state: inference is not a change of
    // state, so they go with the next report, here the one after a desired-state change.
    const tuned = await fleet.admin.call('desired.set', { deviceId, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 10 }] });
    await applied(agent, tuned.version);
    await waitFor('fleet sees the metrics', async () => (await fleet.admin.call('devices.show', { deviceId })).reported?.models.iris?.metrics?.requests === after.requests);
    expect((await fleet.admin.call('devices.show', { deviceId })).reported?.models.iris?.metrics).toEqual(after);

    // A version whose every answer is NaN, let through by its own policy: after commit its
    // non-finite answers still count (the watch window's scan is what finds them).
    const { nan } = await irisModels();
    const { version: v2 } = await publishModel(fleet, nan.dir, { name: 'iris', baselineInputs: irisVectorsFile(ALL_ROWS), healthPolicy: { ...QUICK, nanRateMax: 1 } });
    await assign(fleet, 'iris', v2, [deviceId]);
    await trafficUntil(agent, 'iris', 'the NaN version committed', () => serving(agent, 'iris', v2));
    const nanAtCommit = metricsOf(agent);
    for (let i = 0; i < 30; i++) await agent.models.infer('iris', { features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(features[i] as number[]) } });
    const nanAfter = metricsOf(agent);
    expect(nanAfter).toMatchObject({ version: v2, requests: nanAtCommit.requests + 30, errors: 0, meanConfidence: null });
    expect(nanAfter.nonFinite).toBe(nanAfter.requests);
  }, 120_000);
});

describe('a fleet revert', () => {
  it('switches back at once while the candidate is on probation, and the candidate is marked failed', async () => {
    const { fleet, agent, url, deviceId } = await withV1();
    const { good2 } = await irisModels();
    const v2 = await onProbation(fleet, agent, deviceId, good2.dir);
    expect(await answeredBy(url)).toBe(String(v2));

    await assign(fleet, 'iris', 1, [deviceId]);
    await servesAtOnce(agent, url, 1);
    await waitFor('slot settled', () => serving(agent, 'iris', 1));
    const s = agent.models.slotState('iris');
    expect(s).toMatchObject({ stable: [1], candidate: null, failed: [{ version: v2, reason: 'reverted by fleet' }], lastVerdict: { version: v2, ok: false, reason: 'reverted by fleet' } });
    await waitFor('the fleet sees iris@2 failed and the verdict', async () => {
      const d = await fleet.admin.call('devices.show', { deviceId });
      const verdicts = await telemetry(fleet, deviceId, 'model.verdict');
      return d.reported?.models.iris?.failed.includes(v2) === true && verdicts.some((v) => v.version === v2 && v.reason === 'reverted by fleet' && v.rolledBackTo === 1);
    });
  }, 120_000);

  it('reaches the pinned fallback when it dropped out of the stable history: during probation, and from idle', async () => {
    // keepStable 1: once iris@2 commits, iris@1 is only the pinned fallback.
    const { fleet, agent, url, deviceId } = await withV1({ keepStable: 1 });
    const { good, good2 } = await irisModels();
    await commitNext(fleet, agent, deviceId, good2.dir);
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [2], fallback: 1 });

    // Reverted to the fallback while iris@3 is on probation: a verified load, not a download.
    const v3 = await onProbation(fleet, agent, deviceId, good.dir);
    await assign(fleet, 'iris', 1, [deviceId]);
    await servesAtOnce(agent, url, 1);
    await waitFor('slot settled', () => serving(agent, 'iris', 1));
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [1], fallback: 1, failed: [{ version: v3, reason: 'reverted by fleet' }] });

    // From idle: iris@4 commits, then desired state names the fallback again.
    const v4 = await commitNext(fleet, agent, deviceId, good2.dir);
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [v4], fallback: 1 });
    const transfer = agent.models.slotState('iris')?.transfer;
    await assign(fleet, 'iris', 1, [deviceId]);
    await trafficUntil(agent, 'iris', 'back on the fallback', () => serving(agent, 'iris', 1));
    // Below the floor a download would have been refused: it was a local switch.
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [1], failed: [{ version: v3 }] });
    expect(agent.models.slotState('iris')?.transfer).toEqual(transfer);
  }, 180_000);
});

describe('safe mode', () => {
  it('serves the fallback at once, survives a restart, and returns to the committed version without a download', async () => {
    const { fleet, agent, url, deviceId, cred, stateDir } = await withV1();
    const { good2 } = await irisModels();
    await commitNext(fleet, agent, deviceId, good2.dir);
    const before = agent.models.slotState('iris');
    expect(before).toMatchObject({ stable: [2, 1], fallback: 1, serving: 2, safeMode: false });

    await applied(agent, await setSafeMode(fleet, deviceId, true));
    await servesAtOnce(agent, url, 1);
    await waitFor('slot in safe mode', () => agent.models.slotState('iris')?.safeMode === true);
    // A switch, not a lifecycle step: nothing failed, nothing fetched, the history as it was.
    expect(agent.models.slotState('iris')).toMatchObject({ state: 'idle', serving: 1, stable: [2, 1], failed: [], transitions: before?.transitions });
    await waitFor('fleet sees iris@1 active', async () => {
      const m = (await fleet.admin.call('devices.show', { deviceId })).reported?.models.iris;
      return m?.active === 1 && m.metrics?.version === 1 && m.state === 'idle';
    });
    await waitFor('safe-mode event', async () => (await telemetry(fleet, deviceId, 'model.safe-mode')).some((e) => e.on === true && e.serving === 1));

    // A restart in safe mode: start-up verifies and serves what the slot file says, and stays there.
    await agent.stop();
    const again = await startModelAgent(fleet, { cred, stateDir });
    expect(again.agent.models.active('iris')?.version).toBe(1);
    expect(again.agent.models.slotState('iris')).toMatchObject({ serving: 1, safeMode: true });

    await applied(again.agent, await setSafeMode(fleet, deviceId, false));
    await servesAtOnce(again.agent, again.url, 2);
    await waitFor('slot out of safe mode', () => again.agent.models.slotState('iris')?.safeMode === false);
    expect(again.agent.models.slotState('iris')).toMatchObject({ state: 'idle', serving: 2, stable: [2, 1], failed: [], transitions: before?.transitions });
    // No download: the last transfer recorded is still iris@2's, and no lifecycle step ran.
    expect(again.agent.models.slotState('iris')?.transfer).toEqual(before?.transfer);
    await waitFor('safe-mode off event', async () => (await telemetry(fleet, deviceId, 'model.safe-mode')).some((e) => e.on === false && e.serving === 2));
  }, 120_000);

  it('abandons a candidate on probation without failing it, starts nothing new, and the normal lifecycle resumes when it ends', async () => {
    const { fleet, agent, url, deviceId } = await withV1();
    const { good, good2 } = await irisModels();
    const v2 = await onProbation(fleet, agent, deviceId, good2.dir);

    await applied(agent, await setSafeMode(fleet, deviceId, true));
    await servesAtOnce(agent, url, 1);
    await waitFor('slot settled in safe mode', () => serving(agent, 'iris', 1) && agent.models.slotState('iris')?.safeMode === true);
    expect(agent.models.slotState('iris')).toMatchObject({ candidate: null, failed: [], stable: [1] });

    // A new version named while safe mode holds: applied, and nothing starts.
    const { version: v3 } = await publishModel(fleet, good.dir, irisPublish(QUICK));
    expect(v3).toBe(v2 + 1);
    await assign(fleet, 'iris', v3, [deviceId]);
    const d = await fleet.admin.call('desired.get', { deviceId });
    await applied(agent, d.version);
    expect(agent.models.slotState('iris')).toMatchObject({ state: 'idle', serving: 1, candidate: null, safeMode: true });

    // Off: iris@3 is not held here, so it is downloaded, put on probation and committed as usual.
    await applied(agent, await setSafeMode(fleet, deviceId, false));
    await trafficUntil(agent, 'iris', 'iris@3 committed', () => serving(agent, 'iris', v3));
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [v3, 1], failed: [], safeMode: false });
  }, 120_000);
});
