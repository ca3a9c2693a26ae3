/**
 * Models end to end, all real: a fleet with its registry and artifact server, iris models trained
 * by the project's code, an agent that downloads, verifies, stages in a child process, probates
 * on live traffic, commits or rolls back, and reports through its outbox.
 */
import { copyFileSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadModel } from '../../agent/runtime/load.js';
import { Manifest } from '../../proto/index.js';
import { irisSamples } from '../../scripts/train-iris.js';
import { cleanup, tempDir, waitFor } from '../helpers/fleet.js';
import { SILERO_DIR, SILERO_FILE } from '../helpers/static-host.js';
import { assign, inferHttp, irisModels, irisPublish, publishModel, serving, startModelAgent, startModelFleet, trafficUntil } from '../helpers/models.js';

afterEach(cleanup);

const QUICK = { probationRequests: 60, probationSec: 0.5, confidenceOutput: 'probabilities' };

describe('models end to end', () => {
  it('publish, assign, download, verify, probate, commit, serve through the standard API; the fleet shows it', async () => {
    const models = await irisModels();
    const fleet = await startModelFleet();
    const v1 = await publishModel(fleet, models.good.dir, irisPublish(QUICK));
    expect(v1.version).toBe(1);
    const { agent, url, cred, stateDir } = await startModelAgent(fleet);
    await assign(fleet, 'iris', 1, [cred.username]);
    await trafficUntil(agent, 'iris', 'iris@1 committed', () => serving(agent, 'iris', 1));

    // The API answers with what the runtime gives when called directly on the same files.
    const { features } = irisSamples();
    const direct = await loadModel(Manifest.parse(agent.models.active('iris')), models.good.dir);
    for (const row of [0, 60, 120]) {
      const res = await inferHttp(url, 'iris', features[row] as number[]);
      expect(res.status).toBe(200);
      expect(res.body.model_version).toBe('1');
      expect(typeof res.body.id).toBe('string');
      const want = await direct.run({ features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(features[row] as number[]) } });
      const got = (res.body.outputs as { name: string; data: number[] }[])[0];
      expect(got?.name).toBe('probabilities');
      expect(Float32Array.from(got?.data ?? [])).toEqual(want.probabilities?.data);
    }
    await direct.dispose();
    expect((await fetch(`${url}/v2/health/ready`)).status).toBe(200);

    // The fleet sees it served, in sync, and the lifecycle in the device's telemetry.
    await waitFor('fleet sees iris@1 committed', async () => {
      const d = await fleet.admin.call('devices.show', { deviceId: cred.username });
      return d.reported?.models.iris?.active === 1 && d.reported.models.iris.state === 'idle' && d.inSync;
    });
    await waitFor('verdict reported', async () => {
      const t = await fleet.admin.call('telemetry.list', { deviceId: cred.username, limit: 200 });
      return t.records.some((r) => r.type === 'model.verdict' && (r.body as { ok?: boolean }).ok === true);
    });
    const d = await fleet.admin.call('devices.show', { deviceId: cred.username });
    expect(d.reported?.models.iris).toMatchObject({ state: 'idle', active: 1, history: [1], failed: [], fallback: 1 });

    // A second good version commits too, and the first stays in the history for local rollback.
    const v2 = await publishModel(fleet, models.good2.dir, irisPublish(QUICK));
    await assign(fleet, 'iris', v2.version, [cred.username]);
    await trafficUntil(agent, 'iris', 'iris@2 committed', () => serving(agent, 'iris', 2));
    expect(agent.models.slotState('iris')).toMatchObject({ stable: [2, 1], failed: [] });

    // Desired state naming a version from the device's own history: a local rollback.
    await assign(fleet, 'iris', 1, [cred.username]);
    await trafficUntil(agent, 'iris', 'back on iris@1', () => serving(agent, 'iris', 1));

    // Taken out of desired state: no longer served, and its files go.
    await fleet.admin.call('desired.set', { deviceId: cred.username, patch: [{ op: 'remove', path: '/models/iris' }] });
    await waitFor('iris removed', async () => (await inferHttp(url, 'iris', [5, 3, 1.5, 0.2])).status === 404);
    expect(agent.models.models()).toEqual([]);
    await waitFor('files collected', () => readdirSync(join(stateDir, 'models', 'blobs')).length === 0);
    expect(readdirSync(join(stateDir, 'models', 'slots'))).toEqual([]);
  }, 120_000);

  it('at start-up nothing serves before it verifies; a corrupted active version gives way to the newest stable one, and the device says so', async () => {
    const models = await irisModels();
    const fleet = await startModelFleet();
    const opts = irisPublish(QUICK);
    await publishModel(fleet, models.good.dir, opts);
    const v2 = await publishModel(fleet, models.good2.dir, opts);
    const first = await startModelAgent(fleet);
    const { cred, stateDir } = first;
    await assign(fleet, 'iris', 1, [cred.username]);
    await trafficUntil(first.agent, 'iris', 'iris@1 committed', () => serving(first.agent, 'iris', 1));
    await assign(fleet, 'iris', 2, [cred.username]);
    await trafficUntil(first.agent, 'iris', 'iris@2 committed', () => serving(first.agent, 'iris', 2));

    // Feedback for a request the device answered is kept; for one it never saw, refused.
    const answered = await inferHttp(first.url, 'iris', [5.9, 3.0, 5.1, 1.8]);
    const label = (id: unknown): Promise<Response> =>
      fetch(`${first.url}/v2/models/iris/feedback`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id, label: 'virginica' }) });
    expect((await label(answered.body.id)).status).toBe(200);
    expect((await label('never-seen')).status).toBe(404);
    await first.agent.stop();

    // Flip one byte of a file of the active version, behind the agent's back.
    const weights = v2.draft.files.find((f) => f.path.endsWith('.bin'));
    const blob = join(stateDir, 'models', 'blobs', weights?.sha256 ?? '');
    const bytes = readFileSync(blob);
    bytes[100] = (bytes[100] ?? 0) ^ 0xff;
    writeFileSync(blob, bytes);

    const again = await startModelAgent(fleet, { cred, stateDir });
    expect(again.agent.models.ready()).toBe(true);
    expect(again.agent.models.active('iris')?.version).toBe(1);
    expect((await inferHttp(again.url, 'iris', [5.9, 3.0, 5.1, 1.8])).body.model_version).toBe('1');
    await waitFor('fallback reported', async () => {
      const t = await fleet.admin.call('telemetry.list', { deviceId: cred.username, limit: 200 });
      return t.records.some((r) => r.type === 'model.fallback' && (r.body as { wanted: number; serving: number }).wanted === 2 && (r.body as { serving: number }).serving === 1);
    });
  }, 120_000);

  it('key rotation: a device provisioned with the old fleet key trusts versions signed by the new one, and keeps trusting them after a restart', async () => {
    const models = await irisModels();
    const fleet = await startModelFleet();
    const opts = irisPublish(QUICK);
    await publishModel(fleet, models.good.dir, opts);
    const first = await startModelAgent(fleet); // trusts the first key only
    const { cred, stateDir } = first;
    await assign(fleet, 'iris', 1, [cred.username]);
    await trafficUntil(first.agent, 'iris', 'iris@1 committed', () => serving(first.agent, 'iris', 1));

    const rotated = await fleet.admin.call('keys.rotate', {});
    expect(rotated.previousKeyId).not.toBe(rotated.keyId);
    const v2 = await publishModel(fleet, models.good2.dir, opts);
    const shown = await fleet.admin.call('models.show', { name: 'iris', version: v2.version });
    expect(shown.signed.signature.keyId).toBe(rotated.keyId);
    await assign(fleet, 'iris', v2.version, [cred.username]);
    await trafficUntil(first.agent, 'iris', 'iris@2 committed', () => serving(first.agent, 'iris', v2.version));
    await first.agent.stop();

    // After a restart it verifies iris@2 before serving it, with the key it learned.
    const again = await startModelAgent(fleet, { cred, stateDir, trustedKeys: [fleet.publicKey] });
    expect(again.agent.models.active('iris')?.version).toBe(v2.version);
    expect(JSON.parse(readFileSync(join(stateDir, 'models', 'trusted-keys.json'), 'utf8'))).toEqual([rotated.publicKey]);
  }, 120_000);

  it('several named models on one device: a real ONNX model (Silero VAD) beside the iris TF.js model, each answering as its runtime does', async () => {
    const models = await irisModels();
    const fleet = await startModelFleet();
    const vadDir = tempDir('edgefleet-vad-');
    copyFileSync(join(SILERO_DIR, SILERO_FILE), join(vadDir, SILERO_FILE));
    const audio = Array.from({ length: 512 }, (_, i) => Math.sin(i / 8) * 0.3);
    const vadInputs = { input: { shape: [1, 512], data: audio }, sr: { shape: [], data: [16000] }, h: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) }, c: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) } };
    const golden = join(tempDir('edgefleet-vad-golden-'), 'golden.json');
    writeFileSync(golden, JSON.stringify({ vectors: [{ inputs: vadInputs }] }));
    await publishModel(fleet, vadDir, { name: 'vad', goldenInputs: golden, healthPolicy: { probationRequests: 20, probationSec: 0.5 } });
    await publishModel(fleet, models.good.dir, irisPublish(QUICK));
    const { agent, url, cred } = await startModelAgent(fleet);
    await assign(fleet, 'vad', 1, [cred.username]);
    await assign(fleet, 'iris', 1, [cred.username]);

    const vadRequest = JSON.stringify({
      inputs: [
        { name: 'input', shape: [1, 512], datatype: 'FP32', data: audio },
        { name: 'sr', shape: [], datatype: 'INT64', data: [16000] },
        { name: 'h', shape: [2, 1, 64], datatype: 'FP32', data: vadInputs.h.data },
        { name: 'c', shape: [2, 1, 64], datatype: 'FP32', data: vadInputs.c.data },
      ],
    });
    const inferVad = async (): Promise<{ status: number; body: { model_version?: string; outputs?: { name: string; data: number[] }[] } }> => {
      const res = await fetch(`${url}/v2/models/vad/infer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: vadRequest });
      return { status: res.status, body: (await res.json()) as { model_version?: string; outputs?: { name: string; data: number[] }[] } };
    };
    await trafficUntil(agent, 'iris', 'both committed', () => {
      inferVad().catch(() => undefined); // probation needs traffic on both
      return serving(agent, 'iris', 1) && serving(agent, 'vad', 1);
    });
    expect(agent.models.models().sort()).toEqual(['iris', 'vad']);
    expect((await fetch(`${url}/v2/health/ready`)).status).toBe(200);

    // The VAD answers exactly what onnxruntime gives for the same file and inputs.
    const ort = await import('onnxruntime-node');
    const session = await ort.InferenceSession.create(join(SILERO_DIR, SILERO_FILE));
    const direct = await session.run({
      input: new ort.Tensor('float32', Float32Array.from(audio), [1, 512]),
      sr: new ort.Tensor('int64', BigInt64Array.from([16000n]), []),
      h: new ort.Tensor('float32', new Float32Array(128), [2, 1, 64]),
      c: new ort.Tensor('float32', new Float32Array(128), [2, 1, 64]),
    });
    await session.release();
    const res = await inferVad();
    expect(res.status).toBe(200);
    expect(res.body.model_version).toBe('1');
    for (const name of ['output', 'hn', 'cn']) expect(Float32Array.from(res.body.outputs?.find((o) => o.name === name)?.data ?? [])).toEqual(direct[name]?.data);
    expect((await inferHttp(url, 'iris', [6.7, 3.1, 4.4, 1.4])).body.model_version).toBe('1');
  }, 120_000);

  it('shadow: the candidate scores live requests first, its answers are not returned, agreement is reported', async () => {
    const models = await irisModels();
    const fleet = await startModelFleet();
    const opts = irisPublish(QUICK);
    await publishModel(fleet, models.good.dir, opts);
    await publishModel(fleet, models.graph.dir, opts);
    const { agent, cred } = await startModelAgent(fleet);
    await assign(fleet, 'iris', 1, [cred.username]);
    await trafficUntil(agent, 'iris', 'iris@1 committed', () => serving(agent, 'iris', 1));

    await fleet.admin.call('models.assign', { name: 'iris', version: 2, deviceIds: [cred.username], shadow: { requests: 40 } });
    const answeredBy = new Set<number>();
    let sawShadow = false;
    await trafficUntil(agent, 'iris', 'shadow, then iris@2 committed', () => {
      const s = agent.models.slotState('iris');
      if (s?.state === 'shadow') {
        sawShadow = true;
        answeredBy.add(s.serving ?? 0);
      }
      return serving(agent, 'iris', 2);
    });
    expect(sawShadow).toBe(true);
    // While the candidate was in shadow, version 1 answered every request.
    expect([...answeredBy]).toEqual([1]);
    await waitFor('shadow report', async () => {
      const t = await fleet.admin.call('telemetry.list', { deviceId: cred.username, limit: 200 });
      const shadow = t.records.find((r) => r.type === 'model.shadow');
      // The graph export of the same weights agrees with the layers model on every request.
      return shadow !== undefined && (shadow.body as { agreement: number; requests: number }).agreement === 1 && (shadow.body as { requests: number }).requests === 40;
    });
  }, 120_000);
});
