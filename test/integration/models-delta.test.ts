/**
 * Delta updates end to end, all real: a fleet computes patches between the real Silero VAD
 * ONNX model and a fine-tuned copy of it, an agent downloads the patch instead of the model,
 * applies it, verifies it and serves it; a refused patch falls back to the whole file.
 */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import jsonpatch from 'fast-json-patch';
import type { Agent } from '../../agent/agent.js';
import { layoutOf } from '../../common/delta/index.js';
import type { SignedManifest } from '../../proto/index.js';
import { DeltaOffer } from '../../proto/index.js';
import { cleanup, tempDir, waitFor } from '../helpers/fleet.js';
import { SILERO_DIR, SILERO_FILE } from '../helpers/static-host.js';
import { assign, publishModel, startModelAgent, startModelFleet, type ModelFleet } from '../helpers/models.js';

afterEach(cleanup);

const audio = Array.from({ length: 512 }, (_, i) => Math.sin(i / 8) * 0.3);
const zeros = new Array<number>(128).fill(0);
const VAD_INPUTS = { input: { shape: [1, 512], data: audio }, sr: { shape: [], data: [16000] }, h: { shape: [2, 1, 64], data: zeros }, c: { shape: [2, 1, 64], data: zeros } };
const VAD_REQUEST = JSON.stringify({
  inputs: [
    { name: 'input', shape: [1, 512], datatype: 'FP32', data: audio },
    { name: 'sr', shape: [], datatype: 'INT64', data: [16000] },
    { name: 'h', shape: [2, 1, 64], datatype: 'FP32', data: zeros },
    { name: 'c', shape: [2, 1, 64], datatype: 'FP32', data: zeros },
  ],
});

/** Silero as published (v1) and a fine-tune of it: every float weight moved by about 1e-3 of its value (v2). */
function vadVersions(): { v1: string; v2: string; size: number } {
  const base = readFileSync(join(SILERO_DIR, SILERO_FILE));
  const tuned = Buffer.from(base);
  let s = 12345;
  const rnd = (): number => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32);
  for (const t of layoutOf(SILERO_FILE, base).ranges) {
    if (t.float !== 'f32') continue;
    for (let at = t.offset; at < t.offset + t.length; at += 4) tuned.writeFloatLE(tuned.readFloatLE(at) * (1 + (rnd() - 0.5) * 2e-3), at);
  }
  const v1 = tempDir('edgefleet-vad1-');
  const v2 = tempDir('edgefleet-vad2-');
  writeFileSync(join(v1, SILERO_FILE), base);
  writeFileSync(join(v2, SILERO_FILE), tuned);
  return { v1, v2, size: base.length };
}

async function publishVad(fleet: ModelFleet, dir: string): Promise<number> {
  const golden = join(tempDir('edgefleet-vad-golden-'), 'golden.json');
  writeFileSync(golden, JSON.stringify({ vectors: [{ inputs: VAD_INPUTS }] }));
  return (await publishModel(fleet, dir, { name: 'vad', goldenInputs: golden, healthPolicy: { probationRequests: 20, probationSec: 0.5 } })).version;
}

/** Sends VAD requests until `until` holds: probation needs traffic. */
async function vadTrafficUntil(agent: Agent, url: string, what: string, until: () => boolean): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!until()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}; slot ${JSON.stringify(agent.models.slotState('vad'))}`);
    await fetch(`${url}/v2/models/vad/infer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: VAD_REQUEST }).catch(() => undefined);
  }
}

function auth(fleet: ModelFleet): string {
  return `Basic ${Buffer.from(`${fleet.profile.username}:${fleet.profile.password}`).toString('base64')}`;
}

