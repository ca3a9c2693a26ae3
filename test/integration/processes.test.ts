/**
 * The three executables as real processes, started from dist/ the way systemd or an operator starts
 * them: the sd_notify protocol, signals, exit codes, and configuration errors. Each process runs in
 * its own temporary directory with an environment stripped of EDGEFLEET_* settings; the embedded
 * broker always listens on a free port (never 1883, the machine's shared broker).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EXIT } from '../../proto/index.js';
import { cleanup, onCleanup, tempDir, waitFor } from '../helpers/fleet.js';
import { freePort } from '../helpers/mosquitto.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const SERVER = join(ROOT, 'dist/fleet-server/main.js');
const AGENT = join(ROOT, 'dist/agent/main.js');
const CLI = join(ROOT, 'dist/scripts/cli.js');

// ---------------------------------------------------------------------------------------------
// Processes

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

interface Proc {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Everything the process printed, for failure messages. */
  output(): string;
  readonly exited: Promise<Exit>;
  running(): boolean;
}

/** The test runner's environment without anything that would configure the daemons under test. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('EDGEFLEET_') || ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID', 'STATE_DIRECTORY', 'CREDENTIALS_DIRECTORY'].includes(k)) continue;
    env[k] = v;
  }
  // Ports the tests do not look at: any free one, so suites running side by side never collide.
  return { ...env, EDGEFLEET_SERVER_ARTIFACTS_PORT: '0', EDGEFLEET_AGENT_API_PORT: '0', ...extra };
}

function spawnNode(script: string, args: string[], opts: { cwd: string; env?: Record<string, string> }): Proc {
  const child = spawn(process.execPath, [script, ...args], { cwd: opts.cwd, env: cleanEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  let done = false;
  // 'close', not 'exit': by then stdout and stderr have been read to the end.
  const exited = new Promise<Exit>((res) => {
    child.once('close', (code, signal) => {
      done = true;
      res({ code, signal });
    });
    child.once('error', () => {
      done = true;
      res({ code: null, signal: null });
    });
  });
  onCleanup(async () => {
    if (done) return;
    child.kill('SIGKILL');
    await exited;
  });
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    output: () => `--- stdout ---\n${out}\n--- stderr ---\n${err}`,
    exited,
    running: () => !done,
  };
}

/** The exit of `proc`, or a failure naming what it printed if it takes longer than `ms`. */
async function exitWithin(proc: Proc, ms: number, what: string): Promise<Exit> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still running after ${ms} ms\n${proc.output()}`)), ms);
  });
  try {
    return await Promise.race([proc.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves once the process has logged `msg` (pino JSON lines on stdout); fails early if it exits. */
async function logged(proc: Proc, msg: string, timeoutMs = 15_000): Promise<void> {
  const needle = `"msg":${JSON.stringify(msg)}`;
  await waitFor(`log line ${needle}`, () => {
    if (proc.stdout().includes(needle)) return true;
    if (!proc.running()) throw new Error(`exited before logging ${needle}\n${proc.output()}`);
    return false;
  }, timeoutMs).catch((e: unknown) => {
    throw new Error(`${(e as Error).message}\n${proc.output()}`);
  });
}

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

async function cli(args: string[], cwd: string): Promise<CliResult> {
  const proc = spawnNode(CLI, args, { cwd });
  const { code } = await exitWithin(proc, 20_000, `edgefleet ${args.join(' ')}`);
  return { code, stdout: proc.stdout(), stderr: proc.stderr() };
}

// ---------------------------------------------------------------------------------------------
// sd_notify: a NOTIFY_SOCKET of our own, as systemd would give one

interface UnixDgramSocket {
  bind(path: string): void;
  on(event: 'message', cb: (buf: Buffer) => void): void;
  on(event: 'error', cb: (err: Error) => void): void;
  close(): void;
}
interface UnixDgram {
  createSocket(type: 'unix_dgram'): UnixDgramSocket;
}

function loadUnixDgram(): UnixDgram | null {
  try {
    return createRequire(import.meta.url)('unix-dgram') as UnixDgram;
  } catch {
    return null;
  }
}
const unixDgram = loadUnixDgram();

interface Notification {
  at: number;
  lines: string[];
}

interface NotifyListener {
  path: string;
  received: Notification[];
  /** Notifications carrying `line` (e.g. READY=1). */
  with(line: string): Notification[];
}

function notifyListener(dir: string): NotifyListener {
  if (!unixDgram) throw new Error('unix-dgram is not installed');
  const path = join(dir, 'notify.sock');
  const socket = unixDgram.createSocket('unix_dgram');
  const received: Notification[] = [];
  const errors: Error[] = [];
  socket.on('message', (buf) => received.push({ at: Date.now(), lines: buf.toString().split('\n') }));
  socket.on('error', (err) => errors.push(err));
  // bind() reports a failure through 'error', synchronously.
  socket.bind(path);
  if (errors[0]) throw errors[0];
  onCleanup(() => socket.close());
  return { path, received, with: (line) => received.filter((n) => n.lines.includes(line)) };
}

// ---------------------------------------------------------------------------------------------
// Daemons

interface Fleet {
  proc: Proc;
  dir: string;
  dataDir: string;
  port: number;
  profile: string;
}

async function startServer(env: Record<string, string> = {}): Promise<Fleet> {
  const dir = tempDir('edgefleet-proc-server-');
  const dataDir = join(dir, 'data');
  const port = await freePort();
  const proc = spawnNode(SERVER, ['--data-dir', dataDir, '--port', String(port)], { cwd: dir, env });
  await logged(proc, 'fleet server started');
  return { proc, dir, dataDir, port, profile: join(dataDir, 'cli.json') };
}

interface Device {
  deviceId: string;
  configFile: string;
  dir: string;
}

/** Provisions a device with the operator CLI and writes its agent config, as an installer would. */
async function provision(fleet: Fleet, deviceId: string): Promise<Device> {
  const r = await cli(['--profile', fleet.profile, '--json', 'devices', 'add', deviceId], fleet.dir);
  expect(r.code, r.stderr).toBe(EXIT.OK);
  const added = JSON.parse(r.stdout) as { credential: { password: string; brokerUrl: string } };
  const dir = tempDir('edgefleet-proc-agent-');
  const configFile = join(dir, 'agent.json');
  const config = {
    deviceId,
    stateDir: join(dir, 'state'),
    broker: { url: added.credential.brokerUrl, password: added.credential.password, keepaliveSec: 5, reconnectBaseMs: 100, reconnectCapMs: 1000 },
    runtimes: { probe: false },
  };
  writeFileSync(configFile, JSON.stringify(config, null, 2), { mode: 0o600 });
  return { deviceId, configFile, dir };
}

function startAgent(device: Device, env: Record<string, string> = {}): Proc {
  return spawnNode(AGENT, ['--config', device.configFile], { cwd: device.dir, env });
}

async function presence(fleet: Fleet, deviceId: string): Promise<string> {
  const r = await cli(['--profile', fleet.profile, '--json', 'devices', 'show', deviceId], fleet.dir);
  if (r.code !== EXIT.OK) throw new Error(`devices show ${deviceId}: exit ${r.code}\n${r.stderr}`);
  return (JSON.parse(r.stdout) as { presence: string }).presence;
}

async function waitPresence(fleet: Fleet, deviceId: string, want: string, timeoutMs: number, proc?: Proc): Promise<void> {
  let last = '';
  await waitFor(
    `${deviceId} ${want}`,
    async () => {
      last = await presence(fleet, deviceId);
      return last === want;
    },
    timeoutMs,
  ).catch((e: unknown) => {
    throw new Error(`${(e as Error).message} (last seen ${last})${proc ? `\n${proc.output()}` : ''}`);
  });
}

// ---------------------------------------------------------------------------------------------

afterAll(cleanup);

describe.skipIf(unixDgram === null)('sd_notify (NOTIFY_SOCKET, WATCHDOG_USEC=2 s)', () => {
  /** READY=1 with a STATUS, watchdog pings at half the interval, STOPPING=1 and exit 0 on SIGTERM. */
  async function expectNotifyLifecycle(proc: Proc, notify: NotifyListener, status: RegExp): Promise<void> {
    await waitFor('READY=1', () => notify.with('READY=1').length > 0 || !proc.running(), 15_000);
    expect(proc.running(), proc.output()).toBe(true);
    const ready = notify.with('READY=1');
    expect(ready).toHaveLength(1);
    expect(ready[0]?.lines.find((l) => l.startsWith('STATUS='))).toMatch(status);
    // Nothing is announced before READY=1.
    expect(notify.received[0]?.lines).toContain('READY=1');

    await waitFor('two WATCHDOG=1', () => notify.with('WATCHDOG=1').length >= 2, 6000);
    const [w1, w2] = notify.with('WATCHDOG=1');
    const readyAt = ready[0]?.at ?? 0;
    // WATCHDOG_USEC=2000000: a ping every second, the first one a second after READY=1
    // (Loose bounds, since timers on a busy machine run late, but a ping every 2 s would fail them.)
    for (const gap of [(w1?.at ?? 0) - readyAt, (w2?.at ?? 0) - (w1?.at ?? 0)]) {
      expect(gap).toBeGreaterThanOrEqual(500);
      expect(gap).toBeLessThan(1800);
    }
    expect(notify.with('STOPPING=1')).toHaveLength(0);

    proc.child.kill('SIGTERM');
    const exit = await exitWithin(proc, 10_000, 'stop on SIGTERM');
    expect(exit, proc.output()).toEqual({ code: EXIT.OK, signal: null });
    await waitFor('STOPPING=1', () => notify.with('STOPPING=1').length > 0, 2000);
    const stoppingIdx = notify.received.findIndex((n) => n.lines.includes('STOPPING=1'));
    // STOPPING=1 is the last word: no watchdog ping after it.
    expect(notify.received.slice(stoppingIdx + 1)).toEqual([]);
  }

  it('edgefleet-server: READY=1 once serving, WATCHDOG=1 every second, STOPPING=1 and exit 0 on SIGTERM', async () => {
    const dir = tempDir('edgefleet-proc-sd-');
    const notify = notifyListener(dir);
    const port = await freePort();
    const proc = spawnNode(SERVER, ['--data-dir', join(dir, 'data'), '--port', String(port)], {
      cwd: dir,
      env: { NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '2000000' },
    });
    await expectNotifyLifecycle(proc, notify, new RegExp(`^STATUS=serving on mqtt://127\\.0\\.0\\.1:${port}$`));
  });

  it('edgefleet-agent: READY=1 once started, WATCHDOG=1 every second, STOPPING=1 and exit 0 on SIGTERM', async () => {
    const fleet = await startServer();
    const device = await provision(fleet, 'dev-sd');
    const notify = notifyListener(device.dir);
    const proc = startAgent(device, { NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '2000000' });
    await expectNotifyLifecycle(proc, notify, /^STATUS=running$/);
  });

  it('ignores WATCHDOG_USEC meant for another process (WATCHDOG_PID)', async () => {
    const dir = tempDir('edgefleet-proc-sd-');
    const notify = notifyListener(dir);
    const proc = spawnNode(SERVER, ['--data-dir', join(dir, 'data'), '--port', String(await freePort())], {
      cwd: dir,
      env: { NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '400000', WATCHDOG_PID: '1' },
    });
    await waitFor('READY=1', () => notify.with('READY=1').length > 0 || !proc.running(), 15_000);
    await new Promise((r) => setTimeout(r, 700));
    expect(notify.with('WATCHDOG=1'), proc.output()).toEqual([]);
    proc.child.kill('SIGTERM');
    expect((await exitWithin(proc, 10_000, 'stop on SIGTERM')).code).toBe(EXIT.OK);
  });
});

