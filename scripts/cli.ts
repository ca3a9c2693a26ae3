#!/usr/bin/env node
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { userInfo } from 'node:os';
import { parseArgs } from 'node:util';
import { ERRORS, EXIT, EdgefleetError, RECORD_CLASSES, ROLES, isEdgefleetError, type ErrorCode, type JsonPatch, type ModelSlotReport, type RecordClass, type Role } from '../proto/index.js';
import { writeFileAtomic } from '../common/files.js';
import { VERSION } from '../common/version.js';
import { OpsClient } from './ops-client.js';
import { resolveProfile } from './cli/profile.js';
import { ago, bytes, table, time } from './cli/format.js';
import { MODEL_USAGE, runKeyCommand, runModelCommand, type CommandContext, type ModelFlags } from './cli/model.js';
import { DELTA_USAGE, runDeltaCommand, type DeltaFlags } from './cli/delta.js';
import { WATCH_EXIT } from './cli/rollout-view.js';
import { ROLLOUT_USAGE, runDevicesTag, runRolloutCommand, runSafeModeCommand, tagFlag, tagsCell, type RolloutFlags } from './cli/rollout.js';
import { FL_USAGE, runFlCommand, type FlFlags } from './cli/fl.js';
import { WATCH_EXIT as FL_WATCH_EXIT } from './cli/fl-view.js';

const USAGE = `edgefleet ${VERSION}: operator CLI

usage: edgefleet [options] <command>

commands:
  devices list                         every device, its presence, sync state and tags
  devices show <id>                    one device: facts, desired and reported state, drift
  devices add <id> [--tag a,b] [--out <file>]
                                       provision a device; prints (or writes) its agent config
  devices tag <id>[,<id>...] [--add a,b] [--remove c]
                                       change devices' tags (rollouts and safe mode select by them)
  devices remove <id>                  revoke a device's credential and forget it
  desired get <id>                     the device's desired-state document and version
  desired set <id> <patch|doc|file>    change it: a JSON Patch array, or a whole document
                                       (inline JSON or a file); --base-version <n> guards races
  audit [--limit <n>] [--target <id>]  the operator audit log, newest first
  operators list | add <name> --role <viewer|operator|admin> | remove <name>
  telemetry <id> [--limit <n>] [--class <c>]  recent telemetry of a device, newest first
  stats                                fleet counters: devices, online, in sync, rejected messages
${MODEL_USAGE}
${DELTA_USAGE}
${ROLLOUT_USAGE}
${FL_USAGE}
  broker-config mosquitto --out <dir> [--data-dir <dir>] [--port <n>] [--url <mqtt-url>] [--run-as <user>]
                                       password file, ACL and mosquitto.conf for an external broker;
                                       Mosquitto runs as --run-as (default: whoever runs this command)

options:
  --json                 machine-readable output
  --profile <file>       credentials file (default: ./data/cli.json)
  --url, --user, --password   broker and operator credential (or EDGEFLEET_URL/_USER/_PASSWORD)
  --artifacts-url <url>  the fleet's artifact server (or EDGEFLEET_ARTIFACTS_URL; the profile has it)
  --timeout <sec>        how long to wait for the fleet (default 10)

exit codes: 0 ok, 2 usage, 10 broker unreachable, 11 credentials refused, 12 forbidden,
            13 not found, 14 invalid input, 15 timeout, 16 server error, 17 no credentials;
            rollout watch: ${WATCH_EXIT.failed} halted or aborted, ${WATCH_EXIT.interrupted} interrupted (Ctrl-C);
            fl start/watch: ${FL_WATCH_EXIT.failed} round failed or aborted, ${FL_WATCH_EXIT.interrupted} interrupted (Ctrl-C)`;

type Flags = ModelFlags &
  DeltaFlags &
  RolloutFlags &
  FlFlags & {
  json?: boolean;
  'artifacts-url'?: string;
  profile?: string;
  url?: string;
  user?: string;
  password?: string;
  timeout?: string;
  out?: string;
  role?: string;
  limit?: string;
  target?: string;
  class?: string;
  'base-version'?: string;
  'data-dir'?: string;
  'run-as'?: string;
  port?: string;
  help?: boolean;
};

class UsageError extends Error {}

