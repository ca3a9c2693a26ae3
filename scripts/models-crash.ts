#!/usr/bin/env node
/**
 * Crash loop for the device's model lifecycle: a real fleet server (embedded broker, artifact
 * server, registry) in this process and a real agent process (dist/agent/main.js) that is sent new
 * iris versions to install (good ones that commit, a slow one rolled back on latency, a NaN one
 * rolled back on its outputs) while it serves inference traffic, and is killed with SIGKILL at
 * random moments: on a timer, or as soon as its log says it entered a chosen lifecycle state
 * (downloading, verifying, staging in the child process, activating, probation, committing,
 * rolling back).
 *
 * While the agent is dead, everything in its model store is checked (every blob hashes to its
 * name, every complete view matches the version's signed manifest, every stored manifest verifies
 * with the fleet key). After every restart the version it serves must be one whose signed manifest
 * verifies with the fleet key, whose files in the agent's store hash and size-match that manifest,
 * which the slot file lists as stable (or as serving on probation), and which the device has not
 * marked failed. At the end a fresh good version must still commit: the loop left no crash loop.
 *
 *   npm run soak:models -- --iterations 300      (CI runs a few iterations through vitest)
 *
 * Prints one JSON object as its last line; exits 1 on any violation.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { compiledEntry } from '../common/compiled.js';
import { silentLogger } from '../common/log.js';
import { ServerConfig } from '../fleet-server/config.js';
import { FleetServer } from '../fleet-server/server.js';
import { CLI_PROFILE_FILE, type CliProfile } from '../fleet-server/auth/bootstrap.js';
import { FLEET_PUBLIC_KEY_FILE } from '../fleet-server/registry/keys.js';
import { manifestSha256, verifySignedManifest, type ModelDraftInput, type SignedManifest } from '../proto/index.js';
import { SlotState } from '../agent/models/lifecycle.js';
import { sha256File } from '../common/files.js';
import { OpsClient } from './ops-client.js';
import { ArtifactClient } from './cli/artifacts.js';
import { buildDraft, collectModelFiles, uploadModel } from './cli/publish.js';
import { buildIrisModels, irisSamples } from './train-iris.js';

const MODEL = 'iris';
const DEVICE = 'models-crash-1';

type Variant = 'good' | 'good2' | 'slow' | 'nan';
/** What is published after the first (good) version: commits and rollbacks in turn. */
const CYCLE: readonly Variant[] = ['good2', 'slow', 'good', 'nan'];

/** The lifecycle states a targeted kill aims at; what each variant can reach. */
const TARGETS: Record<Variant, readonly string[]> = {
  good: ['downloading', 'verifying', 'staging', 'activating', 'probation', 'committing'],
  good2: ['downloading', 'verifying', 'staging', 'activating', 'probation', 'committing'],
  slow: ['downloading', 'verifying', 'staging', 'activating', 'probation', 'rolling_back'],
  nan: ['downloading', 'verifying', 'staging', 'activating', 'probation', 'rolling_back'],
};
/** The order a candidate goes through before its verdict. */
const PIPELINE: readonly string[] = ['idle', 'downloading', 'verifying', 'staging', 'activating', 'probation'];
/** Each traffic loop's pause between answered requests. */
const TRAFFIC_PAUSE_MS = 4;
/** Idle, nothing under way, the desired version neither committed nor failed, this long: a stall. */
const STALL_MS = 3000;
/** States that last long enough for a kill somewhere inside them rather than at their start. */
const LONG_STATES = new Set(['staging', 'probation']);

/**
 * Short probation so that windows close within the loop's runs. 25 requests so that the p95 exists
 * (20 samples) when the window is judged: the slow variant (p95 5 to 15 ms against the good ones'
 * 0.3 to 1 ms) then fails the latency-vs-previous check. Its ratio is 4 rather than the default 2,
 * and there is no absolute latency limit: on a loaded box a good version must not be rolled back
 * for the machine's sake. Even so the slow one may pass now and then (then it commits).
 */
const HEALTH = { probationRequests: 25, probationSec: 0.5, latencyRatioMax: 4 };

