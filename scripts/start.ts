#!/usr/bin/env node
/**
 * `npm start`: the whole system on one machine. A fleet server with its embedded broker and data
 * under ./data, plus one local agent, provisioned through the operator channel like any device
 * and run as its own process.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { EXIT, isEdgefleetError } from '../proto/index.js';
import { loadConfig } from '../common/config.js';
import { createLogger } from '../common/log.js';
import { writeFileAtomic } from '../common/files.js';
import { ServerConfig } from '../fleet-server/config.js';
import { FleetServer } from '../fleet-server/server.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../fleet-server/auth/bootstrap.js';
import { OpsClient } from './ops-client.js';
import { readFileSync } from 'node:fs';

const LOCAL_DEVICE = 'local-agent';

function say(line = ''): void {
  process.stderr.write(line + '\n');
}

async function provisionLocalAgent(server: FleetServer, agentDir: string): Promise<string> {
  const configFile = join(agentDir, 'agent.json');
  const profile = JSON.parse(readFileSync(join(server.dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
  const client = await OpsClient.connect(profile);
  try {
    const known = server.fleetStore.devices.get(LOCAL_DEVICE) !== null;
    // Where models come from and the key they must be signed with; refreshed on every start, as
    // the artifact server's port may have changed.
    const models = { artifactsUrl: server.artifactsUrl, trustedKeysFile: resolve(server.dataDir, 'fleet-key.pub') };
    if (!known || !existsSync(configFile)) {
      if (known) await client.call('devices.remove', { deviceId: LOCAL_DEVICE });
      const { credential } = await client.call('devices.add', { deviceId: LOCAL_DEVICE });
      const config = { deviceId: LOCAL_DEVICE, stateDir: join(agentDir, 'state'), broker: { url: credential.brokerUrl, password: credential.password }, models };
      writeFileAtomic(configFile, JSON.stringify(config, null, 2) + '\n', 0o600);
    } else {
      const config = JSON.parse(readFileSync(configFile, 'utf8')) as Record<string, unknown>;
      config.models = { ...(config.models as object | undefined), ...models };
      writeFileAtomic(configFile, JSON.stringify(config, null, 2) + '\n', 0o600);
    }
  } finally {
    await client.close();
  }
  return configFile;
}

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { port: { type: 'string' }, 'data-dir': { type: 'string' } }, strict: true });
  const loaded = loadConfig({
    schema: ServerConfig,
    file: process.env.EDGEFLEET_SERVER_CONFIG,
    envPrefix: 'EDGEFLEET_SERVER',
    overrides: { dataDir: values['data-dir'], 'broker.port': values.port === undefined ? undefined : Number(values.port) },
  });
  if (!loaded.ok) {
    say(`invalid configuration:\n${loaded.errors.map((e) => `  - ${e}`).join('\n')}`);
    return EXIT.SERVER_CONFIG_INVALID;
  }
  const config = loaded.config;
  const log = createLogger('edgefleet-server', config.logLevel);
  const server = new FleetServer(config, log);
  try {
    await server.start();
  } catch (e) {
    await server.stop();
    if (isEdgefleetError(e) && e.code === 'EF_PORT_IN_USE') {
      say(`\n${e.message}.\nChoose another port: npm start -- --port <n>   (or EDGEFLEET_SERVER_BROKER_PORT=<n> npm start)\n`);
      return EXIT.SERVER_PORT_IN_USE;
    }
    throw e;
  }

  const agentDir = join(config.dataDir, 'agent');
  mkdirSync(agentDir, { recursive: true, mode: 0o700 });
  const agentConfig = await provisionLocalAgent(server, agentDir);
  const agentMain = fileURLToPath(new URL('../agent/main.js', import.meta.url));
  let agent: ChildProcess | null = spawn(process.execPath, [agentMain, '--config', agentConfig], { stdio: ['ignore', 'inherit', 'inherit'] });
  let stopping = false;

  const online = await waitFor(() => server.fleetStore.devices.get(LOCAL_DEVICE)?.presence === 'online', 30_000);
  say('');
  say(`edgefleet is running: fleet server with its embedded MQTT broker at ${server.brokerUrl}, data in ${resolve(config.dataDir)}`);
  say(online ? `the local agent "${LOCAL_DEVICE}" is connected.` : `the local agent "${LOCAL_DEVICE}" has not connected yet; see its log lines above.`);
  say('try, from this folder:');
  say('  npx edgefleet devices list');
  say(`  npx edgefleet devices show ${LOCAL_DEVICE}`);
  say(`  npx edgefleet desired set ${LOCAL_DEVICE} '[{"op":"replace","path":"/agent/reportIntervalSec","value":60}]'`);
  say('  npx edgefleet audit');
  say('models (README, "Models: a walkthrough"):');
  say('  npm run train:iris -- data/iris');
  say('  npx edgefleet model publish data/iris/good --name iris --golden-inputs data/iris/golden.json --baseline-inputs data/iris/baseline.json --health data/iris/health.json');
  say(`  npx edgefleet model assign iris@1 ${LOCAL_DEVICE}`);
  say('  npm run traffic:iris');
  say('stop with Ctrl-C.');
  say('');

  return new Promise<number>((resolveExit) => {
    const shutdown = (): void => {
      if (stopping) return;
      stopping = true;
      const finish = (): void => {
        server.stop().then(
          () => resolveExit(EXIT.OK),
          () => resolveExit(EXIT.SERVER_FATAL),
        );
      };
      if (agent && agent.exitCode === null) {
        agent.once('exit', finish);
        agent.kill('SIGTERM');
      } else finish();
    };
    agent?.once('exit', (code, signal) => {
      if (!stopping) log.error({ code, signal }, 'the local agent exited; the fleet server keeps running');
      agent = null;
    });
    process.once('SIGINT', shutdown);
    process.once('SIGTERM', shutdown);
  });
}

async function waitFor(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return cond();
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    say(`edgefleet: ${(err as Error).stack ?? String(err)}`);
    process.exit(EXIT.SERVER_FATAL);
  },
);