const EXIT_FOR: Partial<Record<ErrorCode, number>> = {
  EF_BROKER_UNREACHABLE: EXIT.CLI_BROKER_UNREACHABLE,
  EF_BROKER_REFUSED: EXIT.CLI_BROKER_REFUSED,
  EF_FORBIDDEN: EXIT.CLI_FORBIDDEN,
  EF_UNKNOWN_DEVICE: EXIT.CLI_NOT_FOUND,
  EF_UNKNOWN_OPERATOR: EXIT.CLI_NOT_FOUND,
  EF_UNKNOWN_METHOD: EXIT.CLI_INVALID,
  EF_BAD_PARAMS: EXIT.CLI_INVALID,
  EF_BAD_PAYLOAD: EXIT.CLI_INVALID,
  EF_PATCH_FAILED: EXIT.CLI_INVALID,
  EF_DELTA_CORRUPT: EXIT.CLI_INVALID,
  EF_DELTA_TRUNCATED: EXIT.CLI_INVALID,
  EF_DELTA_TOO_LARGE: EXIT.CLI_INVALID,
  EF_DELTA_WRONG_BASE: EXIT.CLI_INVALID,
  EF_DELTA_UNSUPPORTED: EXIT.CLI_INVALID,
  EF_DELTA_TARGET_MISMATCH: EXIT.CLI_INVALID,
  EF_DESIRED_INVALID: EXIT.CLI_INVALID,
  EF_VERSION_CONFLICT: EXIT.CLI_INVALID,
  EF_DEVICE_EXISTS: EXIT.CLI_INVALID,
  EF_OPERATOR_EXISTS: EXIT.CLI_INVALID,
  EF_TIMEOUT: EXIT.CLI_TIMEOUT,
  EF_CONFIG_INVALID: EXIT.CLI_NO_CREDENTIALS,
  EF_UNKNOWN_MODEL: EXIT.CLI_NOT_FOUND,
  EF_MODEL_EXISTS: EXIT.CLI_INVALID,
  EF_MODEL_INVALID: EXIT.CLI_INVALID,
  EF_MODEL_EXPIRED: EXIT.CLI_INVALID,
  EF_STATUS_TRANSITION: EXIT.CLI_INVALID,
  EF_ARTIFACT_MISSING: EXIT.CLI_INVALID,
  EF_ARTIFACT_MISMATCH: EXIT.CLI_INVALID,
  EF_ARTIFACT_TOO_LARGE: EXIT.CLI_INVALID,
  EF_ARTIFACT_REFUSED: EXIT.CLI_INVALID,
  EF_GOLDEN_MISMATCH: EXIT.CLI_INVALID,
  EF_RUNTIME_FAILED: EXIT.CLI_INVALID,
  EF_INFER_INVALID: EXIT.CLI_INVALID,
  EF_PLAN_INVALID: EXIT.CLI_INVALID,
  EF_UNKNOWN_ROLLOUT: EXIT.CLI_NOT_FOUND,
  // Refusals because of state, like EF_VERSION_CONFLICT: the request is not acceptable now.
  EF_ROLLOUT_CONFLICT: EXIT.CLI_INVALID,
  EF_SAFE_MODE: EXIT.CLI_INVALID,
  EF_UNKNOWN_ROUND: EXIT.CLI_NOT_FOUND,
  EF_ROUND_CONFLICT: EXIT.CLI_INVALID,
};

function out(flags: Flags, data: unknown, human: () => string): void {
  process.stdout.write((flags.json ? JSON.stringify(data, null, 2) : human()) + '\n');
}

/** A JSON argument: inline JSON, or the path of a file holding it. */
function jsonArg(arg: string): unknown {
  const text = existsSync(arg) ? readFileSync(arg, 'utf8') : arg;
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new EdgefleetError('EF_BAD_PARAMS', `not JSON (nor a readable file): ${(e as Error).message}`);
  }
}

async function withClient<T>(flags: Flags, fn: (c: OpsClient) => Promise<T>, defaultTimeoutSec = 10): Promise<T> {
  const profile = resolveProfile(flags);
  const timeoutSec = flags.timeout === undefined ? defaultTimeoutSec : Number(flags.timeout);
  if (!Number.isFinite(timeoutSec) || timeoutSec <= 0) throw new UsageError('--timeout takes a positive number of seconds');
  const client = await OpsClient.connect({ ...profile, timeoutMs: timeoutSec * 1000 });
  try {
    return await fn(client);
  } finally {
    await client.close();
  }
}

