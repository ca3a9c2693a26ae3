#!/usr/bin/env node
/**
 * `npm run bench:rollout [-- --quick] [-- --devices 1000,10000]`: how long a rollout wave takes to be
 * applied and reported by 1,000 and by 10,000 simulated devices, and how long a fleet-wide revert
 * takes, each against the raw broker round trip measured in the same run on the same broker and the
 * same device connections: one QoS 1 message to each device and one QoS 1 reply from each, with
 * nothing else done, the floor for any protocol.
 *
 * Parts: a private Mosquitto on a free port (the machine's shared one stays untouched), a real fleet
 * server in this process (registry, SQLite, the rollout reconciler), and the simulator in a child
 * process (scripts/bench/rollout-sim.ts). Times are what an operator sees: from the request to the
 * moment the fleet's rollout status counts every device. The last line is one JSON object.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import mqtt from 'mqtt';
import type { RolloutPlanInput, RolloutView, Selector } from '../../proto/index.js';
import { silentLogger } from '../../common/log.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../../fleet-server/auth/bootstrap.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { FleetServer } from '../../fleet-server/server.js';
import { OpsClient } from '../ops-client.js';
import { ArtifactClient } from '../cli/artifacts.js';
import { buildDraft, collectModelFiles, uploadModel } from '../cli/publish.js';
import { deviceIds } from '../sim/scenario.js';
import { provisionDevices } from '../sim/provision.js';
import { DEFAULT_RAW_TOPICS } from '../sim/fleet.js';
import { buildIrisModels } from '../train-iris.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const GOALS = { revert_s: 2, revert_vs_raw: 1.5 };
const RAW_RUNS = 3;
const WAVE_TIMEOUT_MS = Number(process.env.BENCH_TIMEOUT_MS ?? 300_000);

function say(line: string): void {
  process.stderr.write(line + '\n');
}

const round = (x: number, d = 3): number => Number(x.toFixed(d));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (typeof addr !== 'object' || addr === null) throw new Error('no free port');
  return addr.port;
}

/**
 * A Mosquitto of the benchmark's own. Its only change from the defaults: queues deep enough that no
 * message to the fleet is dropped while it works through ten thousand reports.
 */