export interface ModelsCrashOptions {
  iterations: number;
  seed?: number;
  /** A timed kill comes a random 0..maxRunMs after the iteration starts (default 2500). */
  maxRunMs?: number;
  /** Every n-th iteration kills in a chosen lifecycle state instead of on a timer (default 2; 0 never). */
  targetEvery?: number;
  /** A new version is published once the last one settled, or after this many iterations anyway (default 2). */
  publishEvery?: number;
  /** Progress lines (stderr from the command line). */
  progress?: (line: string) => void;
}

export interface ModelsCrashResult {
  seed: number;
  iterations: number;
  kills: number;
  /** The slot file's state at each kill, read after the process died (what the restart recovers from). */
  killsByState: Record<string, number>;
  /** Distinct lifecycle states (not idle) kills landed in. */
  killStates: number;
  /** Targeted kills: the state aimed at, and how many landed in it. */
  targeted: { aimed: Record<string, number>; landed: number };
  restarts: number;
  checks: number;
  filesVerified: number;
  violations: string[];
  published: number;
  publishedByVariant: Record<string, number>;
  commits: number;
  rollbacks: number;
  /** ON_RESTART actions the agent logged, by action. */
  recovered: Record<string, number>;
  committedByVariant: Record<string, number>;
  /** The device's failed list at the end, by reason. */
  failedByReason: Record<string, number>;
  servedVersions: Record<string, number>;
  /** Served while marked failed because no other stable version was left (not counted as a violation). */
  servedFailedOnlyLeft: number;
  /** The agent's own start-up verification refused a stored version, or fell back to an older one. */
  startupUnverified: number;
  fallbacks: number;
  /** Error-level agent log lines that are not a verdict (first few). */
  agentErrors: string[];
  /**
   * Liveness findings, not crash-safety violations. `stalls`: the agent sat idle for STALL_MS with
   * the desired version neither started nor settled (the loop then kills it; the restart resumes).
   * `staleActivations`: a candidate activated after desired state had moved on to a newer version.
   */
  stalls: number;
  staleActivations: number;
  /** After the loop, a fresh good version committed without kills. */
  finalCommit: boolean;
  requests: { ok: number; failed: number };
  ms: number;
}

/** A small seeded generator, so that a failing run can be repeated. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function bump(m: Record<string, number>, k: string, by = 1): void {
  m[k] = (m[k] ?? 0) + by;
}

interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** One HTTP request to the agent's inference API on its unix socket. */
function http(socketPath: string, method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 5000): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request(
      { socketPath, method, path, agent: false, timeout: timeoutMs, headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.on('error', reject);
    req.end(payload);
  });
}

function inferBody(features: number[]): unknown {
  return { inputs: [{ name: 'features', shape: [1, 4], datatype: 'FP32', data: features }] };
}

interface AgentRun {
  child: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  alive: boolean;
  /** Called with every lifecycle state the agent logs entering. */
  onState: ((state: string) => void) | null;
  stderr: string;
}

