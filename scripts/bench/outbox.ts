#!/usr/bin/env node
/**
 * `npm run bench:outbox`: the outbox against its ceiling, in one run on one machine.
 *
 * - raw_insert_per_s: the same rows into the same table with plain better-sqlite3, one transaction (the ceiling)
 * - enqueue_per_s:    OutboxStore.enqueue, 500 records per turn of the event loop, awaited
 *                     (both: median of three alternating rounds)
 * - enqueue_p99_ms:   enqueue-to-commit latency of single records at 2,000 records/s
 * - commit_normal_us / commit_full_us: one record per transaction, synchronous=NORMAL vs FULL (the
 *   durability trade-off the README documents)
 * - replay_per_s:     a 50,000-record backlog from agent start to empty outbox, through a real broker
 *                     (the Mosquitto at 127.0.0.1:1883 when it answers, else the embedded one) into
 *                     the fleet's database, acknowledgements included
 *
 * The last line is one JSON object.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import mqtt from 'mqtt';
import { RECORD_CLASSES, CLASS_PRIORITY, type RecordClass } from '../../proto/index.js';
import { silentLogger } from '../../common/log.js';
import { OutboxStore, type OutboxOptions } from '../../agent/outbox/store.js';
import { openDb } from '../../agent/outbox/db.js';
import { AgentConfig } from '../../agent/config.js';
import { Agent } from '../../agent/agent.js';
import type { CliProfile } from '../../fleet-server/auth/bootstrap.js';
import { OpsClient } from '../ops-client.js';

const N = Number(process.env.BENCH_RECORDS ?? 50_000);
const BODY = { latencyP95Ms: 12.5, throughputPerSec: 31.2, model: 'detector', version: 7, window: [1_700_000_000_000, 1_700_000_060_000] };

function options(synchronous: 'NORMAL' | 'FULL'): OutboxOptions {
  const big = { maxBytes: 1 << 30, maxAgeSec: 86_400 * 365 };
  return { maxBytes: 1 << 30, synchronous, perClass: Object.fromEntries(RECORD_CLASSES.map((c) => [c, big])) as Record<RecordClass, typeof big> };
}

/** The ceiling: the same rows into the same table (schema, indexes, pragmas), one transaction, no outbox. */
function rawInsertPerSec(dir: string): number {
  mkdirSync(dir, { recursive: true });
  const db = openDb(join(dir, 'raw.db'), 'NORMAL');
  const insert = db.prepare('INSERT INTO records (seq, cls, prio, ts, type, body, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)');
  const t0 = process.hrtime.bigint();
  db.transaction(() => {
    for (let i = 1; i <= N; i++) {
      const body = JSON.stringify(BODY);
      insert.run(i, 'metric', CLASS_PRIORITY.metric, Date.now(), 'bench', body, body.length + 37);
    }
  })();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  db.close();
  return N / s;
}

async function enqueuePerSec(dir: string): Promise<number> {
  const { store } = OutboxStore.open(dir, options('NORMAL'));
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i += 500) {
    await Promise.all(Array.from({ length: Math.min(500, N - i) }, () => store.enqueue('metric', 'bench', BODY)));
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  store.close();
  return N / s;
}

async function enqueueP99Ms(dir: string): Promise<number> {
  const { store } = OutboxStore.open(dir, options('NORMAL'));
  const lat: number[] = [];
  const count = Math.min(N, 10_000);
  for (let i = 0; i < count; i += 2) {
    // Two records per millisecond: a busy device, not a burst.
    const t = process.hrtime.bigint();
    await Promise.all([store.enqueue('metric', 'bench', BODY), store.enqueue('event', 'bench', BODY)]);
    const ms = Number(process.hrtime.bigint() - t) / 1e6;
    lat.push(ms, ms);
    await new Promise((r) => setTimeout(r, 1));
  }
  store.close();
  lat.sort((a, b) => a - b);
  return lat[Math.floor(lat.length * 0.99)] as number;
}

async function commitMicros(dir: string, synchronous: 'NORMAL' | 'FULL'): Promise<number> {
  const { store } = OutboxStore.open(dir, options(synchronous));
  const count = 2000;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < count; i++) await store.enqueue('event', 'bench', BODY);
  const us = Number(process.hrtime.bigint() - t0) / 1e3 / count;
  store.close();
  return us;
}

async function sharedBrokerUp(url: string): Promise<boolean> {
  try {
    const c = await mqtt.connectAsync(url, { connectTimeout: 2000, reconnectPeriod: 0, clientId: `bench-probe-${randomBytes(3).toString('hex')}` });
    await c.endAsync();
    return true;
  } catch {
    return false;
  }
}

