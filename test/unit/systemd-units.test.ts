/**
 * The systemd units in scripts/systemd/ against the code they start: the binaries exist in
 * package.json "bin", the flags exist in the daemons' usage, the environment variables name real
 * settings, and stop timeouts outlast the agent's own. `systemd-analyze verify` runs when installed.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { configLeaves } from '../../common/config.js';
import { AgentConfig } from '../../agent/config.js';
import { ServerConfig } from '../../fleet-server/config.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const UNIT_DIR = join(ROOT, 'scripts/systemd');
const bin = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin;

type Unit = Record<string, Record<string, string[]>>;

/** systemd's INI dialect, as far as these units use it: sections, comments, repeated keys, `\` continuations. */
function parseUnit(text: string): Unit {
  const unit: Unit = {};
  let section: Record<string, string[]> | null = null;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    let line = (lines[i] ?? '').trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    while (line.endsWith('\\') && i + 1 < lines.length) line = `${line.slice(0, -1)} ${(lines[++i] ?? '').trim()}`;
    const header = /^\[([^\]]+)\]$/.exec(line);
    if (header) {
      section = unit[header[1] as string] ??= {};
      continue;
    }
    const eq = line.indexOf('=');
    if (eq <= 0 || section === null) throw new Error(`line ${i + 1}: not "key=value" inside a section: ${line}`);
    (section[line.slice(0, eq).trim()] ??= []).push(line.slice(eq + 1).trim());
  }
  return unit;
}

/** The value of a key set exactly once. */
function one(unit: Unit, section: string, key: string): string {
  const values = unit[section]?.[key] ?? [];
  expect(values, `[${section}] ${key}`).toHaveLength(1);
  return values[0] as string;
}

/** systemd time span, in seconds: "30", "30s", "1min", "1min 30s". */
function seconds(span: string): number {
  const units: Record<string, number> = { '': 1, s: 1, sec: 1, m: 60, min: 60, h: 3600 };
  let total = 0;
  for (const part of span.split(/\s+/)) {
    const m = /^(\d+(?:\.\d+)?)([a-z]*)$/.exec(part);
    const factor = m ? units[m[2] as string] : undefined;
    if (!m || factor === undefined) throw new Error(`not a time span: ${span}`);
    total += Number(m[1]) * factor;
  }
  return total;
}

const UNITS = [
  { file: 'edgefleet-server.service', binary: 'edgefleet-server', stateDirectory: 'edgefleet', schema: ServerConfig, envPrefix: 'EDGEFLEET_SERVER' },
  { file: 'edgefleet-agent.service', binary: 'edgefleet-agent', stateDirectory: 'edgefleet-agent', schema: AgentConfig, envPrefix: 'EDGEFLEET_AGENT' },
] as const;

describe('parseUnit', () => {
  it('reads sections, repeated keys and continuations, and refuses stray lines', () => {
    const u = parseUnit('# c\n[Service]\nA=1\nA=2\nExecStart=/bin/x \\\n  --y\n; c\n');
    expect(u).toEqual({ Service: { A: ['1', '2'], ExecStart: ['/bin/x  --y'] } });
    expect(() => parseUnit('A=1\n')).toThrow(/inside a section/);
    expect(() => parseUnit('[S]\njunk\n')).toThrow(/key=value/);
  });
});

