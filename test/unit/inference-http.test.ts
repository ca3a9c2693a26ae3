/**
 * The KServe v2 REST server on real sockets (loopback TCP and a unix socket) in front of a real
 * ONNX model: outputs equal onnxruntime's own, every malformed request gets its status and code,
 * and the server keeps serving afterwards.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.js';
import { startInferenceServer, type InferenceServer } from '../../agent/api/http.js';
import { FeedbackStore } from '../../agent/api/feedback.js';
import { InferenceClient } from '../../agent/api/inproc.js';
import { call, closeClients, SILERO_DIR, SILERO_FILE, sileroHost, type StaticHost, type Target } from '../helpers/static-host.js';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'edgefleet-http-'));
  dirs.push(d);
  return d;
}

/** A deterministic pseudo-random signal, so a failure reproduces. */
function signal(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    out[i] = (x / 2 ** 31 - 0.5) * 0.8;
  }
  return out;
}

interface Sample {
  input: Float32Array;
  h: Float32Array;
  c: Float32Array;
}

function sample(seed: number): Sample {
  return { input: signal(512, seed), h: signal(128, seed + 1), c: signal(128, seed + 2) };
}

/** A KServe body for a sample; `input` as a nested [1][512] array, the states flat. */
function body(s: Sample, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    ...extra,
    inputs: [
      { name: 'input', datatype: 'FP32', shape: [1, 512], data: [Array.from(s.input)] },
      { name: 'sr', datatype: 'INT64', shape: [], data: [16000] },
      { name: 'h', datatype: 'FP32', shape: [2, 1, 64], data: Array.from(s.h) },
      { name: 'c', datatype: 'FP32', shape: [2, 1, 64], data: Array.from(s.c) },
    ],
  };
}

function withInput(s: Sample, name: string, patch: Record<string, unknown> | null): Record<string, unknown> {
  const b = body(s);
  const inputs = (b.inputs as Record<string, unknown>[]).flatMap((t) => (t.name !== name ? [t] : patch === null ? [] : [{ ...t, ...patch }]));
  return { ...b, inputs };
}

function bits(a: ArrayLike<number>): string {
  return Buffer.from(Float32Array.from(a).buffer).toString('hex');
}

let host: StaticHost;
let session: ort.InferenceSession;
let tcp: InferenceServer;
let feedbackStore: FeedbackStore;
const MAX_BODY = 256 * 1024;

beforeAll(async () => {
  feedbackStore = FeedbackStore.open(tempDir(), { recentPerModel: 100 });
  host = await sileroHost({ idleSlots: ['later'], sink: feedbackStore });
  session = await ort.InferenceSession.create(join(SILERO_DIR, SILERO_FILE));
  tcp = await startInferenceServer(host, { port: 0, maxBodyBytes: MAX_BODY, log: silentLogger() });
});

