/**
 * Configuration loading (common/config.ts) with both daemons' schemas: every problem reported at
 * once, environment overrides named after schema paths and coerced to the setting's type, a frozen
 * result, and no throw for anything a file or an environment can hold. `env` is always passed
 * explicitly; process.env is never read or written here.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import type { z } from 'zod';
import { AgentConfig } from '../../agent/config.js';
import { configLeaves, envName, loadConfig, type ConfigResult } from '../../common/config.js';
import { ServerConfig } from '../../fleet-server/config.js';

const dir = mkdtempSync(join(tmpdir(), 'edgefleet-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
function fileWith(content: string): string {
  const f = join(dir, `config-${n++}.json`);
  writeFileSync(f, content);
  return f;
}

const SERVER = { schema: ServerConfig, envPrefix: 'EDGEFLEET_SERVER' } as const;
const AGENT = { schema: AgentConfig, envPrefix: 'EDGEFLEET_AGENT' } as const;
/** Either daemon's, for tests that run over both. */
const BOTH: { name: string; schema: z.ZodType; envPrefix: string }[] = [
  { name: 'ServerConfig', ...SERVER },
  { name: 'AgentConfig', ...AGENT },
];
/** The least an agent needs, given through the environment. */
const AGENT_ENV = { EDGEFLEET_AGENT_DEVICE_ID: 'dev-1', EDGEFLEET_AGENT_BROKER_URL: 'mqtt://127.0.0.1:18830', EDGEFLEET_AGENT_BROKER_PASSWORD: 's3cret' };

function server(opts: { file?: unknown; raw?: string; env?: Record<string, string> } = {}): ConfigResult<ServerConfig> {
  const file = opts.raw !== undefined ? fileWith(opts.raw) : opts.file !== undefined ? fileWith(JSON.stringify(opts.file)) : undefined;
  return loadConfig({ ...SERVER, file, env: opts.env ?? {} });
}
function agent(opts: { file?: unknown; raw?: string; env?: Record<string, string> } = {}): ConfigResult<AgentConfig> {
  const file = opts.raw !== undefined ? fileWith(opts.raw) : opts.file !== undefined ? fileWith(JSON.stringify(opts.file)) : undefined;
  return loadConfig({ ...AGENT, file, env: opts.env ?? {} });
}

function errorsOf<T>(r: ConfigResult<T>): string[] {
  if (r.ok) throw new Error(`expected errors, got a config: ${JSON.stringify(r.config)}`);
  return r.errors;
}
function configOf<T>(r: ConfigResult<T>): Readonly<T> {
  if (!r.ok) throw new Error(`expected a config, got errors: ${r.errors.join(' | ')}`);
  return r.config;
}

function get(obj: unknown, path: readonly string[]): unknown {
  return path.reduce<unknown>((o, k) => (o !== null && typeof o === 'object' ? (o as Record<string, unknown>)[k] : undefined), obj);
}

