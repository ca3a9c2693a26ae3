import { afterEach, describe, expect, it } from 'vitest';
import { Manifest, type RoundView } from '../../proto/index.js';
import { SimFleet, deviceIds, type FlActivity } from '../../scripts/sim/fleet.js';
import { cleanup, onCleanup, tempDir, waitFor } from '../helpers/fleet.js';
import { publishTrainable, startModelFleet, type ModelFleet } from '../helpers/models.js';

/**
 * Simulated devices in a real federated round: a fleet with its embedded broker and artifact
 * server, a trainable iris base (the `wrong` variant, trained on scrambled labels) in production,
 * and a SimFleet whose devices hold Dirichlet-skewed shards of the true iris labels (`--fl iris`).
 * They must report the base's real manifest sha256 and their sample counts to be eligible, fetch
 * the base's files from the artifact server, train with the agent's own Participant and job code,
 * and measure the candidate on their holdouts.
 */

afterEach(cleanup);

const DEVICES = 8;

async function until(fleet: ModelFleet, id: number, done: (v: RoundView) => boolean, timeoutMs: number): Promise<RoundView> {
  let view!: RoundView;
  await waitFor(`round ${id}`, async () => done((view = await fleet.admin.call('fl.show', { id }))), timeoutMs);
  return view;
}

describe('simulated devices in a federated round', { timeout: 300_000 }, () => {
  it('join, train, send updates and evaluate the candidate, which is registered with its lineage', async () => {
    const fleet = await startModelFleet();
    const base = await publishTrainable(fleet, 'wrong', { production: true });

    const scenario = { devices: DEVICES, prefix: 'flsim' };
    const ids = deviceIds(scenario);
    const credentials: Record<string, { username: string; password: string }> = {};
    for (const deviceId of ids) credentials[deviceId] = (await fleet.admin.call('devices.add', { deviceId })).credential;
    await fleet.admin.call('models.assign', { name: 'iris', version: base.version, deviceIds: ids });

    const sim = new SimFleet({
      url: fleet.server.brokerUrl,
      scenario,
      credentials,
      reportIntervalMs: 1000,
      initial: { models: { iris: base.version } },
      learning: { dataset: 'iris', artifactsUrl: fleet.artifactsUrl, trustedKeys: [fleet.publicKey], cacheDir: tempDir('edgefleet-sim-fl-') },
    });
    const activity: { id: string; what: FlActivity; detail: string | null }[] = [];
    sim.on('fl', (id, what, detail) => activity.push({ id, what, detail }));
    // Registered after the fleet's own teardown, so it runs first: the devices say goodbye to a live broker.
    onCleanup(() => sim.stop({ clearRetained: true }));
    await sim.start();

    const samples = sim.samples()!;
    expect(samples).toMatchObject({ model: 'iris', total: 150 });
    // What the fleet's eligibility check reads: the base's real manifest sha256, and a sample count.
    await waitFor(
      'the fleet sees every simulated device on the base, with samples',
      () =>
        ids.every((id) => {
          const slot = fleet.server.fleetStore.reported.get(id)?.doc.models.iris;
          return slot?.active === base.version && slot.activeSha256 === base.manifestSha256 && (slot.samples ?? 0) >= samples.min;
        }),
      30_000,
    );
    const reported = ids.map((id) => fleet.server.fleetStore.reported.get(id)!.doc.models.iris!.samples!);
    expect(reported.reduce((a, b) => a + b, 0)).toBe(150);

    const started = await fleet.admin.call('fl.start', {
      config: {
        model: 'iris',
        selection: { minSamples: samples.min, minParticipants: 5, maxParticipants: DEVICES },
        train: { epochs: 30, batchSize: 8, learningRate: 0.05, optimizer: 'adam', clipNorm: 50 },
        deadlineSec: 120,
        evaluation: { minDevices: 3, deadlineSec: 90, maxAccuracyDrop: 0.02 },
      },
    });
    expect(started.state).toBe('collecting');
    expect(started.counts).toMatchObject({ eligible: DEVICES, invited: DEVICES });
    const done = await until(fleet, started.id, (v) => v.state === 'succeeded' || v.state === 'failed', 240_000);
    expect(done.reason).toBeNull();
    expect(done.state).toBe('succeeded');
    expect(done.counts.updates).toBeGreaterThanOrEqual(5);
    expect(done.counts.samples).toBeGreaterThan(0);
    expect(done.evaluation!.passed).toBe(true);
    expect(done.evaluation!.candidateAccuracy!).toBeGreaterThan(done.evaluation!.baseAccuracy!);

    // The updates came from the simulated devices, through their own connections.
    const updaters = new Set(activity.filter((a) => a.what === 'update').map((a) => a.id));
    expect(updaters.size).toBe(done.counts.updates);
    for (const id of updaters) expect(ids).toContain(id);
    expect(activity.filter((a) => a.what === 'evaluation').length).toBe(done.counts.evaluations);
    expect(activity.filter((a) => a.what === 'fetch-failed')).toEqual([]);

    const shown = await fleet.admin.call('models.show', { name: 'iris', version: done.candidate!.version });
    const manifest = Manifest.parse(shown.signed.manifest);
    expect(shown.status).toBe('candidate');
    expect(manifest.lineage).toMatchObject({ parent: base.version, method: 'federated', federatedRound: started.id });
    expect(manifest.lineage.metrics!.participants).toBe(done.counts.updates);
  });
});