afterAll(async () => {
  closeClients();
  await tcp?.close();
  await session?.release();
  await host?.model.dispose();
  feedbackStore?.close();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function direct(s: Sample): Promise<Record<string, ort.Tensor>> {
  return session.run({
    input: new ort.Tensor('float32', s.input, [1, 512]),
    sr: new ort.Tensor('int64', BigInt64Array.from([16000n]), []),
    h: new ort.Tensor('float32', s.h, [2, 1, 64]),
    c: new ort.Tensor('float32', s.c, [2, 1, 64]),
  });
}

async function expectSameAsDirect(target: Target, seed: number): Promise<void> {
  const s = sample(seed);
  const r = await call(target, 'POST', '/v2/models/silero/infer', JSON.stringify(body(s)));
  expect(r.status, r.text).toBe(200);
  const want = await direct(s);
  const outputs = r.json.outputs as { name: string; shape: number[]; datatype: string; data: number[] }[];
  expect(outputs.map((o) => o.name)).toEqual(['output', 'hn', 'cn']);
  for (const o of outputs) {
    const w = want[o.name]!;
    expect(o.datatype).toBe('FP32');
    expect(o.shape).toEqual(w.dims);
    expect(bits(o.data), o.name).toBe(bits(w.data as Float32Array));
  }
}

describe('KServe v2 over loopback TCP', () => {
  it('answers health, server and model metadata', async () => {
    expect((await call(tcp, 'GET', '/v2/health/live')).json).toEqual({ live: true });
    const ready = await call(tcp, 'GET', '/v2/health/ready');
    // The host has an idle slot ('later'), so the device as a whole is not ready.
    expect([ready.status, ready.json]).toEqual([503, { ready: false }]);
    expect((await call(tcp, 'GET', '/v2')).json).toMatchObject({ name: 'edgefleet', extensions: [] });
    const meta = await call(tcp, 'GET', '/v2/models/silero');
    expect(meta.status).toBe(200);
    expect(meta.json).toEqual({
      name: 'silero',
      versions: ['3'],
      platform: 'onnxruntime_onnx',
      inputs: [
        { name: 'input', datatype: 'FP32', shape: [-1, -1] },
        { name: 'sr', datatype: 'INT64', shape: [] },
        { name: 'h', datatype: 'FP32', shape: [2, -1, 64] },
        { name: 'c', datatype: 'FP32', shape: [2, -1, 64] },
      ],
      outputs: [
        { name: 'output', datatype: 'FP32', shape: [-1, 1] },
        { name: 'hn', datatype: 'FP32', shape: [2, -1, 64] },
        { name: 'cn', datatype: 'FP32', shape: [2, -1, 64] },
      ],
    });
    expect((await call(tcp, 'GET', '/v2/models/silero/versions/3')).json).toEqual(meta.json);
    expect((await call(tcp, 'GET', '/v2/models/silero/versions/4')).json).toMatchObject({ code: 'EF_UNKNOWN_MODEL' });
    expect((await call(tcp, 'GET', '/v2/models/silero/ready')).json).toEqual({ name: 'silero', ready: true });
    expect((await call(tcp, 'GET', '/v2/models/silero/versions/3/ready')).status).toBe(200);
    expect((await call(tcp, 'GET', '/v2/models/later/ready')).status).toBe(503);
    expect((await call(tcp, 'GET', '/v2/models/later')).json).toMatchObject({ code: 'EF_MODEL_NOT_READY' });
    expect((await call(tcp, 'GET', '/v2/models/nope/ready')).status).toBe(404);
    expect((await call(tcp, 'HEAD', '/v2/health/live')).status).toBe(200);
  });

  it('returns exactly what onnxruntime returns for the same inputs, bit for bit', async () => {
    for (const seed of [1, 2, 3, 42]) await expectSameAsDirect(tcp, seed);
  });

  it('echoes the client id, generates unique ids otherwise, and names the version in headers', async () => {
    const s = sample(7);
    const mine = await call(tcp, 'POST', '/v2/models/silero/infer', JSON.stringify(body(s, { id: 'client-7' })));
    expect([mine.status, mine.json.id, mine.headers['x-request-id'], mine.headers['x-model-version']]).toEqual([200, 'client-7', 'client-7', '3']);
    expect(mine.json).toMatchObject({ model_name: 'silero', model_version: '3' });
    const ids = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const r = await call(tcp, 'POST', '/v2/models/silero/infer', JSON.stringify(body(s)));
      expect(r.headers['x-request-id']).toBe(r.json.id);
      ids.add(r.json.id as string);
    }
    expect(ids.size).toBe(20);
    const versioned = await call(tcp, 'POST', '/v2/models/silero/versions/3/infer', JSON.stringify(body(s)));
    expect(versioned.status).toBe(200);
  });

  it('returns only the outputs asked for, in the order asked', async () => {
    const r = await call(tcp, 'POST', '/v2/models/silero/infer', JSON.stringify(body(sample(9), { outputs: [{ name: 'cn' }, { name: 'output' }] })));
    expect((r.json.outputs as { name: string }[]).map((o) => o.name)).toEqual(['cn', 'output']);
  });

  it('refuses a port that is taken', async () => {
    const port = new URL(tcp.url!).port;
    await expect(startInferenceServer(host, { port: Number(port), log: silentLogger() })).rejects.toMatchObject({ code: 'EF_PORT_IN_USE' });
  });

  it('keeps connections alive between requests', async () => {
    await call(tcp, 'GET', '/v2/health/live');
    const second = await call(tcp, 'GET', '/v2/health/live');
    expect(second.reusedSocket).toBe(true);
  });

  const s = sample(11);
  const cases: [string, () => { method?: string; path?: string; body: string | Buffer; headers?: Record<string, string> }, number, string, string?][] = [
    ['malformed JSON', () => ({ body: '{"inputs": [' }), 400, 'EF_BAD_PAYLOAD'],
    ['a bare NaN token', () => ({ body: JSON.stringify(body(s)).replace('16000', 'NaN') }), 400, 'EF_BAD_PAYLOAD'],
    ['an empty body', () => ({ body: '' }), 400, 'EF_BAD_PAYLOAD'],
    ['a JSON array body', () => ({ body: '[]' }), 400, 'EF_INFER_INVALID', 'body'],
    ['no inputs', () => ({ body: '{"inputs":[]}' }), 400, 'EF_INFER_INVALID', 'inputs'],
    ['an input the model does not have', () => ({ body: JSON.stringify(withInput(s, 'c', { name: 'nope' })) }), 400, 'EF_INFER_INVALID', 'nope'],
    ['an unknown datatype name', () => ({ body: JSON.stringify(withInput(s, 'input', { datatype: 'FP16' })) }), 400, 'EF_INFER_INVALID', 'input'],
    ['a datatype the model does not take', () => ({ body: JSON.stringify(withInput(s, 'input', { datatype: 'FP64' })) }), 400, 'EF_INFER_INVALID', 'input'],
    ['INT64 given as FP32', () => ({ body: JSON.stringify(withInput(s, 'sr', { datatype: 'FP32' })) }), 400, 'EF_INFER_INVALID', 'sr'],
    ['a wrong shape', () => ({ body: JSON.stringify(withInput(s, 'h', { shape: [1, 2, 64] })) }), 400, 'EF_INFER_INVALID', 'h'],
    ['a shape the data does not fill', () => ({ body: JSON.stringify(withInput(s, 'c', { shape: [2, 2, 64] })) }), 400, 'EF_INFER_INVALID', 'c'],
    ['a huge shape with little data', () => ({ body: JSON.stringify(withInput(s, 'input', { shape: [1, 2 ** 40] })) }), 400, 'EF_INFER_INVALID', 'input'],
    ['a missing input', () => ({ body: JSON.stringify(withInput(s, 'c', null)) }), 400, 'EF_INFER_INVALID', 'c'],
    ['the same input twice', () => ({ body: JSON.stringify({ inputs: [...(body(s).inputs as unknown[]), (body(s).inputs as unknown[])[0]] }) }), 400, 'EF_INFER_INVALID', 'input'],
    ['"NaN" as a string in data', () => ({ body: JSON.stringify(withInput(s, 'h', { data: ['NaN', ...Array.from(s.h).slice(1)] })) }), 400, 'EF_INFER_INVALID', 'h'],
    ['a string in data', () => ({ body: JSON.stringify(withInput(s, 'input', { data: [['x', ...Array.from(s.input).slice(1)]] })) }), 400, 'EF_INFER_INVALID', 'input'],
    ['an infinite value (1e400)', () => ({ body: JSON.stringify(body(s)).replace(/"name":"c","datatype":"FP32","shape":\[2,1,64\],"data":\[[^,]+/, '"name":"c","datatype":"FP32","shape":[2,1,64],"data":[1e400') }), 400, 'EF_INFER_INVALID', 'c'],
    ['a fractional INT64', () => ({ body: JSON.stringify(withInput(s, 'sr', { data: [16000.5] })) }), 400, 'EF_INFER_INVALID', 'sr'],
    // Written as text: JSON.stringify itself would run out of stack on it.
    ['deeply nested data', () => ({ body: JSON.stringify(body(s)).replace('"data":[16000]', `"data":${'['.repeat(5000)}16000${']'.repeat(5000)}`) }), 400, 'EF_INFER_INVALID', 'sr'],
    ['an id over 128 characters', () => ({ body: JSON.stringify(body(s, { id: 'x'.repeat(129) })) }), 400, 'EF_INFER_INVALID', 'id'],
    ['an id with a newline (it goes into a header)', () => ({ body: JSON.stringify(body(s, { id: 'a\nb' })) }), 400, 'EF_INFER_INVALID', 'id'],
    ['an output the model does not have', () => ({ body: JSON.stringify(body(s, { outputs: [{ name: 'zzz' }] })) }), 400, 'EF_INFER_INVALID', 'zzz'],
    ['a body over the cap', () => ({ body: Buffer.alloc(MAX_BODY + 1, 32) }), 413, 'EF_PAYLOAD_TOO_LARGE'],
    ['a chunked body over the cap', () => ({ body: Buffer.alloc(MAX_BODY * 3, 32), headers: { 'transfer-encoding': 'chunked' } }), 413, 'EF_PAYLOAD_TOO_LARGE'],
    ['an unknown model', () => ({ path: '/v2/models/nope/infer', body: JSON.stringify(body(s)) }), 404, 'EF_UNKNOWN_MODEL'],
    ['a model with nothing serving', () => ({ path: '/v2/models/later/infer', body: JSON.stringify(body(s)) }), 503, 'EF_MODEL_NOT_READY'],
    ['a version that is not serving', () => ({ path: '/v2/models/silero/versions/2/infer', body: JSON.stringify(body(s)) }), 404, 'EF_UNKNOWN_MODEL'],
    ['a version that is not a number', () => ({ path: '/v2/models/silero/versions/latest/infer', body: JSON.stringify(body(s)) }), 404, 'EF_UNKNOWN_MODEL'],
    ['an unknown route', () => ({ path: '/v2/models/silero/explain', body: '{}' }), 404, 'EF_UNKNOWN_METHOD'],
    ['a route outside /v2', () => ({ method: 'GET', path: '/metrics', body: '' }), 404, 'EF_UNKNOWN_METHOD'],
    ['a bad percent-encoding', () => ({ path: '/v2/models/%E0%A4%A/infer', body: '{}' }), 404, 'EF_UNKNOWN_METHOD'],
    ['the wrong method', () => ({ method: 'GET', path: '/v2/models/silero/infer', body: '' }), 405, 'EF_UNKNOWN_METHOD'],
    ['POST to a GET route', () => ({ method: 'POST', path: '/v2/health/ready', body: '{}' }), 405, 'EF_UNKNOWN_METHOD'],
  ];

  it.each(cases.map(([what, make, status, code, field]) => ({ what, make, status, code, field })))('$what → $status $code', async ({ make, status, code, field }) => {
    const c = make();
    const r = await call(tcp, c.method ?? 'POST', c.path ?? '/v2/models/silero/infer', c.body, c.headers);
    expect(r.status, r.text).toBe(status);
    expect(r.json.code, r.text).toBe(code);
    expect(typeof r.json.error).toBe('string');
    if (field !== undefined) expect(r.json.field, r.text).toBe(field);
    if (status === 405) expect(r.headers.allow).toBeDefined();
    // The server keeps serving correct answers after each of them.
    await expectSameAsDirect(tcp, 5);
  });

  it('answers a runtime failure with 500 EF_RUNTIME_FAILED, and recovers', async () => {
    host.fault = new Error('simulated onnxruntime failure');
    try {
      const r = await call(tcp, 'POST', '/v2/models/silero/infer', JSON.stringify(body(sample(1), { id: 'boom' })));
      expect([r.status, r.json.code, r.headers['x-request-id']]).toEqual([500, 'EF_RUNTIME_FAILED', 'boom']);
    } finally {
      host.fault = null;
    }
    await expectSameAsDirect(tcp, 1);
  });

  it('takes feedback for answered requests: 200, 404 for unknown ids, 400 for oversized labels', async () => {
    const r = await call(tcp, 'POST', '/v2/models/silero/infer', JSON.stringify(body(sample(3), { id: 'fb-1' })));
    expect(r.status).toBe(200);
    const ok = await call(tcp, 'POST', '/v2/models/silero/feedback', JSON.stringify({ id: 'fb-1', label: { speech: true } }));
    expect([ok.status, ok.json]).toEqual([200, { id: 'fb-1', recorded: true }]);
    expect(feedbackStore.list('silero', 1)[0]).toMatchObject({ requestId: 'fb-1', model: 'silero', version: 3, label: { speech: true } });
    const unknown = await call(tcp, 'POST', '/v2/models/silero/feedback', JSON.stringify({ id: 'never', label: 1 }));
    expect([unknown.status, unknown.json.field]).toEqual([404, 'id']);
    const big = await call(tcp, 'POST', '/v2/models/silero/feedback', JSON.stringify({ id: 'fb-1', label: 'x'.repeat(5000) }));
    expect([big.status, big.json.code]).toEqual([400, 'EF_BAD_PAYLOAD']);
    const noLabel = await call(tcp, 'POST', '/v2/models/silero/feedback', JSON.stringify({ id: 'fb-1' }));
    expect([noLabel.status, noLabel.json.field]).toEqual([400, 'label']);
    const noModel = await call(tcp, 'POST', '/v2/models/nope/feedback', JSON.stringify({ id: 'fb-1', label: 1 }));
    expect([noModel.status, noModel.json.code]).toEqual([404, 'EF_UNKNOWN_MODEL']);
    const bad = await call(tcp, 'POST', '/v2/models/silero/feedback', '{');
    expect(bad.status).toBe(400);
  });
});

describe('KServe v2 over a unix socket', () => {
  it('replaces a stale socket, sets mode 0660, serves the same answers, and removes the socket on close', async () => {
    const path = join(tempDir(), 'infer.sock');
    // A socket file left by a process that died without cleaning up.
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    expect(statSync(path).isSocket()).toBe(true);

    const server = await startInferenceServer(host, { socketPath: path, log: silentLogger() });
    try {
      expect(server.socketPath).toBe(path);
      expect(statSync(path).mode & 0o777).toBe(0o660);
      expect((await call(server, 'GET', '/v2/health/live')).json).toEqual({ live: true });
      await expectSameAsDirect(server, 21);
      const bad = await call(server, 'POST', '/v2/models/silero/infer', JSON.stringify(withInput(sample(1), 'h', { datatype: 'INT32' })));
      expect([bad.status, bad.json.field]).toEqual([400, 'h']);
      // A second server on a socket somebody answers on is refused; the first keeps it.
      await expect(startInferenceServer(host, { socketPath: path, log: silentLogger() })).rejects.toMatchObject({ code: 'EF_PORT_IN_USE' });
      await expectSameAsDirect(server, 22);
    } finally {
      await server.close();
    }
    expect(existsSync(path)).toBe(false);
  });

  it('refuses to remove a file that is not a socket', async () => {
    const path = join(tempDir(), 'not-a-socket');
    writeFileSync(path, 'precious');
    await expect(startInferenceServer(host, { socketPath: path, log: silentLogger() })).rejects.toMatchObject({ code: 'EF_CONFIG_INVALID' });
    expect(existsSync(path)).toBe(true);
  });
});

describe('in-process API', () => {
  it('gives the same outputs as onnxruntime, from typed arrays or plain arrays', async () => {
    const client = new InferenceClient(host);
    const s = sample(31);
    const want = await direct(s);
    const typed = await client.infer('silero', {
      input: { shape: [1, 512], data: s.input },
      sr: { shape: [], data: BigInt64Array.from([16000n]) },
      h: { dtype: 'float32', shape: [2, 1, 64], data: s.h },
      c: { dtype: 'float32', shape: [2, 1, 64], data: s.c },
    });
    const plain = await client.infer('silero', {
      input: { shape: [1, 512], data: Array.from(s.input) },
      sr: { shape: [], data: [16000] },
      h: { shape: [2, 1, 64], data: Array.from(s.h) },
      c: { shape: [2, 1, 64], data: Array.from(s.c) },
    }, { requestId: 'inproc-1' });
    expect(plain.requestId).toBe('inproc-1');
    for (const r of [typed, plain]) {
      expect(r.version).toBe(3);
      for (const name of ['output', 'hn', 'cn']) expect(bits(r.outputs[name]!.data as Float32Array)).toBe(bits(want[name]!.data as Float32Array));
    }
    expect(client.feedback('silero', 'inproc-1', 'speech')).toBe(true);
    await expect(client.infer('silero', { input: { shape: [1, 512], data: new Float64Array(512) } })).rejects.toMatchObject({ code: 'EF_INFER_INVALID' });
    await expect(client.infer('nope', { x: { shape: [1], data: [1] } })).rejects.toMatchObject({ code: 'EF_UNKNOWN_MODEL' });
    await expect(client.infer('later', { x: { shape: [1], data: [1] } })).rejects.toMatchObject({ code: 'EF_MODEL_NOT_READY' });
  });
});