describe('every problem at once', () => {
  it.each<{ name: string; run: () => ConfigResult<unknown>; paths: string[] }>([
    {
      name: 'server: three bad values',
      run: () => server({ file: { logLevel: 'loud', broker: { port: 70_000, mode: 'sideways' } } }),
      paths: ['logLevel', 'broker.port', 'broker.mode'],
    },
    {
      name: 'server: a bad value, an unknown key and a wrong type',
      run: () => server({ file: { logLevel: 'loud', extra: true, publishPendingIntervalSec: 'often' } }),
      paths: ['logLevel', '(root)', 'publishPendingIntervalSec'],
    },
    {
      name: 'server: a bad value beside a broken cross-field rule (external broker without url)',
      run: () => server({ file: { logLevel: 'loud', broker: { mode: 'external' } } }),
      paths: ['logLevel', 'broker.url'],
    },
    {
      name: 'agent: no device id, a bad broker url and no password',
      run: () => agent({ file: { broker: { url: 'ftp://fleet.example' } } }),
      paths: ['deviceId', 'broker.url', 'broker.password'],
    },
    {
      name: 'agent: a bad env value, a bad file value and an empty setting',
      run: () => agent({ file: { deviceId: 'dev-1', broker: { url: 'mqtt://x', password: 'p', keepaliveSec: 1 } }, env: { EDGEFLEET_AGENT_LOG_LEVEL: 'chatty', EDGEFLEET_AGENT_STATE_DIR: '' } }),
      paths: ['logLevel', 'broker.keepaliveSec', 'stateDir'],
    },
  ])('$name', ({ run, paths }) => {
    const errors = errorsOf(run());
    expect(errors).toHaveLength(paths.length);
    for (const p of paths) expect(errors.some((e) => e.startsWith(`${p}: `))).toBe(true);
  });

  it('an unparsable file is one error beside the schema errors, not a throw', () => {
    const f = fileWith('{"deviceId": "dev-1", ');
    const r = loadConfig({ ...AGENT, file: f, env: { EDGEFLEET_AGENT_LOG_LEVEL: 'chatty' } });
    const errors = errorsOf(r);
    expect(errors[0]).toContain(f);
    expect(errors.slice(1).map((e) => e.split(':')[0]).sort()).toEqual(['broker', 'deviceId', 'logLevel']);
  });

  it.each([
    ['not JSON', 'port = 1884'],
    ['empty', ''],
    ['an array', '[1, 2]'],
    ['a string', '"config"'],
    ['null', 'null'],
  ])('a file holding %s is an error, also when the schema alone would be satisfied', (_name, raw) => {
    const errors = errorsOf(server({ raw }));
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/^\/.*config-\d+\.json: /);
  });

  it('a missing file is an error', () => {
    const errors = errorsOf(loadConfig({ ...SERVER, file: join(dir, 'no-such-file.json'), env: {} }));
    expect(errors).toHaveLength(1);
    expect(errors[0]).toContain('no-such-file.json');
  });

  it('one problem is one error, whatever its message holds', () => {
    const errors = errorsOf(server({ file: { 'a; b': 1 } }));
    expect(errors).toHaveLength(1);
    expect(errors[0]).toContain('a; b');
  });
});