export async function modelsCrashLoop(opts: ModelsCrashOptions, agentMain = distAgent()): Promise<ModelsCrashResult> {
  const started = Date.now();
  const seed = opts.seed ?? Date.now() % 1_000_000;
  const random = rng(seed);
  const maxRunMs = opts.maxRunMs ?? 2500;
  const targetEvery = opts.targetEvery ?? 2;
  const publishEvery = opts.publishEvery ?? 2;
  const progress = opts.progress ?? ((): void => undefined);
  const dir = mkdtempSync(join(tmpdir(), 'edgefleet-mcrash-'));

  const result: ModelsCrashResult = {
    seed,
    iterations: opts.iterations,
    kills: 0,
    killsByState: {},
    killStates: 0,
    targeted: { aimed: {}, landed: 0 },
    restarts: 0,
    checks: 0,
    filesVerified: 0,
    violations: [],
    published: 0,
    publishedByVariant: {},
    commits: 0,
    rollbacks: 0,
    recovered: {},
    committedByVariant: {},
    failedByReason: {},
    servedVersions: {},
    servedFailedOnlyLeft: 0,
    startupUnverified: 0,
    fallbacks: 0,
    agentErrors: [],
    stalls: 0,
    staleActivations: 0,
    finalCommit: false,
    requests: { ok: 0, failed: 0 },
    ms: 0,
  };
  const violation = (what: string): void => {
    result.violations.push(what);
    progress(`VIOLATION: ${what}`);
  };

  // --- The fleet, in this process.
  const config = ServerConfig.parse({ dataDir: join(dir, 'fleet'), broker: { mode: 'embedded', port: 0 }, artifacts: { port: 0 } });
  const fleet = new FleetServer(config, silentLogger());
  await fleet.start();
  let ops: OpsClient | null = null;
  let run: AgentRun | null = null;
  let stopTraffic: (() => Promise<void>) | null = null;
  try {
    const profile = JSON.parse(readFileSync(join(config.dataDir, CLI_PROFILE_FILE), 'utf8')) as CliProfile;
    const admin = await OpsClient.connect(profile);
    ops = admin;
    const fleetKey = readFileSync(join(config.dataDir, FLEET_PUBLIC_KEY_FILE), 'utf8').trim();
    const { credential } = await admin.call('devices.add', { deviceId: DEVICE });

    // --- Models: trained on the real Iris data, drafted as the CLI drafts them, uploaded once.
    const models = await buildIrisModels(join(dir, 'iris'), { variants: ['good', 'good2', 'slow', 'nan'] });
    const golden = join(dir, 'golden.json');
    writeFileSync(golden, JSON.stringify({ vectors: [{ inputs: { features: { shape: [1, 4], data: [5.1, 3.5, 1.4, 0.2] } } }] }));
    const health = join(dir, 'health.json');
    writeFileSync(health, JSON.stringify(HEALTH));
    const artifacts = new ArtifactClient(fleet.artifactsUrl, profile.username, profile.password);
    const drafts = {} as Record<Variant, ModelDraftInput>;
    for (const v of ['good', 'good2', 'slow', 'nan'] as const) {
      const files = await collectModelFiles(models[v].dir);
      // The NaN variant has no golden vectors (it would not reproduce any): the device finds it out on probation.
      const draft = await buildDraft(files, { name: MODEL, goldenInputs: v === 'nan' ? undefined : golden, health });
      await uploadModel(artifacts, files, draft);
      drafts[v] = draft;
    }
    const variantOf = new Map<number, Variant>();
    const signedOf = new Map<number, SignedManifest>();
    let desired = 0;
    let desiredSince = 0;
    let desiredAt = 0;
    let cycle = 0;
    const publish = async (variant: Variant, iteration: number): Promise<number> => {
      const { version } = await admin.call('models.publish', drafts[variant]);
      variantOf.set(version, variant);
      await admin.call('models.assign', { name: MODEL, version, deviceIds: [DEVICE] });
      desired = version;
      desiredSince = iteration;
      desiredAt = Date.now();
      result.published++;
      bump(result.publishedByVariant, variant);
      return version;
    };
    /** The signed manifest as the registry holds it, verified with the fleet key here. */
    const signed = async (version: number): Promise<SignedManifest | null> => {
      let s = signedOf.get(version);
      if (!s) {
        s = (await admin.call('models.show', { name: MODEL, version })).signed;
        signedOf.set(version, s);
      }
      try {
        verifySignedManifest(s, [fleetKey]);
        return s;
      } catch (err) {
        violation(`${MODEL}@${version}: the registry's signed manifest does not verify with the fleet key: ${(err as Error).message}`);
        return null;
      }
    };

    // --- The agent: a real process, its API on a unix socket in its state directory.
    const stateDir = join(dir, 'agent');
    const store = join(stateDir, 'models');
    const socketPath = join(stateDir, 'api.sock');
    const agentConfig = join(dir, 'agent.json');
    writeFileSync(
      agentConfig,
      JSON.stringify({
        deviceId: DEVICE,
        stateDir,
        broker: { url: credential.brokerUrl, password: credential.password, reconnectBaseMs: 50, reconnectCapMs: 500 },
        runtimes: { probe: false },
        api: { socketPath },
        models: { artifactsUrl: fleet.artifactsUrl, trustedKeys: [fleetKey], checkIntervalMs: 50, childCheckTimeoutSec: 60 },
      }),
    );
    const slotFile = join(store, 'slots', `${MODEL}.json`);
    const readSlot = (): SlotState | null => {
      if (!existsSync(slotFile)) return null;
      let raw: unknown;
      try {
        raw = JSON.parse(readFileSync(slotFile, 'utf8'));
      } catch (err) {
        // Written atomically: a torn slot file is a bug (the agent would start the slot afresh).
        violation(`the slot file is not JSON: ${(err as Error).message}`);
        return null;
      }
      const parsed = SlotState.safeParse(raw);
      if (!parsed.success) {
        violation(`the slot file does not parse: ${parsed.error.message.slice(0, 200)}`);
        return null;
      }
      return parsed.data;
    };

    const onLog = (line: string): void => {
      let o: Record<string, unknown>;
      try {
        o = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return; // a line cut by the kill
      }
      const msg = typeof o.msg === 'string' ? o.msg : '';
      if (o.model === MODEL && typeof o.to === 'string' && typeof o.from === 'string') {
        if (o.to === 'committing') {
          result.commits++;
          const v = typeof o.candidate === 'number' ? variantOf.get(o.candidate) : undefined;
          bump(result.committedByVariant, v ?? 'unknown');
        }
        if (o.to === 'rolling_back') result.rollbacks++;
        // Desired state had named a newer version for a while (the agent has it by then), yet this one goes live.
        if (o.to === 'activating' && typeof o.candidate === 'number' && o.candidate < desired && Date.now() - desiredAt > 500) result.staleActivations++;
        run?.onState?.(o.to);
      }
      if (typeof o.action === 'string' && msg.startsWith('resuming')) bump(result.recovered, o.action);
      if (msg.startsWith('model version failed verification at start-up')) result.startupUnverified++;
      if (msg.startsWith('the active model version did not verify')) result.fallbacks++;
      if (typeof o.level === 'number' && o.level >= 50 && !/ rolled back: | refused$/.test(msg) && result.agentErrors.length < 10) {
        const err = o.err as { message?: string } | undefined;
        result.agentErrors.push(`${msg}${err?.message ? `: ${err.message.slice(0, 200)}` : ''}`);
      }
    };

    const startAgent = (): AgentRun => {
      const child = spawn(process.execPath, [agentMain, '--config', agentConfig], { stdio: ['ignore', 'pipe', 'pipe'] });
      const r: AgentRun = { child, exited: null as unknown as AgentRun['exited'], alive: true, onState: null, stderr: '' };
      let buf = '';
      child.stdout?.on('data', (d: Buffer) => {
        buf += d.toString();
        const lines = buf.split('\n');
        buf = lines.pop() ?? '';
        for (const l of lines) onLog(l);
      });
      child.stderr?.on('data', (d: Buffer) => (r.stderr = (r.stderr + d.toString()).slice(-4000)));
      r.exited = new Promise((resolve) =>
        child.on('exit', (code, signal) => {
          r.alive = false;
          resolve({ code, signal });
        }),
      );
      return r;
    };

    const { features } = irisSamples();
    const traffic = (): (() => Promise<void>) => {
      let stop = false;
      let row = Math.floor(random() * features.length);
      const loop = async (): Promise<void> => {
        while (!stop) {
          try {
            const res = await http(socketPath, 'POST', `/v2/models/${MODEL}/infer`, inferBody(features[row++ % features.length] as number[]));
            if (res.status === 200) {
              result.requests.ok++;
              await sleep(TRAFFIC_PAUSE_MS);
            } else {
              result.requests.failed++;
              await sleep(20);
            }
          } catch {
            result.requests.failed++;
            await sleep(20);
          }
        }
      };
      // Two at a time, a hundred or more a second: probation windows fill in well under a second, and
      // the stable version has its 20 latency samples long before a candidate is judged against it.
      const loops = [loop(), loop()];
      return async () => {
        stop = true;
        await Promise.all(loops);
      };
    };

    const waitReady = async (timeoutMs: number): Promise<boolean> => {
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline) {
        if (run && !run.alive) return false;
        try {
          if ((await http(socketPath, 'GET', '/v2/health/ready', undefined, 2000)).status === 200) return true;
        } catch {
          // not listening yet
        }
        await sleep(50);
      }
      return false;
    };

    /** Starts the agent and its traffic; true once it answers ready. */
    const up = async (): Promise<boolean> => {
      const r = startAgent();
      run = r;
      stopTraffic = traffic();
      const ready = await waitReady(60_000);
      if (!ready) {
        violation(r.alive ? 'the agent did not become ready within 60 s after a restart' : `the agent exited during start-up: ${r.stderr.trim().slice(-500)}`);
      }
      return ready;
    };

    const killAgent = async (): Promise<void> => {
      const r = run;
      if (!r) return;
      r.onState = null;
      if (r.alive) r.child.kill('SIGKILL');
      const { signal, code } = await r.exited;
      await stopTraffic?.();
      stopTraffic = null;
      run = null;
      if (signal === 'SIGKILL') result.kills++;
      else violation(`the agent exited by itself (code ${code}, signal ${signal}): ${r.stderr.trim().slice(-500)}`);
    };

    /**
     * The store while the agent is dead, nothing moving: every blob hashes to its name; every
     * stored manifest verifies with the fleet key and is the registry's; every view whose manifest
     * is stored is complete and matches it (a view without one is being collected).
     */
    const checkStore = async (): Promise<void> => {
      const blobs = join(store, 'blobs');
      for (const b of existsSync(blobs) ? readdirSync(blobs) : []) {
        result.filesVerified++;
        if (sha256File(join(blobs, b)) !== b) violation(`blob ${b} does not hash to its name`);
      }
      const manifests = join(store, 'manifests', MODEL);
      const stored = new Set<number>();
      for (const e of existsSync(manifests) ? readdirSync(manifests) : []) {
        if (e.startsWith('.')) continue; // a write a kill interrupted; never read by the agent
        const v = Number(e.replace(/\.json$/, ''));
        const fleetSigned = await signed(v);
        if (!fleetSigned) continue;
        let local: SignedManifest;
        try {
          local = JSON.parse(readFileSync(join(manifests, e), 'utf8')) as SignedManifest;
          verifySignedManifest(local, [fleetKey]);
        } catch (err) {
          violation(`stored manifest ${e} does not verify: ${(err as Error).message}`);
          continue;
        }
        if (manifestSha256(local) !== manifestSha256(fleetSigned)) violation(`stored manifest ${e} is not the registry's`);
        stored.add(v);
      }
      const views = join(store, 'views', MODEL);
      for (const e of existsSync(views) ? readdirSync(views) : []) {
        if (e.startsWith('.')) continue; // a view being built; removed at start-up
        const v = Number(e);
        const s = await signed(v);
        if (!s) continue;
        for (const f of s.manifest.files) {
          const path = join(views, e, f.path);
          if (!existsSync(path)) {
            if (stored.has(v)) violation(`view ${MODEL}@${v} lacks ${f.path} though its manifest is stored`);
            continue;
          }
          result.filesVerified++;
          const size = statSync(path).size;
          if (size !== f.size) violation(`view ${MODEL}@${v}/${f.path} is ${size} bytes, the signed manifest says ${f.size} (a partial file)`);
          else if (sha256File(path) !== f.sha256) violation(`view ${MODEL}@${v}/${f.path} does not match its signed sha256`);
        }
      }
    };

    /** Is `v` allowed to serve by this slot file: stable, or the candidate serving on probation. */
    const allowedBy = (s: SlotState | null, v: number): boolean =>
      s !== null && (s.stable.includes(v) || (s.serving === v && (s.state === 'probation' || s.state === 'committing')));

    /** What the restarted agent serves: signed, its files intact, stable (or on probation), not failed. */
    const checkServing = async (): Promise<void> => {
      result.checks++;
      const before = readSlot();
      let res: HttpAnswer;
      try {
        res = await http(socketPath, 'POST', `/v2/models/${MODEL}/infer`, inferBody([5.1, 3.5, 1.4, 0.2]));
      } catch (err) {
        violation(`inference after restart failed: ${(err as Error).message}`);
        return;
      }
      const after = readSlot();
      const header = res.headers['x-model-version'];
      const v = Number(typeof header === 'string' ? header : NaN);
      if (res.status !== 200 || !Number.isInteger(v)) {
        violation(`inference after restart answered ${res.status}: ${res.body.slice(0, 200)}`);
        return;
      }
      bump(result.servedVersions, String(v));
      const s = await signed(v);
      if (!s) return;
      for (const f of s.manifest.files) {
        const path = join(store, 'views', MODEL, String(v), f.path);
        if (!existsSync(path)) {
          violation(`served ${MODEL}@${v}: ${f.path} is not in the store`);
          continue;
        }
        result.filesVerified++;
        const size = statSync(path).size;
        if (size !== f.size) violation(`served ${MODEL}@${v}: ${f.path} is ${size} bytes, the signed manifest says ${f.size} (a partial file)`);
        else if (sha256File(path) !== f.sha256) violation(`served ${MODEL}@${v}: ${f.path} does not match its signed sha256`);
      }
      if (!allowedBy(before, v) && !allowedBy(after, v)) {
        violation(`served ${MODEL}@${v} is neither stable nor on probation: slot ${JSON.stringify({ state: after?.state, serving: after?.serving, stable: after?.stable, candidate: after?.candidate })}`);
      }
      const slot = after ?? before;
      if (slot?.failed.some((f) => f.version === v)) {
        // Failed but served: tolerated only when nothing else that has not failed is left to serve.
        const others = [...slot.stable, ...(slot.fallback !== null ? [slot.fallback] : [])].filter((x) => x !== v && !slot.failed.some((f) => f.version === x));
        if (others.length === 0) result.servedFailedOnlyLeft++;
        else violation(`served ${MODEL}@${v} is marked failed on the device (reason ${slot.failed.find((f) => f.version === v)?.reason}) while ${others.join(', ')} could serve`);
      }
    };

    const isSettled = (s: SlotState | null): boolean => s !== null && ((s.state === 'idle' && s.stable[0] === desired) || s.failed.some((f) => f.version === desired));
    /** Idle with nothing under way while the desired version is neither committed nor failed. */
    const isStalled = (s: SlotState | null): boolean => s !== null && s.state === 'idle' && s.candidate === null && !isSettled(s);

    /** Sends traffic until the slot is idle with `version` committed (or `timeoutMs` passes). */
    const untilCommitted = async (version: number, timeoutMs: number): Promise<boolean> => {
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline) {
        const s = readSlot();
        if (s?.state === 'idle' && s.stable[0] === version) return true;
        if (s?.failed.some((f) => f.version === version)) return false;
        await sleep(50);
      }
      return false;
    };

    // --- Warm-up: a first good version commits, so that there is always a stable one to fall back on.
    if (!(await up())) throw new Error(`the agent did not start: ${(run as AgentRun | null)?.stderr.slice(-1000) ?? ''}`);
    const first = await publish('good', 0);
    if (!(await untilCommitted(first, 60_000))) throw new Error(`the first version did not commit: ${JSON.stringify(readSlot())}`);
    progress(`warm-up: ${MODEL}@${first} committed after ${Date.now() - started} ms`);

    // --- The loop.
    for (let i = 0; i < opts.iterations; i++) {
      const r = run as AgentRun | null;
      if (!r) throw new Error('no agent running');
      const slot = readSlot();
      const publishNow = isSettled(slot) || i - desiredSince >= publishEvery;
      const variant = publishNow ? (CYCLE[cycle++ % CYCLE.length] as Variant) : (variantOf.get(desired) as Variant);

      // A targeted kill aims at a state still ahead of the candidate: all of them for a new version.
      const targeted = targetEvery > 0 && i % targetEvery === targetEvery - 1;
      const at = PIPELINE.indexOf(slot?.state ?? 'idle');
      const choices = publishNow || at < 0 ? TARGETS[variant] : TARGETS[variant].filter((st) => PIPELINE.indexOf(st) < 0 || PIPELINE.indexOf(st) > at);
      const aim = targeted && choices.length > 0 ? (choices[Math.floor(random() * choices.length)] as string) : null;
      const runMs = Math.floor(random() * maxRunMs);
      const within = aim !== null && LONG_STATES.has(aim) ? Math.floor(random() * 300) : 0;
      if (aim !== null) bump(result.targeted.aimed, aim);
      let resolveWait = (): void => undefined;
      const waited = new Promise<void>((resolve) => (resolveWait = resolve));
      const timers: NodeJS.Timeout[] = [];
      const fire = (): void => {
        for (const t of timers) clearTimeout(t);
        r.onState = null;
        resolveWait();
      };
      void r.exited.then(fire);
      if (aim !== null) {
        // Listening before the version is assigned: the agent may enter the state before the reply comes.
        r.onState = (state) => {
          if (state !== aim) return;
          r.onState = null;
          // Killed from here, at once: verifying, activating, committing and rolling_back last milliseconds.
          if (within === 0) {
            if (r.alive) r.child.kill('SIGKILL');
            fire();
          } else timers.push(setTimeout(fire, within));
        };
      }
      if (publishNow) await publish(variant, i);
      if (aim === null) timers.push(setTimeout(fire, runMs));
      else {
        // The state may not come (the version settled, or was refused before it): killed soon after.
        const deadline = Date.now() + 10_000;
        let idleSince = Date.now();
        const poll = (): void => {
          if (r.onState === null) return;
          const now = readSlot();
          if (!isStalled(now)) idleSince = Date.now();
          else if (Date.now() - idleSince > STALL_MS) {
            result.stalls++;
            progress(`stall: ${MODEL}@${desired} desired, the agent idle on ${now?.serving ?? '-'} for ${STALL_MS} ms`);
            return fire();
          }
          if (Date.now() > deadline || isSettled(now)) timers.push(setTimeout(fire, Math.floor(random() * 300)));
          else timers.push(setTimeout(poll, 100));
        };
        poll();
      }
      await waited;
      await killAgent();
      const dead = readSlot();
      const state = dead?.state ?? 'none';
      bump(result.killsByState, state);
      if (aim !== null && aim === state) result.targeted.landed++;
      await checkStore();
      result.restarts++;
      const ready = await up();
      if (ready) await checkServing();
      progress(
        `#${i + 1}/${opts.iterations} ${aim !== null ? `aimed ${aim}` : `timed ${runMs} ms`}: killed in ${state} (candidate ${dead?.candidate ?? '-'}=${dead?.candidate ? variantOf.get(dead.candidate) : '-'}, attempts ${dead?.attempts ?? 0}); serving ${readSlot()?.serving ?? '-'}; violations ${result.violations.length}`,
      );
      if (!ready) {
        // A supervisor would keep restarting it; so does the loop, after a kill.
        continue;
      }
    }

    // --- Liveness: after all that, a fresh good version still installs and commits. The last
    // candidate is let settle first: a version assigned while another is on probation stalls when
    // that one is rolled back (counted as a stall above, not wanted here).
    if (!run || !(run as AgentRun).alive) await up();
    const settleBy = Date.now() + 30_000;
    let idleSince = Date.now();
    while (!isSettled(readSlot()) && Date.now() < settleBy) {
      if (!isStalled(readSlot())) idleSince = Date.now();
      else if (Date.now() - idleSince > STALL_MS) {
        result.stalls++;
        break;
      }
      await sleep(50);
    }
    // A good version may still be rolled back on latency when the box is busy: that is the health
    // check doing its job, not the lifecycle failing, so up to three fresh ones are tried.
    let last = 0;
    for (let attempt = 0; attempt < 3 && !result.finalCommit; attempt++) {
      last = await publish(attempt % 2 === 0 ? 'good2' : 'good', opts.iterations);
      result.finalCommit = await untilCommitted(last, 60_000);
      if (!result.finalCommit && !readSlot()?.failed.some((f) => f.version === last && f.reason.startsWith('latency'))) break;
    }
    if (result.finalCommit) await checkServing();
    else violation(`after the loop, ${MODEL}@${last} (good) did not commit within 60 s: slot ${JSON.stringify(readSlot())}`);
    await killAgent();
    await checkStore();

    const end = readSlot();
    for (const f of end?.failed ?? []) bump(result.failedByReason, f.reason);
    result.killStates = Object.keys(result.killsByState).filter((s) => s !== 'idle' && s !== 'none').length;
  } finally {
    if (run) {
      const r: AgentRun = run;
      if (r.alive) r.child.kill('SIGKILL');
      await r.exited;
    }
    const stop = stopTraffic as (() => Promise<void>) | null;
    await stop?.();
    await ops?.close().catch(() => undefined);
    await fleet.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  result.ms = Date.now() - started;
  return result;
}

function distAgent(): string {
  return compiledEntry(import.meta.url, '../agent/main.js');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const { values } = parseArgs({ options: { iterations: { type: 'string' }, seed: { type: 'string' }, quiet: { type: 'boolean' } }, strict: true });
  modelsCrashLoop({
    iterations: Number(values.iterations ?? 50),
    seed: values.seed ? Number(values.seed) : undefined,
    progress: values.quiet ? undefined : (line) => process.stderr.write(`models-crash: ${line}\n`),
  }).then(
    (r) => {
      process.stdout.write(JSON.stringify({ ...r, violations: r.violations.length, violationsFirst: r.violations.slice(0, 10) }) + '\n');
      process.exit(r.violations.length === 0 ? 0 : 1);
    },
    (err: unknown) => {
      process.stderr.write(`models-crash: ${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
