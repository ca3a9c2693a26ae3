#!/usr/bin/env node
/**
 * Crash loop for the outbox: a real fleet server (embedded broker) and a real agent process
 * (dist/scripts/outbox-load.js) that reports records as fast as it can, killed with SIGKILL at
 * random moments, during enqueue and during replay, while the fleet server itself is restarted
 * now and then mid-replay. At the end the agent drains its outbox and the loop checks that every
 * record the agent printed as committed is in the fleet's database, once.
 *
 *   npm run soak:outbox -- --iterations 200      (CI runs a few iterations through vitest)
 *
 * Prints one JSON object as its last line; exits 1 if a record is missing.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { compiledEntry } from '../common/compiled.js';
import { silentLogger } from '../common/log.js';
import { ServerConfig } from '../fleet-server/config.js';
import { FleetServer } from '../fleet-server/server.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../fleet-server/auth/bootstrap.js';
import { OpsClient } from './ops-client.js';

export interface CrashLoopOptions {
  iterations: number;
  /** Restart the fleet server (and so the embedded broker) during every n-th iteration; 0 never. */
  restartFleetEvery: number;
  /** Records each agent run tries to report before it is killed. */
  recordsPerRun: number;
  seed?: number;
}

export interface CrashLoopResult {
  iterations: number;
  kills: number;
  fleetRestarts: number;
  committed: number;
  stored: number;
  missing: number[];
  duplicatesDropped: number;
  ms: number;
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const addr = srv.address();
  await new Promise<void>((r) => srv.close(() => r()));
  if (typeof addr !== 'object' || !addr) throw new Error('no port');
  return addr.port;
}

/** A small seeded generator, so that a failing run can be repeated. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

export async function crashLoop(opts: CrashLoopOptions, loader = distLoader()): Promise<CrashLoopResult> {
  const started = Date.now();
  const random = rng(opts.seed ?? Date.now());
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-crash-'));
  const port = await freePort();
  const config = ServerConfig.parse({ dataDir: join(dir, 'fleet'), broker: { port } });
  let fleet = new FleetServer(config, silentLogger());
  await fleet.start();
  const profile = JSON.parse(readFileSync(join(config.dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
  const admin = await OpsClient.connect(profile);
  const { credential } = await admin.call('devices.add', { deviceId: 'crash-1' });
  await admin.close();
  const agentConfig = join(dir, 'agent.json');
  writeFileSync(
    agentConfig,
    JSON.stringify({
      deviceId: 'crash-1',
      stateDir: join(dir, 'agent'),
      broker: { url: credential.brokerUrl, password: credential.password, keepaliveSec: 5, reconnectBaseMs: 50, reconnectCapMs: 500 },
      runtimes: { probe: false },
    }),
  );

  const committed = new Set<number>();
  let kills = 0;
  let fleetRestarts = 0;
  const run = (args: string[], killAfterMs: number | null): Promise<void> =>
    new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [loader, '--config', agentConfig, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      let buf = '';
      let err = '';
      child.stdout.on('data', (d: Buffer) => {
        buf += d.toString();
        const lines = buf.split('\n');
        buf = lines.pop() ?? '';
        for (const l of lines) {
          if (l.startsWith('c ')) committed.add(Number(l.slice(2)));
          else if (l === 'ready') arm();
        }
      });
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      // The clock starts when the agent is up, so every kill lands in enqueue or replay, not in start-up.
      let timer: NodeJS.Timeout | null = null;
      const arm = (): void => {
        if (killAfterMs !== null && timer === null) timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
      };
      child.on('exit', (code, signal) => {
        if (timer) clearTimeout(timer);
        if (signal === 'SIGKILL') kills++;
        if (code !== null && code !== 0) reject(new Error(`loader exited ${code}: ${err}`));
        else resolve();
      });
    });

  for (let i = 0; i < opts.iterations; i++) {
    const killAt = 20 + Math.floor(random() * 700);
    const restart = opts.restartFleetEvery > 0 && i % opts.restartFleetEvery === opts.restartFleetEvery - 1;
    // Odd iterations only replay what earlier ones left, so kills land in pure replay too.
    const args = i % 2 === 0 ? ['--count', String(opts.recordsPerRun), '--rate', '20000'] : ['--drain'];
    const running = run(args, killAt);
    if (restart) {
      await new Promise((r) => setTimeout(r, Math.floor(random() * killAt)));
      await fleet.stop();
      fleet = new FleetServer(config, silentLogger());
      await fleet.start();
      fleetRestarts++;
    }
    await running;
  }
  // Last, a run that only drains what is left.
  await run(['--drain'], null);

  const stored = new Set(fleet.fleetStore.telemetry.list('crash-1', { limit: Number.MAX_SAFE_INTEGER }).map((r) => r.seq));
  const stats = fleet.fleetStore.telemetry.stats('crash-1');
  await fleet.stop();
  rmSync(dir, { recursive: true, force: true });
  const missing = [...committed].filter((s) => !stored.has(s)).sort((a, b) => a - b);
  return {
    iterations: opts.iterations,
    kills,
    fleetRestarts,
    committed: committed.size,
    stored: stored.size,
    missing,
    duplicatesDropped: stats?.duplicates ?? 0,
    ms: Date.now() - started,
  };
}

function distLoader(): string {
  return compiledEntry(import.meta.url, './outbox-load.js');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({ options: { iterations: { type: 'string' }, seed: { type: 'string' } }, strict: true });
  crashLoop({ iterations: Number(values.iterations ?? 50), restartFleetEvery: 5, recordsPerRun: 20_000, seed: values.seed ? Number(values.seed) : undefined }).then(
    (r) => {
      process.stdout.write(JSON.stringify({ ...r, missing: r.missing.length, missingFirst: r.missing.slice(0, 10) }) + '\n');
      process.exit(r.missing.length === 0 ? 0 : 1);
    },
    (err: unknown) => {
      process.stderr.write(`outbox-crash: ${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