/** A device's model slot, as `devices show` prints it: what serves, what it keeps, what failed and why. */
function modelLines(name: string, m: ModelSlotReport, desired: number | null): string[] {
  const lines = [
    `model       ${name}: serving ${m.active === null ? 'nothing' : `version ${m.active}`} (${m.state}) · desired ${desired ?? '-'}`,
    `            stable ${m.history.join(', ') || '-'} · failed here ${m.failed.join(', ') || '-'} · fallback ${m.fallback ?? '-'}`,
  ];
  if (m.samples !== undefined) lines.push(`            ${m.samples} labelled sample${m.samples === 1 ? '' : 's'} held for federated rounds`);
  const p = m.personalized;
  if (p) {
    const fig = (own: number | null, global: number | null, loss: number, gloss: number): string =>
      own !== null && global !== null ? `accuracy ${(own * 100).toFixed(1)}% vs ${(global * 100).toFixed(1)}% global` : `loss ${loss.toFixed(4)} vs ${gloss.toFixed(4)} global`;
    lines.push(`            personalized: own ${p.layers.join(', ')} over version ${p.version} · ${fig(p.accuracy, p.globalAccuracy, p.loss, p.globalLoss)} on ${p.holdoutCount} holdout rows`);
  }
  const t = m.transfer;
  if (t) {
    const kib = (n: number): string => `${(n / 1024).toFixed(1)} KiB`;
    lines.push(
      `            last download: version ${t.version}, ${kib(t.downloadedBytes)} received, ${kib(t.savedBytes)} saved by ${t.patchedFiles} patch(es), ${t.fullFiles} whole file(s)${t.fallbacks > 0 ? `, ${t.fallbacks} fallback(s)` : ''}`,
    );
  }
  const v = m.lastVerdict as { version?: number; ok?: boolean; code?: string; reason?: string; failures?: { check: string; value: number; limit: number }[] } | null;
  if (v) {
    const why = v.failures?.length ? v.failures.map((f) => `${f.check} ${f.value}, limit ${f.limit}`).join(', ') : (v.code ?? v.reason ?? '');
    lines.push(`            last verdict: version ${v.version ?? '?'} ${v.ok ? 'committed' : `refused (${why})`}`);
  }
  return lines;
}

function need(arg: string | undefined, what: string): string {
  if (arg === undefined) throw new UsageError(`missing ${what}`);
  return arg;
}

/** What the command groups in scripts/cli/ borrow from here. */
function commandContext(flags: Flags): CommandContext & { flags: Flags } {
  return {
    flags,
    withClient: (fn, defaultTimeoutSec) => withClient(flags, fn, defaultTimeoutSec),
    out: (data, human) => out(flags, data, human),
    usage: (message) => new UsageError(message),
    profile: () => resolveProfile(flags),
  };
}

