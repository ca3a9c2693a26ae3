/**
 * Arbitrary bodies against the inference and feedback routes of a real server and model: every
 * answer is a client error with a catalog code (never a 500, a crash or a hang), and the server
 * still answers a good request afterwards.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.js';
import { ERROR_CODES } from '../../proto/index.js';
import { startInferenceServer, type InferenceServer } from '../../agent/api/http.js';
import { call, closeClients, sileroHost, type StaticHost } from '../helpers/static-host.js';

let host: StaticHost;
let server: InferenceServer;
const MAX_BODY = 64 * 1024;

beforeAll(async () => {
  host = await sileroHost();
  server = await startInferenceServer(host, { port: 0, maxBodyBytes: MAX_BODY, log: silentLogger() });
});

afterAll(async () => {
  closeClients();
  await server?.close();
  await host?.model.dispose();
});

const CLIENT_ERRORS = [400, 404, 413];

async function expectClientError(path: string, body: string | Buffer): Promise<void> {
  const r = await call(server, 'POST', path, body);
  expect(CLIENT_ERRORS, `${r.status} ${r.text.slice(0, 300)}`).toContain(r.status);
  expect(ERROR_CODES).toContain(r.json.code);
}

/** Nested arrays of anything JSON, as tensor data might (wrongly) be. */
const nested = fc.letrec((tie) => ({
  value: fc.oneof({ depthSize: 'small' }, fc.jsonValue({ maxDepth: 1 }), fc.array(tie('value'), { maxLength: 4 })),
})).value;

const NAMES = ['input', 'sr', 'h', 'c', 'x', '', '__proto__', 'constructor'];
const DATATYPES = ['FP32', 'FP64', 'INT8', 'UINT8', 'INT16', 'INT32', 'INT64', 'BOOL', 'FP16', 'BYTES', 'fp32', ''];

/** Bodies shaped like inference requests, wrong somewhere: one input is always missing, so none can succeed. */
const requestLike = fc.record(
  {
    id: fc.oneof(fc.string({ maxLength: 140 }), fc.jsonValue({ maxDepth: 1 })),
    inputs: fc.array(
      fc.record(
        {
          name: fc.oneof(fc.constantFrom(...NAMES.filter((n) => n !== 'c')), fc.string(), fc.integer()),
          datatype: fc.oneof(fc.constantFrom(...DATATYPES), fc.string(), fc.jsonValue({ maxDepth: 1 })),
          shape: fc.oneof(fc.array(fc.integer({ min: -2, max: 2 ** 33 }), { maxLength: 10 }), fc.jsonValue({ maxDepth: 2 })),
          data: fc.oneof(nested, fc.array(fc.double(), { maxLength: 64 }), fc.array(fc.integer(), { maxLength: 64 })),
          parameters: fc.jsonValue({ maxDepth: 1 }),
        },
        { requiredKeys: [] },
      ),
      { maxLength: 5 },
    ),
    outputs: fc.oneof(fc.array(fc.record({ name: fc.oneof(fc.string(), fc.integer()) }), { maxLength: 3 }), fc.jsonValue({ maxDepth: 1 })),
  },
  { requiredKeys: [] },
);

describe('inference API on arbitrary input', () => {
  it('answers arbitrary strings with a client error', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string({ unit: 'binary', maxLength: 300 }), async (text) => expectClientError('/v2/models/silero/infer', text)),
      { numRuns: 150 },
    );
  });

  it('answers arbitrary JSON values with a client error', async () => {
    await fc.assert(fc.asyncProperty(fc.jsonValue(), async (v) => expectClientError('/v2/models/silero/infer', JSON.stringify(v) ?? '')), { numRuns: 150 });
  });

  it('answers request-shaped bodies with a client error', async () => {
    await fc.assert(fc.asyncProperty(requestLike, async (v) => expectClientError('/v2/models/silero/infer', JSON.stringify(v))), { numRuns: 300 });
  });

  it('answers arbitrary feedback bodies and model names with a client error', async () => {
    const feedbackBody = fc.oneof(fc.jsonValue(), fc.record({ id: fc.oneof(fc.string(), fc.jsonValue()), label: fc.jsonValue() }, { requiredKeys: [] }));
    await fc.assert(
      fc.asyncProperty(fc.string({ minLength: 1, maxLength: 40 }), feedbackBody, async (name, v) => {
        await expectClientError(`/v2/models/${encodeURIComponent(name)}/feedback`, JSON.stringify(v) ?? '');
      }),
      { numRuns: 150 },
    );
  });

  it('answers random bytes, deep nesting and oversized bodies with a client error, and still serves', async () => {
    await fc.assert(fc.asyncProperty(fc.uint8Array({ maxLength: 2000 }), async (bytes) => expectClientError('/v2/models/silero/infer', Buffer.from(bytes))), { numRuns: 100 });
    await expectClientError('/v2/models/silero/infer', '['.repeat(MAX_BODY - 1));
    await expectClientError('/v2/models/silero/infer', `{"inputs":[{"name":"sr","datatype":"INT64","shape":[],"data":${'['.repeat(20_000)}1${']'.repeat(20_000)}}]}`);
    await expectClientError('/v2/models/silero/infer', Buffer.alloc(MAX_BODY + 1, 0x5b));
    const ok = await call(
      server,
      'POST',
      '/v2/models/silero/infer',
      JSON.stringify({
        inputs: [
          { name: 'input', datatype: 'FP32', shape: [1, 512], data: new Array(512).fill(0.1) },
          { name: 'sr', datatype: 'INT64', shape: [], data: [16000] },
          { name: 'h', datatype: 'FP32', shape: [2, 1, 64], data: new Array(128).fill(0) },
          { name: 'c', datatype: 'FP32', shape: [2, 1, 64], data: new Array(128).fill(0) },
        ],
      }),
    );
    expect(ok.status, ok.text).toBe(200);
  });
});
