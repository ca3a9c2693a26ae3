/**
 * Models in tests: a fleet with its artifact server, versions published the way the CLI publishes
 * them (real runtime for golden outputs and baselines, real uploads, real signatures), agents
 * provisioned with the fleet key, and traffic through the agent's real inference API.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Agent } from '../../agent/agent.js';
import type { ModelDraftInput } from '../../proto/index.js';
import { buildDraft, collectModelFiles, uploadModel, type DraftOptions } from '../../scripts/cli/publish.js';
import { ArtifactClient } from '../../scripts/cli/artifacts.js';
import { buildIrisModels, irisSamples, type IrisModel, type IrisVariant } from '../../scripts/train-iris.js';
import { addDevice, startAgent, startFleet, tempDir, waitFor, type Credential, type FleetHandle } from './fleet.js';

export interface ModelFleet extends FleetHandle {
  artifactsUrl: string;
  publicKey: string;
}

export async function startModelFleet(): Promise<ModelFleet> {
  const fleet = await startFleet();
  const publicKey = readFileSync(join(fleet.dataDir, 'fleet-key.pub'), 'utf8').trim();
  return Object.assign(fleet, { artifactsUrl: fleet.server.artifactsUrl, publicKey });
}

let iris: Promise<Record<IrisVariant, IrisModel>> | null = null;

/**
 * The iris models, trained once per test file by the project's own training code. They outlive
 * each test's cleanup and go when the test process exits.
 */
export function irisModels(): Promise<Record<IrisVariant, IrisModel>> {
  if (!iris) {
    const dir = mkdtempSync(join(tmpdir(), 'edgefleet-iris-'));
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    iris = buildIrisModels(dir);
  }
  return iris;
}

/** Iris rows as golden or baseline input vectors (`--golden-inputs` / `--baseline-inputs` files). */
export function irisVectorsFile(rows: number[]): string {
  const { features } = irisSamples();
  const file = join(tempDir('edgefleet-vectors-'), 'vectors.json');
  writeFileSync(file, JSON.stringify({ vectors: rows.map((r) => ({ inputs: { features: { shape: [1, 4], data: features[r] } } })) }));
  return file;
}

export const GOLDEN_ROWS = [0, 1, 50, 51, 100, 101];
export const ALL_ROWS = Array.from({ length: 150 }, (_, i) => i);

/** How an iris version is published here: two golden rows per class, every row as the baseline, this policy. */
export function irisPublish(healthPolicy: Record<string, unknown>): { name: string; goldenInputs: string; baselineInputs: string; healthPolicy: Record<string, unknown> } {
  return { name: 'iris', goldenInputs: irisVectorsFile(GOLDEN_ROWS), baselineInputs: irisVectorsFile(ALL_ROWS), healthPolicy };
}

/**
 * Publishes a model directory as the CLI does: draft (runtime-computed golden outputs and
 * baselines), uploads, `models.publish`. `edit` may change the draft before it is signed: a test
 * that needs a version whose expected behaviour is another version's uses it.
 */
export async function publishModel(
  fleet: ModelFleet,
  dir: string,
  opts: Partial<DraftOptions> & { name: string; healthPolicy?: Record<string, unknown>; edit?: (d: ModelDraftInput) => void },
): Promise<{ version: number; manifestSha256: string; draft: ModelDraftInput }> {
  const files = await collectModelFiles(dir);
  let health = opts.health;
  if (opts.healthPolicy) {
    health = join(tempDir('edgefleet-health-'), 'health.json');
    writeFileSync(health, JSON.stringify(opts.healthPolicy));
  }
  const draft = await buildDraft(files, { ...opts, health });
  opts.edit?.(draft);
  const { params } = await uploadModel(new ArtifactClient(fleet.artifactsUrl, fleet.profile.username, fleet.profile.password), files, draft);
  const r = await fleet.admin.call('models.publish', params);
  return { version: r.version, manifestSha256: r.manifestSha256, draft };
}