/** Runs a command; a number is its exit code when it is not simply success (`rollout watch`). */
async function run(cmd: string[], flags: Flags): Promise<number | void> {
  const [group, verb, a1, a2] = cmd;
  const key = `${group ?? ''} ${verb ?? ''}`.trim();
  if (group === 'delta') return runDeltaCommand({ flags, out: (data, human) => out(flags, data, human), usage: (message) => new UsageError(message) }, cmd.slice(1));
  if (group === 'model') return runModelCommand(commandContext(flags), cmd.slice(1));
  if (group === 'key') return runKeyCommand(commandContext(flags), cmd.slice(1));
  if (group === 'rollout') return runRolloutCommand(commandContext(flags), cmd.slice(1));
  if (group === 'fl') return runFlCommand(commandContext(flags), cmd.slice(1));
  if (group === 'safe-mode') return runSafeModeCommand(commandContext(flags), cmd.slice(1));
  if (key === 'devices tag') return runDevicesTag(commandContext(flags), cmd.slice(2));
  switch (group === 'audit' || group === 'stats' || group === 'telemetry' ? group : key) {
    case 'devices list':
      return withClient(flags, async (c) => {
        const { devices } = await c.call('devices.list', {});
        out(flags, devices, () =>
          devices.length === 0
            ? 'no devices yet: add one with `edgefleet devices add <id>`'
            : table(
                ['DEVICE', 'PRESENCE', 'LAST SEEN', 'DESIRED', 'REPORTED', 'SYNC', 'TAGS'],
                devices.map((d) => [
                  d.deviceId,
                  d.presence,
                  ago(d.lastSeen),
                  d.desiredVersion,
                  d.reportedVersion,
                  `${d.inSync ? 'in sync' : 'pending'}${d.safeMode ? ' (safe mode)' : ''}`,
                  tagsCell(d.tags),
                ]),
              ),
        );
      });
    case 'devices show':
      return withClient(flags, async (c) => {
        const d = await c.call('devices.show', { deviceId: need(a1, 'device id') });
        out(flags, d, () => {
          const f = d.facts;
          const lines = [
            `device      ${d.deviceId}`,
            `presence    ${d.presence} (last seen ${ago(d.lastSeen)})`,
            `tags        ${d.tags.join(', ') || 'none'}`,
            ...(d.safeMode ? ['safe mode   on: its models run their pinned fallbacks (edgefleet safe-mode status)'] : []),
            `desired     version ${d.desiredVersion}`,
            `reported    ${d.reportedVersion === null ? 'nothing yet' : `version ${d.reportedVersion}`} · ${d.inSync ? 'in sync' : 'not in sync'}`,
            `rejected    ${d.rejectedMessages} malformed messages`,
          ];
          if (f) {
            lines.push(
              `board       ${[f.board.manufacturer, f.board.model].filter(Boolean).join(' ') || 'unknown'}`,
              `os          ${f.os.distro} ${f.os.release} (${f.os.arch}, kernel ${f.os.kernel})`,
              `cpu         ${f.cpu.brand} × ${f.cpu.cores}`,
              `memory      ${bytes(f.memory.availableBytes)} free of ${bytes(f.memory.totalBytes)}`,
              `temperature ${f.temperatureC === null ? 'no sensor' : `${f.temperatureC.toFixed(1)} °C`}`,
              `agent       ${f.agentVersion} on node ${f.node}; onnxruntime ${f.runtimes.onnxruntime ?? '-'}, tfjs ${f.runtimes.tfjsBackend ?? '-'}`,
            );
          }
          const t = d.telemetry;
          if (t) {
            const dropped = Object.entries(t.backlog.dropped).map(([c, n]) => `${n} ${c}`);
            lines.push(
              `telemetry   last sequence ${t.lastSeq} · ${t.received} received, ${t.duplicates} duplicates dropped (as of ${ago(t.reportedAt)})`,
              `outbox      ${t.backlog.records} records (${bytes(t.backlog.bytes)}) not yet delivered` +
                (t.backlog.oldestAgeSec === null ? '' : `, oldest ${Math.round(t.backlog.oldestAgeSec)} s old`) +
                ` · dropped to stay in bounds: ${dropped.length > 0 ? dropped.join(', ') : 'none'}`,
            );
          } else lines.push('telemetry   nothing received yet');
          for (const [name, m] of Object.entries(d.reported?.models ?? {})) lines.push(...modelLines(name, m, d.desired.models[name]?.version ?? null));
          if (d.drift.length > 0) lines.push('drift (reported → desired):', ...d.drift.map((op) => `  ${JSON.stringify(op)}`));
          return lines.join('\n');
        });
      });
    case 'devices add': {
      const deviceId = need(a1, 'device id');
      const tags = tagFlag(commandContext(flags));
      return withClient(flags, async (c) => {
        const r = await c.call('devices.add', { deviceId, ...(tags === undefined ? {} : { tags }) });
        // Where the device downloads models and which key signs them; absent from a fleet without a registry.
        const models = await c.call('models.provisioning', {}).catch(() => undefined);
        const agentConfig = { deviceId, broker: { url: r.credential.brokerUrl, password: r.credential.password }, ...(models ? { models } : {}) };
        if (flags.out) writeFileAtomic(flags.out, JSON.stringify(agentConfig, null, 2) + '\n', 0o600);
        out(flags, flags.out ? { deviceId, configFile: resolve(flags.out) } : { ...r, agentConfig }, () =>
          flags.out
            ? `added ${deviceId}; agent config written to ${flags.out} (keep it secret: it holds the device's password)`
            : `added ${deviceId}. Its agent config (shown once; the fleet keeps only a hash):\n${JSON.stringify(agentConfig, null, 2)}`,
        );
      });
    }
    case 'devices remove':
      return withClient(flags, async (c) => {
        const r = await c.call('devices.remove', { deviceId: need(a1, 'device id') });
        out(flags, r, () => `removed ${r.deviceId}; its credential no longer works`);
      });
    case 'desired get':
      return withClient(flags, async (c) => {
        const r = await c.call('desired.get', { deviceId: need(a1, 'device id') });
        out(flags, r, () => `version ${r.version}\n${JSON.stringify(r.doc, null, 2)}`);
      });
    case 'desired set':
      return withClient(flags, async (c) => {
        const deviceId = need(a1, 'device id');
        const value = jsonArg(need(a2, 'a JSON Patch, a document, or a file holding one'));
        const baseVersion = flags['base-version'] === undefined ? undefined : Number(flags['base-version']);
        const r = await c.call('desired.set', Array.isArray(value) ? { deviceId, patch: value as JsonPatch, baseVersion } : { deviceId, doc: value, baseVersion });
        out(flags, r, () => (r.changed ? `desired state of ${deviceId} is now version ${r.version}` : `no change: ${deviceId} stays at version ${r.version}`));
      });
    case 'audit':
      return withClient(flags, async (c) => {
        const limit = flags.limit === undefined ? 50 : Number(flags.limit);
        const { entries } = await c.call('audit.list', { limit, ...(flags.target ? { target: flags.target } : {}) });
        out(flags, entries, () =>
          table(
            ['#', 'TIME', 'ACTOR', 'ACTION', 'TARGET', 'RESULT'],
            entries.map((e) => [e.seq, time(e.ts), e.actor, e.action, e.target, e.ok ? 'ok' : `refused ${(e.detail as { code?: string } | null)?.code ?? ''}`]),
          ),
        );
      });
    case 'telemetry':
      return withClient(flags, async (c) => {
        const deviceId = need(verb, 'device id');
        const cls = flags.class as RecordClass | undefined;
        if (cls !== undefined && !RECORD_CLASSES.includes(cls)) throw new UsageError(`--class is one of ${RECORD_CLASSES.join(', ')}`);
        const limit = flags.limit === undefined ? 50 : Number(flags.limit);
        const { records } = await c.call('telemetry.list', { deviceId, limit, ...(cls ? { cls } : {}) });
        out(flags, records, () =>
          records.length === 0
            ? `no telemetry from ${deviceId} yet`
            : table(
                ['SEQ', 'CREATED', 'CLASS', 'TYPE', 'BODY'],
                records.map((r) => [r.seq, time(r.ts), r.cls, r.type, JSON.stringify(r.body).slice(0, 80)]),
              ),
        );
      });
    case 'stats':
      return withClient(flags, async (c) => {
        const s = await c.call('fleet.stats', {});
        out(flags, s, () =>
          [`devices  ${s.devices}`, `online   ${s.online}`, `in sync  ${s.inSync}`, `rejected ${JSON.stringify(s.rejected)}`].join('\n'),
        );
      });
    case 'operators list':
      return withClient(flags, async (c) => {
        const { operators } = await c.call('operators.list', {});
        out(flags, operators, () => table(['OPERATOR', 'ROLE', 'CREATED'], operators.map((o) => [o.name, o.role, time(o.createdAt)])));
      });
    case 'operators add':
      return withClient(flags, async (c) => {
        const role = need(flags.role, '--role') as Role;
        if (!ROLES.includes(role)) throw new UsageError(`--role is one of ${ROLES.join(', ')}`);
        const r = await c.call('operators.add', { name: need(a1, 'operator name'), role });
        out(flags, r, () => `added operator ${r.name} (${r.role}). Profile (shown once):\n${JSON.stringify(r.credential, null, 2).replace('"brokerUrl"', '"url"')}`);
      });
    case 'operators remove':
      return withClient(flags, async (c) => {
        const r = await c.call('operators.remove', { name: need(a1, 'operator name') });
        out(flags, r, () => `removed operator ${r.name}`);
      });
    case 'broker-config mosquitto':
      return brokerConfig(flags);
    default:
      throw new UsageError(cmd.length === 0 ? 'no command' : `unknown command: ${cmd.join(' ')}`);
  }
}