async function startMosquitto(dir: string): Promise<{ url: string; stop(): Promise<void> }> {
  const port = await freePort();
  const conf = join(dir, 'mosquitto.conf');
  writeFileSync(conf, [`listener ${port} 127.0.0.1`, 'allow_anonymous true', 'persistence false', 'max_queued_messages 1000000', 'max_inflight_messages 0', 'max_connections -1', ''].join('\n'));
  const child = spawn('mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const url = `mqtt://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    if (child.exitCode !== null) throw new Error(`mosquitto exited: ${err}`);
    try {
      const c = await mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 500 });
      await c.endAsync();
      break;
    } catch {
      if (i > 100) throw new Error(`mosquitto did not listen: ${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    url,
    stop: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** One QoS 1 message to each device's echo topic, one QoS 1 reply from each: seconds until the last reply. */
async function rawRoundTrip(url: string, ids: readonly string[]): Promise<number> {
  const client = await mqtt.connectAsync(url, { reconnectPeriod: 0, clientId: `bench-raw-${process.pid}` });
  try {
    const want = new Set(ids.map((id) => DEFAULT_RAW_TOPICS.reply(id)));
    await client.subscribeAsync('bench/raw/+/r', { qos: 1 });
    let left = want.size;
    const done = new Promise<void>((resolve) =>
      client.on('message', (topic) => {
        if (want.delete(topic) && --left === 0) resolve();
      }),
    );
    const payload = Buffer.from('ping');
    const t0 = performance.now();
    for (const id of ids) client.publish(DEFAULT_RAW_TOPICS.request(id), payload, { qos: 1 });
    await done;
    return (performance.now() - t0) / 1000;
  } finally {
    await client.endAsync();
  }
}

async function publishVersions(admin: OpsClient, profile: CliProfile, artifactsUrl: string, dir: string, n: number): Promise<void> {
  const { good } = await buildIrisModels(join(dir, 'iris'), { variants: ['good'] });
  const files = await collectModelFiles(good.dir);
  const artifacts = new ArtifactClient(artifactsUrl, profile.username, profile.password);
  for (let i = 0; i < n; i++) {
    const draft = await buildDraft(files, { name: 'iris' });
    const { params } = await uploadModel(artifacts, files, draft);
    await admin.call('models.publish', params);
  }
}

/**
 * When `done` first held for a rollout, by performance.now(). Listening starts before the rollout
 * does: a small wave can complete before the reply to `rollouts.start` is back.
 */
function whenDone(fleet: FleetServer, done: (v: RolloutView) => boolean): { at(id: number): Promise<number> } {
  const times = new Map<number, number>();
  const waiting = new Map<number, (t: number) => void>();
  const off = fleet.rollouts.onStatus((v) => {
    if (times.has(v.id) || !done(v)) return;
    const t = performance.now();
    times.set(v.id, t);
    waiting.get(v.id)?.(t);
  });
  return {
    at: (id) =>
      new Promise<number>((resolve, reject) => {
        const known = times.get(id);
        if (known !== undefined) {
          off();
          resolve(known);
          return;
        }
        const timer = setTimeout(() => {
          off();
          reject(new Error(`rollout not done in ${WAVE_TIMEOUT_MS / 1000} s: ${JSON.stringify(fleet.rollouts.show(id).status)}`));
        }, WAVE_TIMEOUT_MS);
        waiting.set(id, (t) => {
          clearTimeout(timer);
          off();
          resolve(t);
        });
      }),
  };
}

/** Until every device's latest report has `version` committed (in its stable history). */
async function waitCommitted(fleet: FleetServer, ids: readonly string[], version: number): Promise<void> {
  const deadline = performance.now() + WAVE_TIMEOUT_MS;
  for (;;) {
    // Stops at the first device not there yet: a poll costs little while most are not.
    const behind = ids.find((id) => !fleet.fleetStore.reported.get(id)?.doc.models.iris?.history.includes(version));
    if (behind === undefined) return;
    if (performance.now() > deadline) throw new Error(`${behind} (at least) never committed iris@${version}`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

/** BENCH_PROFILE=<dir>: a CPU profile of this process (the fleet) over each revert, for finding where the time goes. */
async function startProfile(): Promise<{ stop(name: string): Promise<void> } | null> {
  const dir = process.env.BENCH_PROFILE;
  if (!dir) return null;
  const { Session } = await import('node:inspector/promises');
  const session = new Session();
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.start');
  return {
    async stop(name) {
      const { profile } = await session.post('Profiler.stop');
      writeFileSync(join(dir, `${name}.cpuprofile`), JSON.stringify(profile));
      session.disconnect();
    },
  };
}

interface SizeResult {
  devices: number;
  raw_roundtrip_s: number;
  wave_s: number;
  revert_s: number;
  wave_vs_raw: number;
  revert_vs_raw: number;
  /** CPU time over wall time of the fleet's and the simulator's process during the last raw round trip and the revert. */
  cpu_share: { raw: { fleet: number; sim: number }; revert: { fleet: number; sim: number } };
}

/** CPU seconds of this process and of the simulator so far. */
async function cpu(sim: ChildProcess): Promise<{ fleet: number; sim: number }> {
  const own = process.cpuUsage();
  const simS = await new Promise<number>((resolve) => {
    sim.once('message', (m) => resolve((m as { cpuS: number }).cpuS));
    sim.send({ cpu: true });
  });
  return { fleet: (own.user + own.system) / 1e6, sim: simS };
}

/** CPU seconds each side spent over a window, as a share of its wall time (1 = one core busy throughout). */
function load(a: { fleet: number; sim: number }, b: { fleet: number; sim: number }, wallS: number): { fleet: number; sim: number } {
  return { fleet: round((b.fleet - a.fleet) / wallS, 2), sim: round((b.sim - a.sim) / wallS, 2) };
}

async function measure(fleet: FleetServer, admin: OpsClient, sim: ChildProcess, url: string, ids: readonly string[], selector: Selector, versions: [number, number]): Promise<SizeResult> {
  const n = ids.length;
  const raws: number[] = [];
  let rawLoad = { fleet: 0, sim: 0 };
  for (let i = 0; i < RAW_RUNS; i++) {
    const c0 = await cpu(sim);
    raws.push(await rawRoundTrip(url, ids));
    rawLoad = load(c0, await cpu(sim), raws[raws.length - 1] as number);
  }
  const raw = median(raws);
  let revertLoad = { fleet: 0, sim: 0 };

  // A wave of every selected device, then one more that is aborted: every device goes back.
  const waves: number[] = [];
  let revert = 0;
  for (const [k, version] of versions.entries()) {
    const plan: RolloutPlanInput = { steps: [{ type: 'wave', percent: 100 }, ...(k === 1 ? [{ type: 'pause' as const, untilApproved: true as const }] : [])] };
    const applied = whenDone(fleet, (v) => v.status.total.serving + v.status.total.failed >= n);
    const t0 = performance.now();
    const started = await admin.call('rollouts.start', { name: 'iris', version, selector, plan });
    const id = started.rollout?.id;
    if (id === undefined) throw new Error(`rollout of iris@${version} did not start: ${started.noop}`);
    const t1 = await applied.at(id);
    waves.push((t1 - t0) / 1000);
    // The first version commits everywhere before the next rollout: a device on probation waits
    // for its verdict before it takes another new version, as the agent does.
    if (k === 0) await waitCommitted(fleet, ids, version);
    if (k === 1) {
      const reverted = whenDone(fleet, (v) => (v.status.revert?.reverted ?? 0) >= n);
      const profile = await startProfile();
      const c0 = await cpu(sim);
      const epoch = Date.now();
      const t2 = performance.now();
      const trace: string[] = [];
      const offTrace = process.env.BENCH_TRACE ? fleet.rollouts.onStatus((v) => trace.push(`${Math.round(performance.now() - t2)}ms:${v.status.revert?.reverted ?? '-'}`)) : () => undefined;
      await admin.call('rollouts.abort', { id, reason: 'benchmark' });
      revert = ((await reverted.at(id)) - t2) / 1000;
      revertLoad = load(c0, await cpu(sim), revert);
      offTrace();
      if (trace.length > 0) {
        say(`    revert progress at the fleet (ms:devices): ${trace.join(' ')}`);
        const buckets = await new Promise<Record<string, number>>((resolve) => {
          sim.once('message', (m) => resolve((m as { buckets: Record<string, number> }).buckets));
          sim.send({ appliedSince: epoch });
        });
        say(`    applied at the devices (ms bucket:devices): ${Object.entries(buckets).map(([k, v]) => `${k}:${v}`).join(' ')}`);
      }
      await profile?.stop(`revert-${n}`);
    }
  }
  const wave = median(waves);
  return { devices: n, raw_roundtrip_s: round(raw), wave_s: round(wave), revert_s: round(revert), wave_vs_raw: round(wave / raw, 2), revert_vs_raw: round(revert / raw, 2), cpu_share: { raw: rawLoad, revert: revertLoad } };
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { quick: { type: 'boolean' }, devices: { type: 'string' } }, strict: true });
  const sizes = (values.devices ?? (values.quick ? '1000' : '1000,10000')).split(',').map(Number).sort((a, b) => a - b);
  if (sizes.some((s) => !Number.isInteger(s) || s < 1)) throw new Error('--devices takes positive integers, comma-separated');
  const max = sizes[sizes.length - 1] as number;
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-bench-rollout-'));
  const cleanups: (() => Promise<unknown>)[] = [];
  try {
    const broker = await startMosquitto(dir);
    cleanups.push(() => broker.stop());
    const fleet = new FleetServer(
      ServerConfig.parse({ dataDir: join(dir, 'fleet'), broker: { mode: 'external', url: broker.url, username: 'bench-fleet', connectWaitSec: 10 }, artifacts: { port: 0 } }),
      silentLogger(),
    );
    await fleet.start();
    cleanups.push(() => fleet.stop());
    const profile = JSON.parse(readFileSync(join(fleet.dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
    const admin = await OpsClient.connect({ ...profile, timeoutMs: 120_000 });
    cleanups.push(() => admin.close());

    say(`bench:rollout: ${sizes.join(' and ')} simulated devices on a private Mosquitto (${broker.url})`);
    await publishVersions(admin, profile, fleet.artifactsUrl, dir, 1 + 2 * sizes.length);
    const prefix = `bench-${process.pid}`;
    const ids = deviceIds({ devices: max, prefix });
    let t = performance.now();
    await provisionDevices({ profile: { ...profile, source: 'bench' }, ids, cacheFile: join(dir, 'creds.json'), tags: [], models: {}, concurrency: 64 });
    for (let i = 0; i < ids.length; i += 1000) await admin.call('models.assign', { name: 'iris', version: 1, deviceIds: ids.slice(i, i + 1000) });
    for (const n of sizes) if (n < max) await admin.call('devices.tag', { deviceIds: ids.slice(0, n), add: [`first-${n}`] });
    say(`  provisioned ${max} devices through the operator channel in ${round((performance.now() - t) / 1000, 1)} s`);

    const sim: ChildProcess = fork(join(HERE, 'rollout-sim.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    cleanups.push(async () => {
      if (sim.exitCode !== null) return;
      const exited = new Promise((r) => sim.once('exit', r));
      sim.send({ stop: true });
      const timer = setTimeout(() => sim.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(timer);
    });
    const ready = new Promise<{ connectS: number; rssMb: number }>((resolve, reject) => {
      sim.once('message', (m) => resolve(m as { connectS: number; rssMb: number }));
      sim.once('exit', (code) => reject(new Error(`simulator exited with ${code}`)));
    });
    t = performance.now();
    sim.send({ url: broker.url, devices: max, prefix, initial: { iris: 1 } });
    const r = await ready;
    say(`  simulator connected ${max} devices in ${round(r.connectS, 1)} s (RSS ${r.rssMb} MB)`);
    for (;;) {
      const stats = await admin.call('fleet.stats', {});
      if (stats.inSync >= max) break;
      if (performance.now() - t > WAVE_TIMEOUT_MS) throw new Error(`only ${stats.inSync} of ${max} devices in sync`);
      await new Promise((res) => setTimeout(res, 1000));
    }

    const results: SizeResult[] = [];
    for (const [i, n] of sizes.entries()) {
      const selector: Selector = n === max ? { kind: 'all' } : { kind: 'tags', tags: [`first-${n}`] };
      const res = await measure(fleet, admin, sim, broker.url, ids.slice(0, n), selector, [2 + 2 * i, 3 + 2 * i]);
      results.push(res);
      say(`  ${n} devices: wave ${res.wave_s} s (${res.wave_vs_raw}× raw), revert ${res.revert_s} s (${res.revert_vs_raw}× raw), raw round trip ${res.raw_roundtrip_s} s`);
      say(`    CPU busy (share of one core): raw fleet ${res.cpu_share.raw.fleet} sim ${res.cpu_share.raw.sim}; revert fleet ${res.cpu_share.revert.fleet} sim ${res.cpu_share.revert.sim}`);
    }
    const top = results[results.length - 1] as SizeResult;
    const out = {
      bench: 'rollout',
      ...top,
      sizes: results,
      goals: { devices: 10_000, ...GOALS },
      met: top.devices >= 10_000 ? { revert_s: top.revert_s <= GOALS.revert_s, revert_vs_raw: top.revert_vs_raw <= GOALS.revert_vs_raw } : null,
      fleet_rss_mb: Math.round(process.memoryUsage.rss() / 2 ** 20),
      simulator_rss_mb: r.rssMb,
    };
    process.stdout.write(JSON.stringify(out) + '\n');
  } finally {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench:rollout: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