export async function assign(fleet: ModelFleet, name: string, version: number, deviceIds: string[]): Promise<void> {
  await fleet.admin.call('models.assign', { name, version, deviceIds });
}

export async function startModelAgent(
  fleet: ModelFleet,
  opts: { deviceId?: string; cred?: Credential; stateDir?: string; models?: Record<string, unknown>; trustedKeys?: string[]; learner?: Record<string, unknown> } = {},
): Promise<{ agent: Agent; stateDir: string; cred: Credential; url: string }> {
  const cred = opts.cred ?? (await addDevice(fleet, opts.deviceId ?? `dev-${Math.random().toString(36).slice(2, 8)}`));
  const { agent, stateDir } = await startAgent(cred, {
    stateDir: opts.stateDir,
    models: { artifactsUrl: fleet.artifactsUrl, trustedKeys: opts.trustedKeys ?? [fleet.publicKey], checkIntervalMs: 50, childCheckTimeoutSec: 60, ...opts.models },
    ...(opts.learner ? { learner: opts.learner } : {}),
  });
  const url = agent.apiAddress?.url;
  if (!url) throw new Error('agent has no inference API');
  return { agent, stateDir, cred, url };
}

/** One inference through the agent's HTTP API (KServe v2). */
export async function inferHttp(url: string, model: string, features: number[]): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${url}/v2/models/${model}/infer`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ inputs: [{ name: 'features', shape: [1, 4], datatype: 'FP32', data: features }] }),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/**
 * Sends iris rows (all 150, scrambled, so the traffic looks like the baseline) through the
 * in-process API until `until()` holds. Errors are expected while no version serves.
 */
export async function trafficUntil(agent: Agent, model: string, what: string, until: () => boolean, timeoutMs = 30_000): Promise<number> {
  const { features } = irisSamples();
  let i = 0;
  let sent = 0;
  const failed = (e: unknown): never => {
    throw new Error(`${(e as Error).message}; slot: ${JSON.stringify(agent.models.slotState(model))}`);
  };
  await waitFor(
    what,
    async () => {
      for (let k = 0; k < 5 && !until(); k++) {
        // A fixed walk through every row in a scrambled order (7919 is prime to 150), so any
        // stretch of traffic has the classes in about the baseline's proportions.
        const row = features[(i++ * 7919) % features.length] as number[];
        try {
          await agent.models.infer(model, { features: { dtype: 'float32', shape: [1, 4], data: Float32Array.from(row) } });
          sent++;
        } catch {
          // not serving yet
        }
      }
      return until();
    },
    timeoutMs,
  ).catch(failed);
  return sent;
}

/** True once the slot is idle and serving `version`. */
export function serving(agent: Agent, model: string, version: number): boolean {
  const s = agent.models.slotState(model);
  return s?.state === 'idle' && s.serving === version;
}

export const IRIS_TRAINING = { loss: 'sparse-categorical-crossentropy', outputKind: 'probabilities', personalLayers: [] as string[] } as const;

/**
 * An iris variant as a model devices may train (a `training` section), with a probation that
 * commits at once, optionally promoted to `production` (a round's default base).
 */
export async function publishTrainable(
  fleet: ModelFleet,
  variant: IrisVariant = 'wrong',
  opts: { training?: Partial<typeof IRIS_TRAINING>; production?: boolean } = {},
): Promise<{ version: number; manifestSha256: string }> {
  const models = await irisModels();
  const v = await publishModel(fleet, models[variant].dir, {
    ...irisPublish({ probationRequests: 0, probationSec: 0 }),
    edit: (d) => void (d.training = { ...IRIS_TRAINING, ...opts.training }),
  });
  if (opts.production) {
    await fleet.admin.call('models.setStatus', { name: 'iris', version: v.version, status: 'approved' });
    await fleet.admin.call('models.setStatus', { name: 'iris', version: v.version, status: 'production' });
  }
  return { version: v.version, manifestSha256: v.manifestSha256 };
}
