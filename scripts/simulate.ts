#!/usr/bin/env node
/**
 * `npm run simulate`: a fleet of simulated devices in this process (scripts/sim), for rehearsing a
 * rollout plan or a federated round against a running fleet, or for load on any broker. Prints a
 * status line every second; Ctrl-C says goodbye for every device and exits.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { EXIT, isEdgefleetError, isValidId, type ErrorCode } from '../proto/index.js';
import { resolveProfile, type Profile } from './cli/profile.js';
import { OpsClient } from './ops-client.js';
import { FL_DATASETS, SimFleet, type FlDataset, type FleetStatus, type SimLearningOptions } from './sim/fleet.js';
import { BEHAVIOURS, deviceIds, parseRuleSpec, scenarioErrors, type Scenario } from './sim/scenario.js';
import { provisionDevices, type DeviceCredential } from './sim/provision.js';

const USAGE = `usage: npm run simulate -- [options]

  --devices <n>              how many devices (default 100)
  --prefix <p>               device ids <p>-0001… (default sim)
  --rule <spec>              behaviour[:share][@versions][#model], repeatable; e.g.
                             failing-probation:0.1@3   slow:0.2   degraded:0.05@4#iris   crashing:0.01
                             behaviours: ${BEHAVIOURS.join(', ')}
  --model <name@version>     every device starts out holding this version, committed; repeatable
  --seed <s>                 seeds which devices get which rule (default edgefleet-sim)

  against a running fleet (its broker authenticates devices):
  --profile <file>           operator profile (default ./data/cli.json, or EDGEFLEET_PROFILE);
                             devices are provisioned through it and their credentials cached
  --credentials <file>       the cache (default <profile dir>/sim-credentials.json)
  --tag <a,b>                tags for the devices (rollouts and safe mode select by them)

  against any broker without authentication (Mosquitto on 1883, say):
  --url <mqtt-url>           devices connect here, anonymously (with --profile: only overrides the URL)

  --concurrency <n>          connections opened at once (default 200)
  --probation-ms <ms>        probation of a new version (default 1000)
  --report-interval-ms <ms>  periodic reports (default 5000)
  --protocol <4|5>           MQTT 3.1.1 or 5 (default 4)
  --duration-sec <s>         stop by itself after this long (default: until Ctrl-C)
  --clear-retained           on exit, leave no retained status behind (default: each device's offline)

  federated learning (against a fleet: its profile, as for provisioning):
  --fl <dataset>             every device holds a non-IID shard of ${FL_DATASETS.join(' or ')} as labelled samples
                             and takes part in the fleet's rounds; e.g. --model digits@1 --fl digits
  --fl-model <name>          the model the samples are for (default: the dataset's name)
  --fl-alpha <a>             Dirichlet label skew across devices, smaller is more skewed (default 0.5)
  --fl-seed <n>              seeds the partition (default 1)
  --fl-cache <dir>           where the base version's files are kept, shared by every device
                             (default: a temporary directory, removed on exit)

exit codes: 0 ok, 2 usage, 10 broker unreachable, 11 credentials refused, 12 forbidden, 15 timeout,
            16 fleet error, 17 no credentials`;

const EXIT_BY_CODE: Partial<Record<ErrorCode, number>> = {
  EF_BROKER_UNREACHABLE: EXIT.CLI_BROKER_UNREACHABLE,
  EF_BROKER_REFUSED: EXIT.CLI_BROKER_REFUSED,
  EF_FORBIDDEN: EXIT.CLI_FORBIDDEN,
  EF_TIMEOUT: EXIT.CLI_TIMEOUT,
  EF_CONFIG_INVALID: EXIT.CLI_NO_CREDENTIALS,
};

class UsageError extends Error {}

function say(line: string): void {
  process.stderr.write(line + '\n');
}

function positive(flag: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`--${flag} wants a whole number, not ${JSON.stringify(value)}`);
  return n;
}

function parseModels(specs: readonly string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const spec of specs) {
    const m = /^(.+)@(\d+)$/.exec(spec);
    if (!m || !isValidId(m[1] as string) || Number(m[2]) < 1) throw new UsageError(`--model wants name@version, not ${JSON.stringify(spec)}`);
    out[m[1] as string] = Number(m[2]);
  }
  return out;
}

/** `online 198/200 · desired v3 · iris 1:150 2:48 (↓2 ⧗3) · applied 400 · resync 2 · rolled back 3 · crashes 1` */
function statusLine(s: FleetStatus, n: Record<string, number>, elapsedSec: number): string {
  const models = Object.entries(s.models).map(([name, c]) => {
    const serving = Object.entries(c.serving)
      .map(([v, k]) => `${v === 'none' ? '-' : v}:${k}`)
      .join(' ');
    const busy = [c.downloading ? `↓${c.downloading}` : '', c.probation ? `probation ${c.probation}` : ''].filter(Boolean).join(' ');
    return `${name} ${serving}${busy ? ` (${busy})` : ''}`;
  });
  const desired = s.desiredVersions.min === s.desiredVersions.max ? `v${s.desiredVersions.max}` : `v${s.desiredVersions.min}–${s.desiredVersions.max}`;
  const counters = Object.entries(n)
    .filter(([, v]) => v > 0)
    .map(([k, v]) => `${k} ${v}`);
  return [`[${elapsedSec}s] online ${s.connected}/${s.devices}`, `desired ${desired}`, ...models, ...counters].join(' · ');
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      devices: { type: 'string' },
      prefix: { type: 'string' },
      rule: { type: 'string', multiple: true },
      model: { type: 'string', multiple: true },
      seed: { type: 'string' },
      profile: { type: 'string' },
      credentials: { type: 'string' },
      tag: { type: 'string', multiple: true },
      url: { type: 'string' },
      concurrency: { type: 'string' },
      'probation-ms': { type: 'string' },
      'report-interval-ms': { type: 'string' },
      protocol: { type: 'string' },
      'duration-sec': { type: 'string' },
      'clear-retained': { type: 'boolean' },
      fl: { type: 'string' },
      'fl-model': { type: 'string' },
      'fl-alpha': { type: 'string' },
      'fl-seed': { type: 'string' },
      'fl-cache': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    say(USAGE);
    return EXIT.OK;
  }
  const scenario: Scenario = { devices: positive('devices', values.devices, 100), prefix: values.prefix ?? 'sim', rules: (values.rule ?? []).map(parseRuleSpec) };
  if (values.seed !== undefined) scenario.seed = values.seed;
  const errors = scenarioErrors(scenario);
  if (errors.length > 0) throw new UsageError(errors.join('\n'));
  const models = parseModels(values.model ?? []);
  const tags = (values.tag ?? []).flatMap((t) => t.split(',')).filter((t) => t !== '');
  const bad = tags.filter((t) => !isValidId(t));
  if (bad.length > 0) throw new UsageError(`not valid tags: ${bad.join(', ')}`);
  if (values.protocol !== undefined && values.protocol !== '4' && values.protocol !== '5') throw new UsageError('--protocol is 4 or 5');
  const durationSec = values['duration-sec'] === undefined ? null : positive('duration-sec', values['duration-sec'], 0);
  const fl = parseFl(values);
  if (fl && values.url !== undefined && values.profile === undefined) throw new UsageError('--fl needs a fleet (--profile): the devices fetch the base model from its artifact server');
  if (fl && !(fl.model in models)) say(`--fl: no --model ${fl.model}@<version>: devices hold ${fl.model} only once the fleet assigns it`);

  const ids = deviceIds(scenario);
  let url = values.url;
  let credentials: Record<string, DeviceCredential> | undefined;
  let learning: SimLearningOptions | undefined;
  let removeCache = (): void => undefined;
  // Anonymous when only a URL is given; otherwise the fleet's broker, with provisioned devices.
  if (values.url === undefined || values.profile !== undefined) {
    const profile = resolveProfile({ profile: values.profile });
    const cacheFile = values.credentials ?? join(profile.source === 'flags/environment' ? resolve('data') : dirname(profile.source), 'sim-credentials.json');
    say(`provisioning ${ids.length} devices through ${profile.url} as ${profile.username} (credentials cached in ${cacheFile})`);
    credentials = await provisionDevices({
      profile,
      ids,
      cacheFile,
      tags,
      models,
      progress: (done, total) => {
        if (done % 100 === 0 || done === total) say(`  provisioned ${done}/${total}`);
      },
    });
    url ??= credentials[ids[0] as string]?.brokerUrl;
    if (fl) {
      const { artifactsUrl, trustedKeys } = await modelsProvisioning(profile);
      let cacheDir = values['fl-cache'];
      if (cacheDir === undefined) {
        const tmp = (cacheDir = mkdtempSync(join(tmpdir(), 'edgefleet-sim-fl-')));
        removeCache = () => rmSync(tmp, { recursive: true, force: true });
      }
      learning = { ...fl, artifactsUrl, trustedKeys, cacheDir };
    }
  } else if (tags.length > 0) {
    say('--tag has no effect without a fleet (--profile): tags live in the fleet');
  }
  if (url === undefined) throw new UsageError('no broker: give --url, or --profile for a fleet');
  const options = {
    url,
    scenario,
    credentials,
    connectConcurrency: positive('concurrency', values.concurrency, 200),
    protocolVersion: values.protocol === '5' ? (5 as const) : (4 as const),
    probationMs: positive('probation-ms', values['probation-ms'], 1000),
    reportIntervalMs: positive('report-interval-ms', values['report-interval-ms'], 5000),
    initial: { models },
    ...(learning ? { learning } : {}),
  };
  // Loading and partitioning the dataset may fail: the temporary cache goes with it.
  const sim = build(() => new SimFleet(options), removeCache);
  const samples = sim.samples();
  if (samples && learning) {
    say(
      `federated: ${samples.total} ${learning.dataset} rows over ${sim.ids.length} devices for ${samples.model} (Dirichlet α ${learning.alpha}, seed ${learning.seed}),` +
        ` ${samples.min}–${samples.max} each; model files cached in ${learning.cacheDir}`,
    );
  }

  const tty = process.stderr.isTTY;
  const counters: Record<string, number> = { applied: 0, resync: 0, committed: 0, 'rolled back': 0, crashes: 0, flaps: 0, 'link lost': 0 };
  sim.on('applied', () => (counters.applied = (counters.applied ?? 0) + 1));
  sim.on('resync', () => (counters.resync = (counters.resync ?? 0) + 1));
  sim.on('verdict', (_id, _m, _v, ok) => {
    const k = ok ? 'committed' : 'rolled back';
    counters[k] = (counters[k] ?? 0) + 1;
  });
  sim.on('disconnected', (_id, cause) => {
    const k = cause === 'crash' ? 'crashes' : cause === 'lost' ? 'link lost' : cause === 'flap' ? 'flaps' : null;
    if (k) counters[k] = (counters[k] ?? 0) + 1;
  });
  sim.on('refused', (id, message) => say(`${id}: ${message}`));
  const flCounters = { join: 'fl joined', decline: 'fl declined', failed: 'fl failed', update: 'updates sent', evaluation: 'evaluated', 'fetch-failed': 'fetch failed' } as const;
  sim.on('fl', (id, what, detail) => {
    const k = flCounters[what];
    counters[k] = (counters[k] ?? 0) + 1;
    // Failures are worth a line of their own; declines are counted (their reasons are in `edgefleet fl status <round>`).
    if (what === 'failed' || what === 'fetch-failed') say(`${tty ? '\n' : ''}${id}: ${what === 'failed' ? 'training failed' : 'cannot fetch the base'}: ${detail ?? ''}`);
  });

  const t0 = Date.now();
  say(`connecting ${sim.ids.length} devices to ${url}`);
  let stopping: Promise<number> | null = null;
  let ticker: NodeJS.Timeout | null = null;
  const stop = (code: number): Promise<number> => {
    stopping ??= (async () => {
      if (ticker) clearInterval(ticker);
      if (process.stderr.isTTY) process.stderr.write('\n');
      say('stopping: every device says offline and disconnects');
      await sim.stop({ clearRetained: values['clear-retained'] === true }).finally(removeCache);
      process.stdout.write(JSON.stringify({ status: sim.status(), counters, elapsedSec: Math.round((Date.now() - t0) / 1000) }) + '\n');
      return code;
    })();
    return stopping;
  };
  let finish: (code: number) => void = () => undefined;
  const done = new Promise<number>((resolveDone) => (finish = resolveDone));
  const onSignal = (): void => {
    if (stopping) process.exit(130); // a second Ctrl-C: do not wait for goodbyes
    void stop(EXIT.OK).then(finish);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await sim.start();
  } catch (e) {
    await sim.stop().catch(() => undefined);
    removeCache();
    throw e;
  }
  // Interrupted while connecting: start() stopped opening connections; the goodbyes are under way.
  if (stopping) return done;
  say(`${sim.status().connected} devices connected in ${((Date.now() - t0) / 1000).toFixed(1)} s (rss ${Math.round(process.memoryUsage.rss() / 1e6)} MB)`);
  if (durationSec !== null) setTimeout(() => void stop(EXIT.OK).then(finish), durationSec * 1000);
  let ticks = 0;
  ticker = setInterval(() => {
    ticks += 1;
    const line = statusLine(sim.status(), counters, Math.round((Date.now() - t0) / 1000));
    if (tty) process.stderr.write(`\r\x1b[K${line}`);
    else if (ticks % 5 === 0) say(line);
  }, 1000);
  return done;
}