describe('signals', () => {
  let fleet: Fleet;
  beforeAll(async () => {
    fleet = await startServer();
  });

  it('agent on SIGTERM: exits 0 within a few seconds and the fleet shows it offline', async () => {
    const device = await provision(fleet, 'dev-term');
    const agent = startAgent(device);
    await waitPresence(fleet, 'dev-term', 'online', 15_000, agent);
    const t0 = Date.now();
    agent.child.kill('SIGTERM');
    const exit = await exitWithin(agent, 5000, 'agent stop on SIGTERM');
    expect(exit, agent.output()).toEqual({ code: EXIT.OK, signal: null });
    expect(Date.now() - t0).toBeLessThan(5000);
    // The agent said goodbye itself: no keepalive to wait for.
    await waitPresence(fleet, 'dev-term', 'offline', 3000, agent);
  });

  it('agent on SIGKILL: its Last Will makes the fleet show it offline after the keepalive', async () => {
    const device = await provision(fleet, 'dev-kill');
    const agent = startAgent(device);
    await waitPresence(fleet, 'dev-kill', 'online', 15_000, agent);
    agent.child.kill('SIGKILL');
    expect(await exitWithin(agent, 5000, 'SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });
    // The kernel closes the dead agent's socket, so the broker usually publishes the will at once;
    // a link that merely went silent is given up after 1.5 × keepaliveSec (5) = 7.5 s.
    await waitPresence(fleet, 'dev-kill', 'offline', 12_000, agent);
  });

  it('server on SIGTERM with a connected agent: exits 0 promptly', async () => {
    const own = await startServer();
    const device = await provision(own, 'dev-srv');
    const agent = startAgent(device);
    await waitPresence(own, 'dev-srv', 'online', 15_000, agent);
    const t0 = Date.now();
    own.proc.child.kill('SIGTERM');
    const exit = await exitWithin(own.proc, 5000, 'server stop on SIGTERM with a device connected');
    expect(exit, own.proc.output()).toEqual({ code: EXIT.OK, signal: null });
    expect(Date.now() - t0).toBeLessThan(5000);
    // The agent outlives its broker and keeps retrying; it does not crash.
    await new Promise((r) => setTimeout(r, 300));
    expect(agent.running(), agent.output()).toBe(true);
  });
});

describe('as the systemd units start them (scripts/systemd/)', () => {
  it('server from --config and --data-dir; agent with its password in a credential file and $STATE_DIRECTORY', async () => {
    // edgefleet-server.service: --config ${CONFIGURATION_DIRECTORY}/server.json --data-dir ${STATE_DIRECTORY}
    const etc = tempDir('edgefleet-proc-etc-');
    const serverState = tempDir('edgefleet-proc-var-');
    const port = await freePort();
    writeFileSync(join(etc, 'server.json'), JSON.stringify({ broker: { port } }));
    const server = spawnNode(SERVER, ['--config', join(etc, 'server.json'), '--data-dir', serverState], { cwd: '/' });
    await logged(server, 'fleet server started');
    const fleet: Fleet = { proc: server, dir: etc, dataDir: serverState, port, profile: join(serverState, 'cli.json') };
    expect(existsSync(join(serverState, 'fleet.db'))).toBe(true);

    // edgefleet-agent.service: agent.json without the password, which LoadCredential= puts in
    // $CREDENTIALS_DIRECTORY and Environment= names in EDGEFLEET_AGENT_BROKER_PASSWORD_FILE.
    const device = await provision(fleet, 'dev-unit');
    const added = JSON.parse(readFileSync(device.configFile, 'utf8')) as { broker: { url: string; password: string } };
    const credentials = tempDir('edgefleet-proc-cred-');
    writeFileSync(join(credentials, 'broker-password'), `${added.broker.password}\n`, { mode: 0o400 });
    writeFileSync(join(etc, 'agent.json'), JSON.stringify({ deviceId: 'dev-unit', broker: { url: added.broker.url }, runtimes: { probe: false } }));
    const agentState = tempDir('edgefleet-proc-var-');
    const agent = spawnNode(AGENT, ['--config', join(etc, 'agent.json')], {
      cwd: device.dir,
      env: { EDGEFLEET_AGENT_BROKER_PASSWORD_FILE: join(credentials, 'broker-password'), STATE_DIRECTORY: agentState },
    });
    await waitPresence(fleet, 'dev-unit', 'online', 15_000, agent);
    expect(readdirSync(agentState).length, agent.output()).toBeGreaterThan(0);
    expect(existsSync(join(device.dir, 'agent-state'))).toBe(false);
  });
});

describe.concurrent('invalid configuration', () => {
  it('agent: exit 30, every problem listed at once', async () => {
    const dir = tempDir('edgefleet-proc-cfg-');
    const file = join(dir, 'agent.json');
    writeFileSync(
      file,
      JSON.stringify({ deviceId: 'not a valid id!', stateDir: join(dir, 'state'), broker: { url: 'http://fleet.example', password: 'x' }, colour: 'blue' }),
    );
    const proc = spawnNode(AGENT, ['--config', file], { cwd: dir });
    const exit = await exitWithin(proc, 10_000, 'agent with an invalid config');
    expect(exit.code, proc.output()).toBe(EXIT.AGENT_CONFIG_INVALID);
    const err = proc.stderr();
    expect(err).toContain('invalid configuration');
    expect(err).toMatch(/deviceId:/);
    expect(err).toMatch(/broker\.url:/);
    expect(err).toMatch(/colour/);
  });

  it('server: exit 50, a bad environment override and a bad file setting both listed', async () => {
    const dir = tempDir('edgefleet-proc-cfg-');
    const file = join(dir, 'server.json');
    writeFileSync(file, JSON.stringify({ logLevel: 'loud' }));
    const proc = spawnNode(SERVER, ['--config', file, '--data-dir', join(dir, 'data')], {
      cwd: dir,
      env: { EDGEFLEET_SERVER_BROKER_PORT: 'notanumber' },
    });
    const exit = await exitWithin(proc, 10_000, 'server with an invalid config');
    expect(exit.code, proc.output()).toBe(EXIT.SERVER_CONFIG_INVALID);
    const err = proc.stderr();
    expect(err).toMatch(/broker\.port:/);
    expect(err).toMatch(/logLevel:/);
  });

  it('server: exit 51 when its port is taken, naming the port and how to choose another', async () => {
    const dir = tempDir('edgefleet-proc-port-');
    const port = await freePort();
    const squatter: Server = createServer();
    await new Promise<void>((res) => squatter.listen(port, '127.0.0.1', res));
    onCleanup(() => new Promise<void>((res) => squatter.close(() => res())));
    const proc = spawnNode(SERVER, ['--data-dir', join(dir, 'data'), '--port', String(port)], { cwd: dir });
    const exit = await exitWithin(proc, 15_000, 'server on a taken port');
    expect(exit.code, proc.output()).toBe(EXIT.SERVER_PORT_IN_USE);
    const err = proc.stderr();
    expect(err).toContain(String(port));
    expect(err).toContain('--port <n>');
    expect(err).toContain('EDGEFLEET_SERVER_BROKER_PORT');
  });
});

describe.concurrent('edgefleet CLI', () => {
  let fleet: Fleet;
  let url: string;
  let cwd: string;
  beforeAll(async () => {
    fleet = await startServer();
    url = `mqtt://127.0.0.1:${fleet.port}`;
    // Not the fleet's folder: nothing to find by default, every credential is explicit.
    cwd = tempDir('edgefleet-proc-cli-');
    const r = await cli(['--profile', fleet.profile, 'devices', 'add', 'dev-1'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.OK);
  });

  it('devices list: a table for humans, JSON with --json', async () => {
    const human = await cli(['--profile', fleet.profile, 'devices', 'list'], cwd);
    expect(human.code, human.stderr).toBe(EXIT.OK);
    const [header, ...rows] = human.stdout.trimEnd().split('\n');
    expect(header).toMatch(/^DEVICE\s+PRESENCE\s+LAST SEEN\s+DESIRED\s+REPORTED\s+SYNC\s+TAGS$/);
    expect(rows.some((r) => /^dev-1\s+never\s+never\s/.test(r)), human.stdout).toBe(true);

    const json = await cli(['--profile', fleet.profile, '--json', 'devices', 'list'], cwd);
    expect(json.code, json.stderr).toBe(EXIT.OK);
    const devices = JSON.parse(json.stdout) as { deviceId: string; presence: string }[];
    expect(devices).toContainEqual(expect.objectContaining({ deviceId: 'dev-1', presence: 'never' }));
  });

  it('exit 10 when the broker is unreachable', async () => {
    const nobody = await freePort();
    const r = await cli(['--url', `mqtt://127.0.0.1:${nobody}`, '--user', 'admin', '--password', 'x', '--timeout', '5', 'devices', 'list'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.CLI_BROKER_UNREACHABLE);
    expect(r.stderr).toContain('EF_BROKER_UNREACHABLE');
  });

  it('exit 11 on a wrong password', async () => {
    const r = await cli(['--url', url, '--user', 'admin', '--password', 'wrong', 'devices', 'list'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.CLI_BROKER_REFUSED);
    expect(r.stderr).toContain('EF_BROKER_REFUSED');
  });

  it('exit 12 when a viewer tries to add a device', async () => {
    const added = await cli(['--profile', fleet.profile, '--json', 'operators', 'add', 'v', '--role', 'viewer'], cwd);
    expect(added.code, added.stderr).toBe(EXIT.OK);
    const { credential } = JSON.parse(added.stdout) as { credential: { username: string; password: string; brokerUrl: string } };
    const as = ['--url', credential.brokerUrl, '--user', credential.username, '--password', credential.password];
    // The viewer's credential works: it may look.
    const list = await cli([...as, 'devices', 'list'], cwd);
    expect(list.code, list.stderr).toBe(EXIT.OK);
    const r = await cli([...as, 'devices', 'add', 'x'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.CLI_FORBIDDEN);
    expect(r.stderr).toContain('EF_FORBIDDEN');
  });

  it('exit 13 for a device that does not exist', async () => {
    const r = await cli(['--profile', fleet.profile, 'devices', 'show', 'no-such'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.CLI_NOT_FOUND);
    expect(r.stderr).toContain('EF_UNKNOWN_DEVICE');
  });

  it('exit 14 for a desired-state change that is not JSON', async () => {
    const r = await cli(['--profile', fleet.profile, 'desired', 'set', 'dev-1', 'not json'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.CLI_INVALID);
    expect(r.stderr).toContain('not JSON');
  });

  it('exit 2 for an unknown command, with the usage text', async () => {
    const r = await cli(['--profile', fleet.profile, 'frobnicate'], cwd);
    expect(r.code, r.stderr).toBe(EXIT.USAGE);
    expect(r.stderr).toContain('unknown command: frobnicate');
    expect(r.stderr).toContain('usage: edgefleet');
  });
});
