/**
 * Bad input for model updates, all real: a fleet with its registry and artifact server, an agent
 * serving iris@1, then a new version that reaches the device tampered, truncated, grown,
 * unsigned, wrongly signed, edited, swapped, too large for the device, a downgrade, expired or
 * quarantined. Each is refused with its coded reason, nothing of it lands in the store's views,
 * the fleet hears the verdict, and the device keeps answering with what it served.
 *
 * One fleet for the file (publishing is the slow, shared part); every case has its own device,
 * agent and state directory, so the cases do not depend on each other or on their order.
 */
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { keyIdOf } from '../../proto/index.js';
import { irisSamples, type IrisModel, type IrisVariant } from '../../scripts/train-iris.js';
import { cleanup, waitFor } from '../helpers/fleet.js';
import { startEvilProxy, type EvilMode } from '../helpers/evil-proxy.js';
import {
  ALL_ROWS,
  GOLDEN_ROWS,
  assign,
  inferHttp,
  irisModels,
  irisVectorsFile,
  publishModel,
  serving,
  startModelAgent,
  startModelFleet,
  trafficUntil,
  type ModelFleet,
} from '../helpers/models.js';

const QUICK = { probationRequests: 60, probationSec: 0.5 };

type AgentHandle = Awaited<ReturnType<typeof startModelAgent>>;

let fleet: ModelFleet;
let models: Record<IrisVariant, IrisModel>;
/** iris@1 (good) and iris@2 (good2), published once for the file. */
let v1: Awaited<ReturnType<typeof publishModel>>;
let v2: Awaited<ReturnType<typeof publishModel>>;
/** The files of iris@2 that a device serving iris@1 does not hold yet: what it downloads. */
let v2Only: string[];

/** Each case's agents, stopped when the case ends (the fleet stays for the next case). */
const agents: AgentHandle[] = [];

async function publishIris(variant: IrisVariant, opts: { baseline?: boolean; expiresInMs?: number } = {}): Promise<Awaited<ReturnType<typeof publishModel>>> {
  return publishModel(fleet, models[variant].dir, {
    name: 'iris',
    goldenInputs: irisVectorsFile(GOLDEN_ROWS),
    ...(opts.baseline === false ? {} : { baselineInputs: irisVectorsFile(ALL_ROWS) }),
    healthPolicy: QUICK,
    edit: (d) => {
      // Set as late as possible: the draft's golden outputs and baseline take a while to compute.
      if (opts.expiresInMs !== undefined) d.expiresAt = Date.now() + opts.expiresInMs;
    },
  });
}

beforeAll(async () => {
  models = await irisModels();
  fleet = await startModelFleet();
  v1 = await publishIris('good');
  v2 = await publishIris('good2');
  expect([v1.version, v2.version]).toEqual([1, 2]);
  const held = new Set(v1.draft.files.map((f) => f.sha256));
  v2Only = v2.draft.files.map((f) => f.sha256).filter((s) => !held.has(s));
  // Otherwise the device would download nothing of iris@2 and a corrupted file would never be seen.
  expect(v2Only.length).toBeGreaterThan(0);
}, 120_000);

afterEach(async () => {
  while (agents.length > 0) await (agents.pop() as AgentHandle).agent.stop();
});

afterAll(cleanup);

/** A new device whose agent has committed iris@1 and serves it. */
async function deviceOnV1(modelsCfg: Record<string, unknown> = {}): Promise<AgentHandle> {
  const h = await startModelAgent(fleet, { models: modelsCfg });
  agents.push(h);
  await assign(fleet, 'iris', v1.version, [h.cred.username]);
  await trafficUntil(h.agent, 'iris', 'iris@1 committed', () => serving(h.agent, 'iris', v1.version));
  return h;
}

