#!/usr/bin/env node
/**
 * `npm run bench:ops`: a round trip on the operator channel (request → fleet → audit → reply)
 * against the baseline of a bare MQTT QoS 1 request/reply between two clients on the same embedded
 * broker, measured in one run. The last line is one JSON object.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { silentLogger } from '../../common/log.js';
import { disableNagle } from '../../common/mqtt-session.js';
import { generateSecret, hashSecret } from '../../fleet-server/auth/credentials.js';
import type { CliProfile } from '../../fleet-server/auth/bootstrap.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { FleetServer } from '../../fleet-server/server.js';
import { OpsClient } from '../ops-client.js';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 300);

function summary(ms: number[]): { median: number; p99: number } {
  const s = [...ms].sort((a, b) => a - b);
  return { median: Number((s[Math.floor(s.length / 2)] as number).toFixed(3)), p99: Number((s[Math.floor(s.length * 0.99)] as number).toFixed(3)) };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-bench-ops-'));
  const fleet = new FleetServer(ServerConfig.parse({ dataDir: dir, broker: { port: 0 } }), silentLogger());
  await fleet.start();
  try {
    // Baseline: an echo client and a caller with the fleet's powers, on topics of their own.
    const connect = async (name: string): Promise<mqtt.MqttClient> => {
      const password = generateSecret();
      fleet.fleetStore.principals.insert({ name, kind: 'fleet', role: null, secretHash: hashSecret(password), createdAt: Date.now() });
      return mqtt.connectAsync(fleet.brokerUrl, { clientId: name, username: name, password, reconnectPeriod: 0 });
    };
    const echo = await connect('bench-echo');
    const caller = await connect('bench-caller');
    disableNagle(echo);
    disableNagle(caller);
    await echo.subscribeAsync('edgefleet/v1/bench/req', { qos: 1 });
    await caller.subscribeAsync('edgefleet/v1/bench/res', { qos: 1 });
    echo.on('message', (_t, p) => void echo.publishAsync('edgefleet/v1/bench/res', p, { qos: 1 }));
    const raw: number[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      const t = performance.now();
      const got = new Promise((r) => caller.once('message', r));
      await caller.publishAsync('edgefleet/v1/bench/req', `{"i":${i}}`, { qos: 1 });
      await got;
      raw.push(performance.now() - t);
    }
    await Promise.all([echo.endAsync(), caller.endAsync()]);

    const client = await OpsClient.connect(JSON.parse(readFileSync(join(dir, 'cli.json'), 'utf8')) as CliProfile);
    const ops: number[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      const t = performance.now();
      await client.call('devices.list', {});
      ops.push(performance.now() - t);
    }
    await client.close();
    const r = summary(raw);
    const o = summary(ops);
    const result = {
      bench: 'ops',
      rounds: ROUNDS,
      raw_roundtrip_median_ms: r.median,
      raw_roundtrip_p99_ms: r.p99,
      ops_roundtrip_median_ms: o.median,
      ops_roundtrip_p99_ms: o.p99,
      ops_overhead_ratio: Number((o.median / r.median).toFixed(2)),
    };
    process.stdout.write(`ops: devices.list ${o.median} ms median (p99 ${o.p99}) vs bare QoS 1 request/reply ${r.median} ms (p99 ${r.p99})\n`);
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await fleet.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:ops: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