describe('environment overrides', () => {
  it('names variables after schema paths', () => {
    expect(envName('EDGEFLEET_SERVER', ['broker', 'port'])).toBe('EDGEFLEET_SERVER_BROKER_PORT');
    expect(envName('EDGEFLEET_SERVER', ['broker', 'publicUrl'])).toBe('EDGEFLEET_SERVER_BROKER_PUBLIC_URL');
    expect(envName('EDGEFLEET_SERVER', ['broker', 'maxPayloadBytes'])).toBe('EDGEFLEET_SERVER_BROKER_MAX_PAYLOAD_BYTES');
    expect(envName('EDGEFLEET_AGENT', ['deviceId'])).toBe('EDGEFLEET_AGENT_DEVICE_ID');
    for (const { schema, envPrefix } of BOTH) {
      const names = configLeaves(schema, envPrefix).map((l) => l.env);
      expect(new Set(names).size).toBe(names.length);
      for (const name of names) expect(name).toMatch(new RegExp(`^${envPrefix}(_[A-Z0-9]+)+$`));
    }
  });

  it.each([
    ['EDGEFLEET_SERVER_BROKER_PORT', '1884', ['broker', 'port'], 1884],
    ['EDGEFLEET_SERVER_BROKER_PORT', '0', ['broker', 'port'], 0],
    ['EDGEFLEET_SERVER_BROKER_MAX_PAYLOAD_BYTES', '4096', ['broker', 'maxPayloadBytes'], 4096],
    ['EDGEFLEET_SERVER_PUBLISH_PENDING_INTERVAL_SEC', '2.5', ['publishPendingIntervalSec'], 2.5],
    ['EDGEFLEET_SERVER_BROKER_CONNECT_WAIT_SEC', '0', ['broker', 'connectWaitSec'], 0],
    ['EDGEFLEET_SERVER_LOG_LEVEL', 'debug', ['logLevel'], 'debug'],
    ['EDGEFLEET_SERVER_BROKER_MODE', 'external', ['broker', 'mode'], 'external'],
    ['EDGEFLEET_SERVER_BROKER_PUBLIC_URL', 'mqtts://fleet.example:8883', ['broker', 'publicUrl'], 'mqtts://fleet.example:8883'],
    ['EDGEFLEET_SERVER_BROKER_PROTOCOL_VERSION', '5', ['broker', 'protocolVersion'], 5],
    ['EDGEFLEET_SERVER_CONFIG_VERSION', '1', ['configVersion'], 1],
  ] as const)('server: %s=%s sets %j', (name, value, path, expected) => {
    const env: Record<string, string> = { [name]: value };
    if (name === 'EDGEFLEET_SERVER_BROKER_MODE') env.EDGEFLEET_SERVER_BROKER_URL = 'mqtt://broker.example:1883';
    const config = configOf(server({ env }));
    expect(get(config, path)).toBe(expected);
  });

  it.each([
    ['EDGEFLEET_AGENT_RUNTIMES_PROBE', 'false', ['runtimes', 'probe'], false],
    ['EDGEFLEET_AGENT_RUNTIMES_PROBE', '0', ['runtimes', 'probe'], false],
    ['EDGEFLEET_AGENT_RUNTIMES_PROBE', 'true', ['runtimes', 'probe'], true],
    ['EDGEFLEET_AGENT_RUNTIMES_PROBE', '1', ['runtimes', 'probe'], true],
    ['EDGEFLEET_AGENT_BROKER_KEEPALIVE_SEC', '60', ['broker', 'keepaliveSec'], 60],
    ['EDGEFLEET_AGENT_BROKER_RECONNECT_BASE_MS', '250', ['broker', 'reconnectBaseMs'], 250],
    ['EDGEFLEET_AGENT_SHUTDOWN_TIMEOUT_SEC', '1.5', ['shutdownTimeoutSec'], 1.5],
    ['EDGEFLEET_AGENT_BROKER_PASSWORD_FILE', '/run/credentials/edgefleet/password', ['broker', 'passwordFile'], '/run/credentials/edgefleet/password'],
    ['EDGEFLEET_AGENT_BROKER_PROTOCOL_VERSION', '5', ['broker', 'protocolVersion'], 5],
    ['EDGEFLEET_AGENT_CONFIG_VERSION', '1', ['configVersion'], 1],
  ] as const)('agent: %s=%s sets %j', (name, value, path, expected) => {
    const config = configOf(agent({ env: { ...AGENT_ENV, [name]: value } }));
    expect(get(config, path)).toBe(expected);
  });

  it('every setting can be given through its variable (the value it already has round-trips)', () => {
    for (const { schema, envPrefix, name } of BOTH) {
      const base = name === 'AgentConfig' ? AGENT_ENV : {};
      const reference = configOf(loadConfig({ schema, envPrefix, env: base }));
      for (const leaf of configLeaves(schema, envPrefix)) {
        const value = get(reference, leaf.path);
        if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') continue;
        const r = loadConfig({ schema, envPrefix, env: { ...base, [leaf.env]: String(value) } });
        expect(r.ok ? get(r.config, leaf.path) : r.errors, leaf.env).toBe(value);
      }
    }
  });

  it('the environment wins over the file, and only for the setting it names', () => {
    const config = configOf(server({ file: { logLevel: 'warn', broker: { port: 1000, host: '0.0.0.0' } }, env: { EDGEFLEET_SERVER_BROKER_PORT: '2000' } }));
    expect(config.broker.port).toBe(2000);
    expect(config.broker.host).toBe('0.0.0.0');
    expect(config.logLevel).toBe('warn');
  });

  it('an environment value that is no number or boolean is an error about that setting, not a default', () => {
    for (const bad of ['', ' ', 'abc', '12abc', 'NaN', '1884.5']) {
      const errors = errorsOf(server({ env: { EDGEFLEET_SERVER_BROKER_PORT: bad } }));
      expect(errors).toHaveLength(1);
      expect(errors[0]).toMatch(/^broker\.port: /);
    }
    const errors = errorsOf(agent({ env: { ...AGENT_ENV, EDGEFLEET_AGENT_RUNTIMES_PROBE: 'yes' } }));
    expect(errors).toEqual([expect.stringMatching(/^runtimes\.probe: /)]);
  });

  it('ignores variables of the other daemon and unknown ones', () => {
    const config = configOf(server({ env: { EDGEFLEET_AGENT_LOG_LEVEL: 'trace', EDGEFLEET_SERVER_NOPE: 'x', EDGEFLEET_SERVER_BROKER: '{}' } }));
    expect(config.logLevel).toBe('info');
  });
});

