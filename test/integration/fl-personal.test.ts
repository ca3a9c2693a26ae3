import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { ModelSlotReport } from '../../proto/index.js';
import type { Agent } from '../../agent/agent.js';
import { irisSamples } from '../../scripts/train-iris.js';
import { waitFor } from '../helpers/fleet.js';
import { assign, publishTrainable, serving, startModelAgent, startModelFleet, type ModelFleet } from '../helpers/models.js';

/**
 * Personal layers on a real agent: the iris `wrong` variant with its output layer marked personal.
 * A round trains it on the device's true labels; the trained output layer never leaves the device,
 * is judged against the global weights on the device's holdout, serves while it does better, and
 * is carried over to the next global version; a personal layer that does worse is dropped.
 */

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const publish = async (fleet: ModelFleet, variant: 'wrong' | 'good' = 'wrong'): Promise<number> =>
  (await publishTrainable(fleet, variant, { training: { personalLayers: ['probabilities'] } })).version;

function personalized(agent: Agent): ModelSlotReport['personalized'] {
  return agent.models.report().iris?.personalized;
}

describe('personal layers', { timeout: 240_000 }, () => {
  it('stay on the device, serve while they beat the global weights, carry over to the next version, and are dropped when they do worse', async () => {
    const fleet = await startModelFleet();
    cleanups.push(() => fleet.stop());
    const v1 = await publish(fleet);
    const { agent, stateDir } = await startModelAgent(fleet, { deviceId: 'personal-0', learner: { maxCpuLoad: 1 } });
    cleanups.push(() => agent.stop());
    await assign(fleet, 'iris', v1, ['personal-0']);
    await waitFor('serving v1', () => serving(agent, 'iris', v1), 60_000);
    const { features, labels } = irisSamples();
    features.forEach((row, r) => agent.models.addSample('iris', Float32Array.from(row), [4], labels[r]));
    await waitFor('the fleet sees the samples', () => (fleet.server.fleetStore.reported.get('personal-0')?.doc.models.iris?.samples ?? 0) === 150, 30_000);
    const probe = async (): Promise<number[]> => Array.from((await agent.models.infer('iris', { features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(features[60]!) } })).outputs.probabilities!.data as Float32Array);
    const globalOut = await probe();

    const round = await fleet.admin.call('fl.start', {
      config: { model: 'iris', baseVersion: v1, selection: { minSamples: 20, minParticipants: 1 }, train: { epochs: 40, optimizer: 'adam', learningRate: 0.05, clipNorm: 50 }, deadlineSec: 60, evaluation: { minDevices: 1 } },
    });
    await waitFor('the round ends', async () => ['succeeded', 'failed'].includes((await fleet.admin.call('fl.show', { id: round.id })).state), 120_000);
    // What left the device: only the hidden layer.
    const update = fleet.server.fleetStore.fl.participants(round.id, 'train')[0]!;
    expect(update.state).toBe('updated');
    expect(fleet.server.rounds.base({ id: round.id, model: 'iris', baseVersion: v1 }).shared.specs.map((s) => s.name)).toEqual(['hidden0/kernel', 'hidden0/bias']);

    await waitFor('the personalized variant serves', () => personalized(agent) !== undefined, 60_000);
    const p = personalized(agent)!;
    expect(p.version).toBe(v1);
    expect(p.layers).toEqual(['probabilities']);
    expect(p.accuracy!).toBeGreaterThan(p.globalAccuracy!);
    expect(await probe()).not.toEqual(globalOut);
    await waitFor('the fleet sees it', () => fleet.server.fleetStore.reported.get('personal-0')?.doc.models.iris?.personalized?.version === v1, 30_000);

    // The same weights as a new global version: the personal layer fits, is judged again, and carries over.
    const v2 = await publish(fleet);
    await assign(fleet, 'iris', v2, ['personal-0']);
    await waitFor('personalized on v2', () => personalized(agent)?.version === v2, 60_000);

    // A new global version the personal layer does worse on (the well-trained `good` variant, whose
    // hidden features the personal head was not trained on): dropped, and the global version serves as published.
    const v3 = await publish(fleet, 'good');
    await assign(fleet, 'iris', v3, ['personal-0']);
    await waitFor('serving v3', () => serving(agent, 'iris', v3), 60_000);
    const file = join(stateDir, 'learner', 'iris.personal');
    await waitFor('the worse personal layer dropped', () => !existsSync(file), 60_000);
    expect(personalized(agent)).toBeUndefined();
  });
});