describe.each(UNITS)('$file', ({ file, binary, stateDirectory, schema, envPrefix }) => {
  const path = join(UNIT_DIR, file);
  const unit = parseUnit(readFileSync(path, 'utf8'));
  const exec = one(unit, 'Service', 'ExecStart').split(/\s+/);

  it('is a notify service with a watchdog, restarted on failure, stopped gently', () => {
    expect(one(unit, 'Service', 'Type')).toBe('notify');
    // all: the systemd-notify fallback (no unix-dgram) sends from a child process.
    expect(one(unit, 'Service', 'NotifyAccess')).toBe('all');
    expect(seconds(one(unit, 'Service', 'WatchdogSec'))).toBeGreaterThan(0);
    expect(one(unit, 'Service', 'Restart')).toBe('on-failure');
    expect(seconds(one(unit, 'Service', 'RestartSec'))).toBeGreaterThan(0);
    expect(one(unit, 'Service', 'KillMode')).toBe('mixed');
    expect(unit.Install?.WantedBy).toEqual(['multi-user.target']);
  });

  it('runs as the edgefleet user with its state and configuration directories, hardened', () => {
    expect(one(unit, 'Service', 'User')).toBe('edgefleet');
    expect(one(unit, 'Service', 'DynamicUser')).toBe('no');
    expect(one(unit, 'Service', 'StateDirectory')).toBe(stateDirectory);
    expect(one(unit, 'Service', 'ConfigurationDirectory')).toBe('edgefleet');
    expect(one(unit, 'Service', 'NoNewPrivileges')).toBe('yes');
    expect(one(unit, 'Service', 'ProtectSystem')).toBe('strict');
    expect(one(unit, 'Service', 'ProtectHome')).toBe('yes');
    expect(one(unit, 'Service', 'PrivateTmp')).toBe('yes');
  });

  it('starts a binary from package.json "bin" with flags it understands', () => {
    expect(exec[0]).toBe('/usr/bin/env');
    expect(exec[1]).toBe(binary);
    expect(Object.keys(bin)).toContain(exec[1]);
    expect(exec.slice(2, 4)).toEqual(['--config', '${CONFIGURATION_DIRECTORY}/' + (binary === 'edgefleet-server' ? 'server.json' : 'agent.json')]);
    const flags = exec.filter((a) => a.startsWith('--'));
    const usage = execFileSync(process.execPath, [join(ROOT, bin[binary] as string), '--help'], { encoding: 'utf8' });
    for (const flag of flags) expect(usage, `${binary} --help`).toContain(`[${flag} `);
  });

  it('sets only environment variables that name settings', () => {
    const known = new Set(configLeaves(schema, envPrefix).map((l) => l.env));
    for (const assignment of unit.Service?.Environment ?? []) {
      const name = assignment.split('=')[0] as string;
      expect(known, `${file}: Environment=${assignment}`).toContain(name);
    }
  });

  it.skipIf(spawnSync('systemd-analyze', ['--version'], { stdio: 'ignore' }).error !== undefined)('passes systemd-analyze verify', () => {
    const r = spawnSync('systemd-analyze', ['verify', path], { encoding: 'utf8' });
    // Unknown keys and bad values are only warnings (exit 0): any line about our unit fails the test.
    const ours = `${r.stdout}${r.stderr}`.split('\n').filter((l) => l.includes(file));
    expect(ours).toEqual([]);
    expect(r.status, r.stderr).toBe(0);
  });
});

describe('the server unit', () => {
  const unit = parseUnit(readFileSync(join(UNIT_DIR, 'edgefleet-server.service'), 'utf8'));

  it('keeps its data in the state directory (the server does not read $STATE_DIRECTORY itself)', () => {
    const exec = one(unit, 'Service', 'ExecStart').split(/\s+/);
    expect(exec[exec.indexOf('--data-dir') + 1]).toBe('${STATE_DIRECTORY}');
  });

  it('does not restart on an invalid configuration', () => {
    expect(one(unit, 'Service', 'RestartPreventExitStatus').split(/\s+/)).toContain('50');
  });
});

describe('the agent unit', () => {
  const unit = parseUnit(readFileSync(join(UNIT_DIR, 'edgefleet-agent.service'), 'utf8'));

  it('hands the broker password over as a credential, read through broker.passwordFile', () => {
    const [id, source] = one(unit, 'Service', 'LoadCredential').split(':');
    expect(id).toMatch(/^[A-Za-z0-9_.-]+$/);
    expect(source).toMatch(/^\/etc\/edgefleet\//);
    const passwordFileEnv = configLeaves(AgentConfig, 'EDGEFLEET_AGENT').find((l) => l.path.join('.') === 'broker.passwordFile')?.env;
    expect(unit.Service?.Environment).toContain(`${passwordFileEnv}=%d/${id}`);
  });

  it('gives a graceful stop longer than the agent allows itself', () => {
    const own = AgentConfig.parse({ deviceId: 'd', broker: { url: 'mqtt://x', password: 'p' } }).shutdownTimeoutSec;
    expect(seconds(one(unit, 'Service', 'TimeoutStopSec'))).toBeGreaterThan(own);
  });

  it('does not restart on an invalid configuration', () => {
    expect(one(unit, 'Service', 'RestartPreventExitStatus').split(/\s+/)).toContain('30');
  });
});