async function brokerConfig(flags: Flags): Promise<void> {
  const { openSqliteStore } = await import('../fleet-server/store/sqlite.js');
  const { writeMosquitto } = await import('../fleet-server/broker/mosquitto.js');
  const { ensureBootstrapOperator, ensureFleetIdentity } = await import('../fleet-server/auth/bootstrap.js');
  const dir = need(flags.out, '--out <dir>');
  const dataDir = flags['data-dir'] ?? './data';
  const port = flags.port === undefined ? 1883 : Number(flags.port);
  if (!Number.isInteger(port) || port < 1 || port > 65_535) throw new UsageError('--port takes a TCP port');
  const url = flags.url ?? `mqtt://127.0.0.1:${port}`;
  const store = openSqliteStore(join(dataDir, 'fleet.db'));
  try {
    ensureFleetIdentity(store, dataDir, 'fleet', Date.now());
    ensureBootstrapOperator(store, dataDir, url, Date.now());
    writeMosquitto(store, dir, port, { conf: true, runAs: flags['run-as'] ?? userInfo().username });
  } finally {
    store.close();
  }
  out(flags, { dir: resolve(dir), files: ['mosquitto.conf', 'edgefleet.passwd', 'edgefleet.acl'] }, () =>
    [
      `wrote ${join(dir, 'mosquitto.conf')}, edgefleet.passwd and edgefleet.acl`,
      `start the broker:  mosquitto -c ${join(dir, 'mosquitto.conf')}`,
      `then the fleet:    EDGEFLEET_SERVER_BROKER_MODE=external EDGEFLEET_SERVER_BROKER_URL=${url} \\`,
      `                   EDGEFLEET_SERVER_BROKER_MOSQUITTO_CONFIG_DIR=${resolve(dir)} edgefleet-server --data-dir ${dataDir}`,
    ].join('\n'),
  );
}

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        json: { type: 'boolean' },
        profile: { type: 'string' },
        url: { type: 'string' },
        user: { type: 'string' },
        password: { type: 'string' },
        timeout: { type: 'string' },
        out: { type: 'string', short: 'o' },
        role: { type: 'string' },
        limit: { type: 'string' },
        target: { type: 'string' },
        class: { type: 'string' },
        'base-version': { type: 'string' },
        'data-dir': { type: 'string' },
        'run-as': { type: 'string' },
        port: { type: 'string' },
        'artifacts-url': { type: 'string' },
        name: { type: 'string' },
        version: { type: 'string' },
        runtime: { type: 'string' },
        entry: { type: 'string' },
        'golden-inputs': { type: 'string' },
        'baseline-inputs': { type: 'string' },
        reference: { type: 'string' },
        parent: { type: 'string' },
        expires: { type: 'string' },
        health: { type: 'string' },
        signature: { type: 'string' },
        lineage: { type: 'string' },
        training: { type: 'string' },
        reason: { type: 'string' },
        shadow: { type: 'string' },
        base: { type: 'string' },
        patch: { type: 'string' },
        'model-json': { type: 'string' },
        plan: { type: 'string' },
        selector: { type: 'string' },
        interval: { type: 'string' },
        active: { type: 'boolean' },
        add: { type: 'string' },
        remove: { type: 'string' },
        tag: { type: 'string' },
        config: { type: 'string' },
        'min-samples': { type: 'string' },
        fraction: { type: 'string' },
        min: { type: 'string' },
        max: { type: 'string' },
        deadline: { type: 'string' },
        strategy: { type: 'string' },
        watch: { type: 'boolean' },
        model: { type: 'string' },
        every: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    process.stderr.write(`edgefleet: ${(e as Error).message}\n\n${USAGE}\n`);
    return EXIT.USAGE;
  }
  const flags = parsed.values;
  if (flags.help || parsed.positionals[0] === 'help') {
    process.stdout.write(USAGE + '\n');
    return EXIT.OK;
  }
  try {
    const code = await run(parsed.positionals, flags);
    return typeof code === 'number' ? code : EXIT.OK;
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`edgefleet: ${e.message}\n\n${USAGE}\n`);
      return EXIT.USAGE;
    }
    if (isEdgefleetError(e)) {
      // EF_PLAN_INVALID lists every error in `details`; its message repeats them on one line.
      const lines = Array.isArray(e.details) && e.details.length > 0 && e.details.every((d) => typeof d === 'string') ? e.details : null;
      if (flags.json) process.stdout.write(JSON.stringify({ ok: false, error: { code: e.code, message: e.message, ...(lines ? { details: lines } : {}) } }) + '\n');
      if (lines) process.stderr.write(`edgefleet: ${ERRORS[e.code]} [${e.code}]\n${lines.map((l) => `  ${l}\n`).join('')}`);
      else process.stderr.write(`edgefleet: ${e.message} [${e.code}]\n`);
      return EXIT_FOR[e.code] ?? EXIT.CLI_SERVER_ERROR;
    }
    process.stderr.write(`edgefleet: ${(e as Error).stack ?? String(e)}\n`);
    return EXIT.CLI_SERVER_ERROR;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  () => process.exit(EXIT.CLI_SERVER_ERROR),
);