describe('the result', () => {
  it('is deeply frozen', () => {
    const config = configOf(agent({ env: AGENT_ENV }));
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.broker)).toBe(true);
    expect(Object.isFrozen(config.runtimes)).toBe(true);
    expect(() => {
      (config.broker as { url: string }).url = 'mqtt://evil';
    }).toThrow(TypeError);
    expect(config.broker.url).toBe(AGENT_ENV.EDGEFLEET_AGENT_BROKER_URL);
  });

  it('holds the defaults of every setting left out', () => {
    const config = configOf(server());
    expect(config).toEqual(ServerConfig.parse({}));
    expect(config.broker.port).toBe(18_830);
  });
});

// ---------------------------------------------------------------------------------------------
// Property: nothing a file or the environment holds makes loadConfig throw
// ---------------------------------------------------------------------------------------------

const tricky = fc.constantFrom('a; b', '__proto__', 'constructor', 'broker', 'port', '', 'toString', ';', ': ');
const settingKey = (schema: z.ZodType): fc.Arbitrary<string> => fc.constantFrom(...new Set(configLeaves(schema, 'X').flatMap((l) => l.path)));
const envValue = fc.oneof(
  fc.string(),
  fc.string({ unit: 'binary', maxLength: 20 }),
  fc.constantFrom('', ' ', '0', '1', '-1', '5', '4', 'true', 'false', 'NaN', 'Infinity', '1e400', '{}', '[]', 'null', 'info', 'external', 'mqtt://x'),
  fc.integer().map(String),
  fc.double().map(String),
);

function fileArb(schema: z.ZodType): fc.Arbitrary<string> {
  const k = fc.oneof(settingKey(schema), tricky, fc.string({ maxLength: 6 }));
  const v = fc.oneof(fc.jsonValue({ maxDepth: 2 }), envValue, fc.integer({ min: -1, max: 70_000 }), fc.boolean());
  const shaped = fc.dictionary(k, fc.oneof(v, fc.dictionary(k, v, { maxKeys: 4 })), { maxKeys: 6 }).map((o) => JSON.stringify(o));
  return fc.oneof(fc.json({ maxDepth: 3 }), shaped, fc.string(), fc.string({ unit: 'binary', maxLength: 40 }));
}

function envArb(schema: z.ZodType, prefix: string): fc.Arbitrary<Record<string, string>> {
  const names = configLeaves(schema, prefix).map((l) => l.env);
  return fc.dictionary(fc.oneof(fc.constantFrom(...names), fc.string({ maxLength: 8 }).map((s) => `${prefix}_${s}`)), envValue, { maxKeys: 6 });
}

describe.each(BOTH)('loadConfig with $name', (opts) => {
  const schema = opts.schema;
  it('never throws for arbitrary file contents and environment strings, and answers per its contract', () => {
    fc.assert(
      fc.property(fileArb(schema), envArb(schema, opts.envPrefix), fc.boolean(), (content, env, withFile) => {
        const file = withFile ? fileWith(content) : undefined;
        let r: ConfigResult<unknown> | undefined;
        expect(() => (r = loadConfig({ schema, file, env, envPrefix: opts.envPrefix }))).not.toThrow();
        const res = r as ConfigResult<unknown>;
        if (res.ok) {
          expect(Object.isFrozen(res.config)).toBe(true);
          expect(schema.safeParse(res.config).success).toBe(true);
        } else {
          expect(res.errors.length).toBeGreaterThan(0);
          // One line per problem, each naming its file or its setting.
          for (const e of res.errors) {
            if (file !== undefined && e.startsWith(`${file}: `)) continue;
            expect(e).toMatch(/^(\(root\)|[A-Za-z0-9]+(\.[A-Za-z0-9]+)*): \S/);
          }
        }
      }),
      { numRuns: 400 },
    );
  });
});