/** `make()`, or `undo()` and the error. */
function build<T>(make: () => T, undo: () => void): T {
  try {
    return make();
  } catch (e) {
    undo();
    throw e;
  }
}

type FlFlags = { fl?: string | undefined; 'fl-model'?: string | undefined; 'fl-alpha'?: string | undefined; 'fl-seed'?: string | undefined };

/** --fl and its options; null without --fl. */
function parseFl(values: FlFlags): { dataset: FlDataset; model: string; alpha: number; seed: number } | null {
  if (values.fl === undefined) {
    const stray = (['fl-model', 'fl-alpha', 'fl-seed'] as const).filter((k) => values[k] !== undefined);
    if (stray.length > 0) throw new UsageError(`${stray.map((k) => `--${k}`).join(', ')} without --fl`);
    return null;
  }
  const dataset = values.fl as FlDataset;
  if (!FL_DATASETS.includes(dataset)) throw new UsageError(`--fl is one of ${FL_DATASETS.join(', ')}, not ${JSON.stringify(values.fl)}`);
  const model = values['fl-model'] ?? dataset;
  if (!isValidId(model)) throw new UsageError(`--fl-model wants a model name, not ${JSON.stringify(model)}`);
  const alpha = values['fl-alpha'] === undefined ? 0.5 : Number(values['fl-alpha']);
  if (!(alpha > 0 && Number.isFinite(alpha))) throw new UsageError(`--fl-alpha wants a number above 0, not ${JSON.stringify(values['fl-alpha'])}`);
  return { dataset, model, alpha, seed: positive('fl-seed', values['fl-seed'], 1) };
}