function viewsOf(stateDir: string): string[] {
  const dir = join(stateDir, 'models', 'views', 'iris');
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

function blobExists(stateDir: string, sha256: string): boolean {
  return existsSync(join(stateDir, 'models', 'blobs', sha256));
}

/**
 * The refusal, as the device records it, serves through it, keeps in its store and reports it:
 * `version` failed with `code`, the slot is idle serving `keeps`, which still answers over HTTP.
 */
async function expectRefused(h: AgentHandle, version: number, code: string, opts: { keeps?: number; noView?: boolean } = {}): Promise<void> {
  const keeps = opts.keeps ?? v1.version;
  const { agent } = h;
  await waitFor(`iris@${version} refused`, () => agent.models.slotState('iris')?.failed.some((f) => f.version === version) ?? false, 20_000).catch((e: unknown) => {
    throw new Error(`${(e as Error).message}; slot: ${JSON.stringify(agent.models.slotState('iris'))}`);
  });

  // (1) Marked failed with the expected reason.
  const s = agent.models.slotState('iris');
  expect(s?.lastVerdict).toMatchObject({ version, ok: false, code });
  expect(s?.failed.find((f) => f.version === version)?.reason).toBe(code);

  // (2) Still serving what it served: the slot, and the standard API.
  expect(s).toMatchObject({ state: 'idle', serving: keeps, candidate: null });
  expect(serving(agent, 'iris', keeps)).toBe(true);
  const { features } = irisSamples();
  for (const row of [0, 60, 120]) {
    const res = await inferHttp(h.url, 'iris', features[row] as number[]);
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    expect(res.body.model_version).toBe(String(keeps));
  }

  // (3) Nothing of the refused version in the store's views (nor a half-built one).
  if (opts.noView !== false) {
    expect(existsSync(join(h.stateDir, 'models', 'views', 'iris', String(version)))).toBe(false);
    expect(viewsOf(h.stateDir).filter((e) => e.startsWith(`.${version}.`))).toEqual([]);
    // Nor its manifest or partial downloads: a later version naming the same file starts clean.
    expect(existsSync(join(h.stateDir, 'models', 'manifests', 'iris', `${version}.json`))).toBe(false);
    expect(readdirSync(join(h.stateDir, 'models', 'partial'))).toEqual([]);
  }

  // (4) The fleet heard the verdict.
  await waitFor(`fleet hears iris@${version} refused with ${code}`, async () => {
    const t = await fleet.admin.call('telemetry.list', { deviceId: h.cred.username, limit: 200 });
    return t.records.some((r) => {
      const b = r.body as { model?: string; version?: number; ok?: boolean; code?: string };
      return r.type === 'model.verdict' && b.model === 'iris' && b.version === version && b.ok === false && b.code === code;
    });
  });
}

describe('model updates: bad input is refused with a coded reason; the device keeps serving', () => {
  const corruptions: [EvilMode, string, string][] = [
    ['tamper-file', 'EF_ARTIFACT_MISMATCH', 'one byte of a file flipped (same length)'],
    ['truncate-file', 'EF_ARTIFACT_MISMATCH', 'a file cut to half, with a matching Content-Length'],
    ['oversize-file', 'EF_ARTIFACT_MISMATCH', 'a file with bytes beyond its signed size'],
    ['unsigned', 'EF_SIGNATURE_INVALID', 'the manifest without its signature'],
    ['wrong-signer', 'EF_SIGNATURE_INVALID', 'the manifest re-signed by a key nobody trusts'],
    ['forged-chain', 'EF_SIGNATURE_INVALID', 're-signed, with a key chain endorsing the signer by another untrusted key'],
    ['forged-endorsement', 'EF_SIGNATURE_INVALID', 're-signed, with an endorsement that claims the trusted fleet key but is signed by another'],
    ['tampered-manifest', 'EF_SIGNATURE_INVALID', 'a signed field edited (golden tolerance), the signature kept'],
    ['swap-version', 'EF_MODEL_INVALID', 'the request for iris@2 answered with the (validly signed) iris@1 manifest'],
  ];

  it.each(corruptions)('%s → %s: %s', async (mode, code) => {
    const proxy = await startEvilProxy(fleet.artifactsUrl, { name: 'iris', version: v2.version, sha256s: v2Only, swapWith: v1.version, trustedKeyId: keyIdOf(fleet.publicKey) }, mode);
    // maxAttempts 1: none of these refusals may count as transient (a transient failure is retried,
    // never counted, and the case would time out instead of naming the code).
    const h = await deviceOnV1({ artifactsUrl: proxy.url, maxAttempts: 1 });
    expect(proxy.corrupted()).toBe(0);

    await assign(fleet, 'iris', v2.version, [h.cred.username]);
    await expectRefused(h, v2.version, code);
    // The corruption did reach the device, through every request it made.
    expect(proxy.corrupted()).toBeGreaterThan(0);
    expect(proxy.requests.every((r) => r.status === 200 || r.status === 206)).toBe(true);
    // Bad bytes are never adopted into the blob store.
    for (const sha of v2Only) expect(blobExists(h.stateDir, sha)).toBe(false);
  });

  it('a link that drops is retried with backoff and never held against the version', async () => {
    const proxy = await startEvilProxy(fleet.artifactsUrl, { name: 'iris', version: v2.version, sha256s: v2Only }, 'pass');
    const h = await deviceOnV1({ artifactsUrl: proxy.url, maxAttempts: 1 });
    proxy.mode = 'drop';
    await assign(fleet, 'iris', v2.version, [h.cred.username]);
    await waitFor('two dropped attempts', () => proxy.requests.filter((r) => r.status === 0).length >= 2, 20_000);
    expect(h.agent.models.slotState('iris')).toMatchObject({ serving: v1.version, failed: [] });
    proxy.mode = 'pass';
    await trafficUntil(h.agent, 'iris', 'iris@2 committed once the link is back', () => serving(h.agent, 'iris', v2.version), 30_000);
    expect(h.agent.models.slotState('iris')?.failed).toEqual([]);
  });

  it('too large for the device (models.maxModelBytes) → EF_ARTIFACT_TOO_LARGE, before any byte of it is downloaded', async () => {
    const cap = 1024 * 1024;
    const size = (m: IrisModel): number => m.files.reduce((n, f) => n + f.size, 0);
    expect(size(models.good)).toBeLessThan(cap);
    expect(size(models.slow)).toBeGreaterThan(cap);
    // No baseline: the slow variant takes seconds over 150 rows, and nothing here runs it.
    const big = await publishIris('slow', { baseline: false });
    const h = await deviceOnV1({ maxModelBytes: cap });

    await assign(fleet, 'iris', big.version, [h.cred.username]);
    await expectRefused(h, big.version, 'EF_ARTIFACT_TOO_LARGE');
    for (const f of big.draft.files) if (!v1.draft.files.some((g) => g.sha256 === f.sha256)) expect(blobExists(h.stateDir, f.sha256)).toBe(false);
  });

  it('downgrade below the floor, out of the stable history and not the pinned fallback (keepStable 1) → EF_DOWNGRADE_REFUSED; keeps serving the newest', async () => {
    const h = await deviceOnV1({ keepStable: 1 });
    await assign(fleet, 'iris', v2.version, [h.cred.username]);
    await trafficUntil(h.agent, 'iris', 'iris@2 committed', () => serving(h.agent, 'iris', v2.version));
    const v3 = await publishIris('good');
    await assign(fleet, 'iris', v3.version, [h.cred.username]);
    await trafficUntil(h.agent, 'iris', `iris@${v3.version} committed`, () => serving(h.agent, 'iris', v3.version));
    expect(h.agent.models.slotState('iris')).toMatchObject({ stable: [v3.version], floor: v3.version, fallback: v1.version });
    const views = viewsOf(h.stateDir);

    // iris@2 left the device (keepStable 1) and is below the floor: it would have to come back over the link.
    await assign(fleet, 'iris', v2.version, [h.cred.username]);
    await expectRefused(h, v2.version, 'EF_DOWNGRADE_REFUSED', { keeps: v3.version, noView: false });
    expect(viewsOf(h.stateDir)).toEqual(views);
    expect(h.agent.models.slotState('iris')).toMatchObject({ stable: [v3.version], floor: v3.version });
  });

  it('the pinned fallback is held, so desired state may name it below the floor: a local switch, nothing fetched', async () => {
    const h = await deviceOnV1({ keepStable: 1 });
    await assign(fleet, 'iris', v2.version, [h.cred.username]);
    await trafficUntil(h.agent, 'iris', 'iris@2 committed', () => serving(h.agent, 'iris', v2.version));
    await assign(fleet, 'iris', v1.version, [h.cred.username]);
    await trafficUntil(h.agent, 'iris', 'back on iris@1', () => serving(h.agent, 'iris', v1.version));
  });

  it('expired by the time the device gets it → EF_MODEL_EXPIRED; after a restart it serves iris@1 again', async () => {
    const first = await deviceOnV1();
    await first.agent.stop();
    // 2.5 s: uploads, publish and assign must fit in it on a busy machine, since the fleet
    // refuses to publish or assign a version that has already expired. Assign at once.
    const expiring = await publishIris('good2', { expiresInMs: 2500 });
    await assign(fleet, 'iris', expiring.version, [first.cred.username]);
    const expiresAt = expiring.draft.expiresAt as number;
    await new Promise((r) => setTimeout(r, Math.max(0, expiresAt - Date.now() + 200)));

    const h = await startModelAgent(fleet, { cred: first.cred, stateDir: first.stateDir });
    agents.push(h);
    await expectRefused(h, expiring.version, 'EF_MODEL_EXPIRED');
  });

  it('quarantined on the fleet before the device fetched it → EF_ARTIFACT_REFUSED (the artifact server answers 410)', async () => {
    const first = await deviceOnV1();
    await first.agent.stop();
    const bad = await publishIris('good2');
    // The fleet refuses to assign a quarantined version: assign while the agent is down, then quarantine.
    await assign(fleet, 'iris', bad.version, [first.cred.username]);
    await fleet.admin.call('models.setStatus', { name: 'iris', version: bad.version, status: 'quarantined' });

    // maxAttempts 1: a refusal is not retried anyway; this keeps any retry backoff out of the case.
    const h = await startModelAgent(fleet, { cred: first.cred, stateDir: first.stateDir, models: { maxAttempts: 1 } });
    agents.push(h);
    await expectRefused(h, bad.version, 'EF_ARTIFACT_REFUSED');
    expect(h.agent.models.slotState('iris')?.lastVerdict?.message).toMatch(/410/);
  });
});
