/**
 * Staged rollouts with real agents (real broker, artifact server, iris models, probation on live
 * traffic): a good version walks its plan to every device and is promoted; a bad version halts at
 * the canary, which is back on the previous version, and is quarantined; an approval gate waits
 * until approved, and an abort while the canary is still on probation switches it back at once.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { RolloutPlanInput, RolloutView } from '../../proto/index.js';
import { irisSamples } from '../../scripts/train-iris.js';
import { cleanup, waitFor } from '../helpers/fleet.js';
import { ALL_ROWS, assign, irisModels, irisPublish, irisVectorsFile, publishModel, serving, startModelAgent, startModelFleet, type ModelFleet } from '../helpers/models.js';

/**
 * Device-side latency, memory and drift checks are loose here: on a busy CI machine three agents
 * share two cores and one process (whose RSS is the whole test's) with the fleet, and a probation of
 * a few dozen requests makes a noisy PSI. What this suite judges is the fleet's rollout.
 */
const QUICK = { probationRequests: 30, probationSec: 0.3, confidenceOutput: 'probabilities', latencyRatioMax: 50, latencySlackMs: 50, memoryGrowthMb: 4096, psiMax: 1 };
/** Gates that judge the real figures but do not trip on the scheduling noise of three agents in one test process. */
const GATES = { minRequests: 10, maxLatencyRatio: 20, maxConfidenceDrop: 0.2 };
const PLAN: RolloutPlanInput = {
  steps: [
    { type: 'wave', count: 1, timeoutSec: 60 },
    { type: 'analysis', windowSec: 1, gates: GATES },
    { type: 'wave', percent: 100, timeoutSec: 60 },
    { type: 'analysis', windowSec: 1, minDevices: 3, gates: GATES },
  ],
};

let fleet: ModelFleet;
const agents: { agent: Agent; id: string }[] = [];

beforeAll(async () => {
  const { good } = await irisModels();
  fleet = await startModelFleet();
  await publishModel(fleet, good.dir, irisPublish(QUICK));
  for (let i = 0; i < 3; i++) {
    const h = await startModelAgent(fleet, { deviceId: `roll-${i}` });
    agents.push({ agent: h.agent, id: h.cred.username });
  }
  await assign(fleet, 'iris', 1, agents.map((a) => a.id));
  await trafficUntil('iris@1 committed everywhere', () => agents.every((a) => serving(a.agent, 'iris', 1)));
}, 180_000);

afterAll(cleanup);

/** Live traffic on every agent (the scrambled iris rows) until `until()` holds. */
async function trafficUntil(what: string, until: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const { features } = irisSamples();
  let i = 0;
  await waitFor(
    what,
    async () => {
      for (let k = 0; k < 4; k++, i++) {
        for (const { agent } of agents) {
          // Each agent walks every row in the same scrambled order, so its traffic looks like the baseline.
          const row = features[(i * 7919) % features.length] as number[];
          await agent.models.infer('iris', { features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(row) } }).catch(() => undefined);
        }
      }
      return until();
    },
    timeoutMs,
  );
}

async function show(id: number): Promise<RolloutView> {
  return fleet.admin.call('rollouts.show', { id });
}

async function status(name: string, version: number): Promise<string> {
  return (await fleet.admin.call('models.show', { name, version })).status;
}

function desiredOf(id: string): number | undefined {
  return fleet.server.fleetStore.desired.get(id)?.doc.models.iris?.version;
}