/** The fleet server as its own process, as deployed: the agent and the fleet do not share a CPU. */
async function startFleetProcess(dataDir: string, env: Record<string, string>): Promise<{ child: ChildProcess; profile: CliProfile }> {
  const main = fileURLToPath(new URL('../../fleet-server/main.js', import.meta.url));
  const child = spawn(process.execPath, [main, '--data-dir', dataDir], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env, EDGEFLEET_SERVER_LOG_LEVEL: 'warn' } });
  const profileFile = join(dataDir, 'cli.json');
  for (let i = 0; i < 200 && !existsSync(profileFile); i++) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, 300));
  return { child, profile: JSON.parse(readFileSync(profileFile, 'utf8')) as CliProfile };
}

async function replayPerSec(dir: string): Promise<{ perSec: number; broker: string }> {
  const shared = 'mqtt://127.0.0.1:1883';
  const external = await sharedBrokerUp(shared);
  const fleetUser = `fleet-bench-${randomBytes(3).toString('hex')}`;
  const dataDir = join(dir, 'fleet');
  const { child, profile } = await startFleetProcess(
    dataDir,
    external
      ? { EDGEFLEET_SERVER_BROKER_MODE: 'external', EDGEFLEET_SERVER_BROKER_URL: shared, EDGEFLEET_SERVER_BROKER_USERNAME: fleetUser }
      : { EDGEFLEET_SERVER_BROKER_PORT: '0' },
  );
  const exited = new Promise((r) => child.once('exit', r));
  const admin = await OpsClient.connect(profile);
  const deviceId = `bench-${randomBytes(3).toString('hex')}`;
  const { credential } = await admin.call('devices.add', { deviceId });
  const stateDir = join(dir, 'agent');
  // Fill the outbox as if the device had been offline.
  const { store } = OutboxStore.open(stateDir, options('NORMAL'));
  for (let i = 0; i < N; i += 1000) await Promise.all(Array.from({ length: Math.min(1000, N - i) }, () => store.enqueue('metric', 'bench', BODY)));
  store.close();
  const agent = new Agent(
    AgentConfig.parse({ deviceId, stateDir, broker: { url: credential.brokerUrl, password: credential.password }, runtimes: { probe: false } }),
    silentLogger(),
  );
  const t0 = process.hrtime.bigint();
  await agent.start();
  while (agent.outbox.backlog().records > 0) await new Promise((r) => setTimeout(r, 5));
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  await agent.stop();
  const stored = (await admin.call('devices.show', { deviceId })).telemetry?.received ?? 0;
  await admin.call('devices.remove', { deviceId });
  await admin.close();
  child.kill('SIGTERM');
  await exited;
  if (external) {
    // Leave the shared broker clean: discard the persistent sessions this run created.
    for (const id of [deviceId, fleetUser]) await (await mqtt.connectAsync(shared, { clientId: id, clean: true, reconnectPeriod: 0 })).endAsync();
  }
  if (stored < N) throw new Error(`replay stored ${stored} of ${N} records`);
  return { perSec: N / s, broker: external ? `mosquitto ${shared}` : 'embedded aedes' };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-bench-'));
  try {
    // Alternating rounds, median of each: disk and CPU noise on a shared machine swings a single pass by ±30 %.
    const raws: number[] = [];
    const enqs: number[] = [];
    for (let round = 0; round < 3; round++) {
      raws.push(rawInsertPerSec(join(dir, `raw-${round}`)));
      enqs.push(await enqueuePerSec(join(dir, `enqueue-${round}`)));
    }
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
    const raw = median(raws);
    const enq = median(enqs);
    const p99 = await enqueueP99Ms(join(dir, 'p99'));
    const normal = await commitMicros(join(dir, 'normal'), 'NORMAL');
    const full = await commitMicros(join(dir, 'full'), 'FULL');
    const replay = await replayPerSec(dir);
    const result = {
      bench: 'outbox',
      records: N,
      enqueue_per_s: Math.round(enq),
      raw_insert_per_s: Math.round(raw),
      enqueue_ratio: Number((enq / raw).toFixed(3)),
      enqueue_p99_ms: Number(p99.toFixed(3)),
      commit_normal_us: Number(normal.toFixed(1)),
      commit_full_us: Number(full.toFixed(1)),
      replay_per_s: Math.round(replay.perSec),
      broker: replay.broker,
    };
    process.stdout.write(
      `outbox: enqueue ${result.enqueue_per_s}/s vs raw ${result.raw_insert_per_s}/s (${result.enqueue_ratio}), p99 ${result.enqueue_p99_ms} ms, ` +
        `one-record commit ${result.commit_normal_us} µs NORMAL / ${result.commit_full_us} µs FULL, replay ${result.replay_per_s}/s via ${result.broker}\n`,
    );
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:outbox: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