/**
 * Where the devices download models and which fleet key signs them: the fleet says (as for `edgefleet
 * devices add`); a fleet that will not tell leaves the profile's artifact server and unchecked signatures.
 */
async function modelsProvisioning(profile: Profile): Promise<{ artifactsUrl: string; trustedKeys: string[] }> {
  const client = await OpsClient.connect({ ...profile, timeoutMs: 30_000 });
  try {
    return await client.call('models.provisioning', {});
  } catch (e) {
    if (!profile.artifactsUrl) throw e;
    say(`models.provisioning: ${(e as Error).message}; using the profile's artifact server ${profile.artifactsUrl}, manifests' signatures unchecked`);
    return { artifactsUrl: profile.artifactsUrl, trustedKeys: [] };
  } finally {
    await client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    // RangeError: a rule or scenario the simulator cannot read.
    if (e instanceof UsageError || e instanceof RangeError) {
      say(`${e.message}\n\n${USAGE}`);
      process.exit(EXIT.USAGE);
    }
    if (isEdgefleetError(e)) {
      say(`${e.code}: ${e.message}`);
      process.exit(EXIT_BY_CODE[e.code] ?? EXIT.CLI_SERVER_ERROR);
    }
    say(e instanceof Error ? (e.stack ?? e.message) : String(e));
    process.exit(EXIT.CLI_SERVER_ERROR);
  },
);