describe('rollouts with real agents', () => {
  it('a good version reaches every device through its waves and gates, and is promoted to production', async () => {
    const { good2 } = await irisModels();
    const v2 = await publishModel(fleet, good2.dir, irisPublish(QUICK));
    const { rollout } = await fleet.admin.call('rollouts.start', { name: 'iris', version: v2.version, plan: PLAN });
    if (!rollout) throw new Error('no rollout started');
    let last: RolloutView = rollout;
    await trafficUntil('rollout succeeded', async () => {
      last = await show(rollout.id);
      if (last.status.state === 'halted') throw new Error(`halted: ${last.status.reason}; verdicts: ${JSON.stringify(agents.map((a) => a.agent.models.slotState('iris')?.lastVerdict))}`);
      return last.status.state === 'succeeded';
    });
    expect(last.status.total).toMatchObject({ members: 3, failed: 0 });
    expect(last.status.waves.map((w) => w.members)).toEqual([1, 2]);
    // The gates judged real figures from both cohorts.
    expect(last.status.candidate?.requests).toBeGreaterThan(0);
    expect(last.status.baseline?.requests).toBeGreaterThan(0);
    await trafficUntil('every agent committed iris@2', () => agents.every((a) => serving(a.agent, 'iris', v2.version)));
    expect(await status('iris', v2.version)).toBe('production');

    // The same version again is a no-op that says so.
    const again = await fleet.admin.call('rollouts.start', { name: 'iris', version: v2.version, plan: PLAN });
    expect(again.rollout).toBeNull();
    expect(again.noop).toMatch(/already has iris@2/);
  }, 120_000);

  it('a version that fails probation halts at the canary: it is back on the previous version, nobody else got it, and it is quarantined', async () => {
    const { nan } = await irisModels();
    const before = agents.map((a) => desiredOf(a.id));
    // No golden vectors (they would stop it at staging): live traffic is what catches it.
    const bad = await publishModel(fleet, nan.dir, { name: 'iris', baselineInputs: irisVectorsFile(ALL_ROWS), healthPolicy: QUICK });
    const { rollout } = await fleet.admin.call('rollouts.start', { name: 'iris', version: bad.version, plan: PLAN });
    if (!rollout) throw new Error('no rollout started');
    let last: RolloutView = rollout;
    await trafficUntil('rollout halted', async () => {
      last = await show(rollout.id);
      return last.status.state === 'halted';
    });
    expect(last.status.total.members).toBe(1);
    expect(last.status.reason).toMatch(/failed-share/);
    expect(await status('iris', bad.version)).toBe('quarantined');
    expect(agents.map((a) => desiredOf(a.id))).toEqual(before);
    await trafficUntil('every agent serves the previous version', () => agents.every((a, i) => a.agent.models.active('iris')?.version === before[i]));
    await waitFor('revert counted', async () => {
      const s = (await show(rollout.id)).status;
      return s.revert?.reverted === 1;
    });
    const canary = agents.find((a) => a.agent.models.slotState('iris')?.failed.some((f) => f.version === bad.version));
    expect(canary).toBeDefined();
  }, 120_000);

  it('an approval gate waits; an abort while the canary is on probation switches it back at once', async () => {
    const { good } = await irisModels();
    const before = agents.map((a) => a.agent.models.active('iris')?.version);
    // A probation window that never closes within the test: only the abort can end it.
    const v = await publishModel(fleet, good.dir, irisPublish({ ...QUICK, probationSec: 600 }));
    const plan: RolloutPlanInput = { steps: [{ type: 'wave', count: 1 }, { type: 'pause', untilApproved: true }, { type: 'wave', percent: 100 }] };
    const { rollout } = await fleet.admin.call('rollouts.start', { name: 'iris', version: v.version, plan });
    if (!rollout) throw new Error('no rollout started');
    await trafficUntil('canary on probation', () => agents.some((a) => a.agent.models.slotState('iris')?.state === 'probation'));
    await waitFor('awaiting approval', async () => (await show(rollout.id)).status.state === 'awaiting-approval');
    // It waits: more time and traffic change nothing.
    await trafficUntil('a while', async () => (await show(rollout.id)).status.state !== 'awaiting-approval', 2000).catch(() => undefined);
    const waiting = await show(rollout.id);
    expect(waiting.status.state).toBe('awaiting-approval');
    expect(waiting.status.total.members).toBe(1);

    const t0 = Date.now();
    const aborted = await fleet.admin.call('rollouts.abort', { id: rollout.id, reason: 'test' });
    expect(aborted.status.state).toBe('aborted');
    await waitFor('canary switched back', () => agents.every((a, i) => a.agent.models.active('iris')?.version === before[i]), 10_000);
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(await status('iris', v.version)).toBe('quarantined');
    await expect(fleet.admin.call('rollouts.approve', { id: rollout.id })).rejects.toMatchObject({ code: 'EF_ROLLOUT_CONFLICT' });
  }, 120_000);
});
