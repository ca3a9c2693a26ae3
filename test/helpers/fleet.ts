/**
 * Test harness: real daemons in this process (FleetServer, Agent), real broker connections, real
 * files under a temporary directory. Everything started here is stopped by `cleanup()`.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { silentLogger } from '../../common/log.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { FleetServer } from '../../fleet-server/server.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../../fleet-server/auth/bootstrap.js';
import { AgentConfig } from '../../agent/config.js';
import { Agent } from '../../agent/agent.js';
import { OpsClient } from '../../scripts/ops-client.js';
import { generateSecret, hashSecret } from '../../fleet-server/auth/credentials.js';

type Stoppable = () => unknown;
const cleanups: Stoppable[] = [];

/** Registers work for `cleanup()`, which runs it in reverse order. */
export function onCleanup(fn: Stoppable): void {
  cleanups.push(fn);
}

export async function cleanup(): Promise<void> {
  while (cleanups.length > 0) {
    const fn = cleanups.pop() as Stoppable;
    try {
      await fn();
    } catch {
      // best effort: one failing teardown must not keep the others from running
    }
  }
}

export function tempDir(prefix = 'edgefleet-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  onCleanup(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A short random suffix, so that tests sharing one external broker never meet. */
export function uniq(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString('hex')}`;
}

/** Where the daemons under test meet: the embedded broker, or an external broker by URL. */
export type BrokerTarget =
  | { kind: 'embedded' }
  | {
      kind: 'external';
      url: string;
      protocolVersion: 4 | 5;
      /** Default: a unique name, so that concurrent runs on one shared broker never take over each other's session. */
      username?: string;
      mosquittoConfigDir?: string;
      mosquittoReloadCommand?: string;
    };

export interface FleetHandle {
  server: FleetServer;
  dataDir: string;
  /** The fleet's identity (and client id) on the broker. */
  brokerUsername: string;
  profile: CliProfile;
  admin: OpsClient;
  stop(): Promise<void>;
  restart(): Promise<void>;
}

export async function startFleet(target: BrokerTarget = { kind: 'embedded' }, dataDir = tempDir()): Promise<FleetHandle> {
  const broker =
    target.kind === 'embedded'
      ? { mode: 'embedded', port: 0, connectWaitSec: 10 }
      : {
          mode: 'external',
          url: target.url,
          username: target.username ?? uniq('fleet'),
          protocolVersion: target.protocolVersion,
          connectWaitSec: 10,
          mosquittoConfigDir: target.mosquittoConfigDir,
          mosquittoReloadCommand: target.mosquittoReloadCommand,
        };
  const config = ServerConfig.parse({ dataDir, broker, artifacts: { port: 0 } });
  let server = new FleetServer(config, silentLogger());
  await server.start();
  let port = 0;
  let artifactsPort = 0;
  const handle: FleetHandle = {
    server,
    dataDir,
    brokerUsername: config.broker.username,
    profile: readProfile(dataDir),
    admin: await OpsClient.connect(readProfile(dataDir)),
    async stop() {
      await handle.admin.close().catch(() => undefined);
      await handle.server.stop();
    },
    /** Stops and starts the fleet on the same data directory (and, embedded, the same port). */
    async restart() {
      port = target.kind === 'embedded' ? Number(new URL(handle.server.brokerUrl).port) : 0;
      artifactsPort = Number(new URL(handle.server.artifactsUrl).port);
      await handle.stop();
      const again = ServerConfig.parse({
        dataDir,
        broker: { ...broker, ...(target.kind === 'embedded' ? { port } : { username: config.broker.username }) },
        artifacts: { port: artifactsPort },
      });
      server = new FleetServer(again, silentLogger());
      await server.start();
      handle.server = server;
      handle.profile = readProfile(dataDir);
      handle.admin = await OpsClient.connect(handle.profile);
    },
  };
  onCleanup(() => handle.stop());
  return handle;
}

function readProfile(dataDir: string): CliProfile {
  return JSON.parse(readFileSync(join(dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
}

/**
 * A `fleet`-kind identity (may publish and read the whole tree), inserted straight into the store:
 * for tests that play the fleet's part or watch everything. Returns its broker credential.
 */
export function addFleetIdentity(fleet: FleetHandle, name = uniq('fleet-side')): { username: string; password: string } {
  const password = generateSecret();
  fleet.server.fleetStore.principals.insert({ name, kind: 'fleet', role: null, secretHash: hashSecret(password), createdAt: Date.now() });
  return { username: name, password };
}

export interface Credential {
  username: string;
  password: string;
  brokerUrl: string;
}

export async function addDevice(fleet: FleetHandle, deviceId: string): Promise<Credential> {
  const { credential } = await fleet.admin.call('devices.add', { deviceId });
  return credential;
}

export async function startAgent(
  cred: Credential,
  opts: { stateDir?: string; protocolVersion?: 4 | 5; url?: string; outbox?: Record<string, unknown>; models?: Record<string, unknown>; api?: Record<string, unknown>; learner?: Record<string, unknown> } = {},
): Promise<{ agent: Agent; stateDir: string }> {
  const stateDir = opts.stateDir ?? tempDir('edgefleet-agent-');
  const config = AgentConfig.parse({
    deviceId: cred.username,
    stateDir,
    broker: {
      url: opts.url ?? cred.brokerUrl,
      password: cred.password,
      protocolVersion: opts.protocolVersion ?? 4,
      reconnectBaseMs: 50,
      reconnectCapMs: 500,
    },
    runtimes: { probe: false },
    ...(opts.outbox ? { outbox: opts.outbox } : {}),
    ...(opts.models ? { models: opts.models } : {}),
    ...(opts.learner ? { learner: opts.learner } : {}),
    // Any free port: suites run side by side.
    api: { port: 0, ...opts.api },
  });
  const agent = new Agent(config, silentLogger());
  await agent.start();
  onCleanup(() => agent.stop());
  return { agent, stateDir };
}

/** Resolves when the agent has applied `version` (or already holds it). */
export function applied(agent: Agent, version: number, timeoutMs = 15_000): Promise<void> {
  if (agent.desiredVersion >= version) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`agent did not reach desired version ${version} (at ${agent.desiredVersion})`));
    }, timeoutMs);
    const off = agent.onApplied((v) => {
      if (v >= version) {
        clearTimeout(timer);
        off();
        resolve();
      }
    });
  });
}

/** Polls a condition of a store or a daemon. For state that has no event to wait on. */
export async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A raw MQTT client for poking at the broker the way an attacker or a buggy device would. */
export async function rawClient(url: string, opts: IClientOptions): Promise<MqttClient> {
  const client = await mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 5000, ...opts });
  onCleanup(() => client.endAsync(true));
  return client;
}

/** Tries to connect; resolves with the CONNACK error code (0 when accepted). */
export async function connectCode(url: string, opts: IClientOptions): Promise<number> {
  try {
    const client = await mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 5000, ...opts });
    await client.endAsync(true);
    return 0;
  } catch (e) {
    const code = (e as { code?: number }).code;
    return typeof code === 'number' ? code : -1;
  }
}

/** True when a plain TCP MQTT broker answers at `url` (anonymous). */
export async function brokerReachable(url: string): Promise<boolean> {
  return (await connectCode(url, { clientId: uniq('probe') })) === 0;
}