describe('delta model updates', () => {
  it('a device updates through the fleet with a patch, reports what it saved, and the fleet shows it', async () => {
    const { v1, v2, size } = vadVersions();
    const fleet = await startModelFleet();
    await publishVad(fleet, v1);
    await publishVad(fleet, v2);
    const { agent, url, cred } = await startModelAgent(fleet);
    const serves = (v: number) => () => agent.models.slotState('vad')?.stable[0] === v && agent.models.slotState('vad')?.state === 'idle';
    await assign(fleet, 'vad', 1, [cred.username]);
    await vadTrafficUntil(agent, url, 'vad@1 committed', serves(1));
    await assign(fleet, 'vad', 2, [cred.username]);
    await vadTrafficUntil(agent, url, 'vad@2 committed', serves(2));

    const transfer = agent.models.slotState('vad')?.transfer;
    expect(transfer).toMatchObject({ version: 2, patchedFiles: 1, fullFiles: 0, fallbacks: 0 });
    // A 1e-3 fine-tune leaves about half of each float's bits to send.
    expect(transfer!.downloadedBytes).toBeLessThan(size * 0.65);
    expect(transfer!.savedBytes).toBe(size - transfer!.downloadedBytes);
    const res = await fetch(`${url}/v2/models/vad/infer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: VAD_REQUEST });
    expect(res.headers.get('x-model-version')).toBe('2');

    await waitFor('the fleet shows the bandwidth saved', async () => {
      const v = await fleet.admin.call('models.show', { name: 'vad', version: 2 });
      return v.transfer.devices === 1 && v.transfer.savedBytes === transfer!.savedBytes && v.transfer.patchedFiles === 1;
    });

    // The manifest travels as an RFC 6902 patch from the one the device holds, when that is
    // smaller: not from v1 (new golden outputs and baselines change most of it), but from v2 to
    // a republish of the same files.
    const get = (path: string) => fetch(`${fleet.artifactsUrl}${path}`, { headers: { authorization: auth(fleet) } });
    expect((await get('/v1/models/vad/2/manifest?base=1')).headers.get('content-type')).toBe('application/json');
    await publishVad(fleet, v2);
    const whole = await get('/v1/models/vad/3/manifest');
    const patched = await get('/v1/models/vad/3/manifest?base=2');
    expect(patched.headers.get('content-type')).toBe('application/json-patch+json');
    const ops = (await patched.json()) as jsonpatch.Operation[];
    const held = (await (await get('/v1/models/vad/2/manifest')).json()) as SignedManifest;
    expect(jsonpatch.applyPatch(held, ops, true, false).newDocument).toEqual(await whole.json());
    expect(Number(patched.headers.get('content-length'))).toBeLessThan(Number(whole.headers.get('content-length')) / 2);
    await assign(fleet, 'vad', 3, [cred.username]);
    await vadTrafficUntil(agent, url, 'vad@3 committed', serves(3));
    expect(agent.models.slotState('vad')?.transfer).toMatchObject({ version: 3, downloadedBytes: 0, reusedBytes: size });
  }, 150_000);

  it('a patch the agent refuses (corrupt on the fleet) falls back to the whole file, and the version is served', async () => {
    const { v1, v2 } = vadVersions();
    const fleet = await startModelFleet();
    await publishVad(fleet, v1);
    await publishVad(fleet, v2);
    const file = async (version: number) => (await fleet.admin.call('models.show', { name: 'vad', version })).signed.manifest.files[0]!;
    const [base, target] = [await file(1), await file(2)];

    // Warm the cache, then damage the patch and give it a matching sha256, so that only the decoder can tell.
    const offer = DeltaOffer.parse(await (await fetch(`${fleet.artifactsUrl}/v1/deltas/${target.sha256}?base=${base.sha256}`, { headers: { authorization: auth(fleet) } })).json());
    expect(offer.kind).toBe('patch');
    const dir = join(fleet.dataDir, 'deltas', target.sha256);
    const patchFile = join(dir, `${base.sha256}.efdp`);
    const bytes = readFileSync(patchFile);
    bytes[Math.floor(bytes.length / 2)]! ^= 0x40;
    writeFileSync(patchFile, bytes);
    const metaFile = join(dir, `${base.sha256}.json`);
    const meta = JSON.parse(readFileSync(metaFile, 'utf8')) as { sha256: string };
    meta.sha256 = createHash('sha256').update(bytes).digest('hex');
    writeFileSync(metaFile, JSON.stringify(meta));

    const { agent, url, cred, stateDir } = await startModelAgent(fleet);
    const serves = (v: number) => () => agent.models.slotState('vad')?.stable[0] === v && agent.models.slotState('vad')?.state === 'idle';
    await assign(fleet, 'vad', 1, [cred.username]);
    await vadTrafficUntil(agent, url, 'vad@1 committed', serves(1));
    await assign(fleet, 'vad', 2, [cred.username]);
    await vadTrafficUntil(agent, url, 'vad@2 committed', serves(2));
    expect(agent.models.slotState('vad')?.transfer).toMatchObject({ version: 2, patchedFiles: 0, fullFiles: 1, fallbacks: 1, savedBytes: 0 });
    // Nothing of the refused patch is left on the device; the blob is the signed file.
    expect(readdirSync(join(stateDir, 'models', 'partial'))).toEqual([]);
    expect(createHash('sha256').update(readFileSync(join(stateDir, 'models', 'blobs', target.sha256))).digest('hex')).toBe(target.sha256);
  }, 150_000);
});
