import {
  EdgefleetError,
  MODEL_RUNTIMES,
  type ModelRuntime,
  type MethodResult,
  type ModelStatus,
  type SignedManifest,
} from '../../proto/index.js';
import type { OpsClient } from '../ops-client.js';
import { ArtifactClient } from './artifacts.js';
import { bytes, table, time } from './format.js';
import type { Profile } from './profile.js';
import { buildDraft, collectModelFiles, uploadModel } from './publish.js';

/** The flags `model` and `key` commands read. */
export interface ModelFlags {
  name?: string | undefined;
  version?: string | undefined;
  runtime?: string | undefined;
  entry?: string | undefined;
  'golden-inputs'?: string | undefined;
  'baseline-inputs'?: string | undefined;
  reference?: string | undefined;
  parent?: string | undefined;
  expires?: string | undefined;
  health?: string | undefined;
  signature?: string | undefined;
  lineage?: string | undefined;
  training?: string | undefined;
  reason?: string | undefined;
  shadow?: string | undefined;
}

/** What cli.ts lends these commands: its output, its client, its usage errors. */
export interface CommandContext {
  flags: ModelFlags;
  withClient<T>(fn: (c: OpsClient) => Promise<T>, defaultTimeoutSec?: number): Promise<T>;
  out(data: unknown, human: () => string): void;
  usage(message: string): Error;
  profile(): Profile;
}

export const MODEL_USAGE = `  model publish <dir|file> --name <n> [--version <v>] [--runtime onnx|tfjs-graph|tfjs-layers] [--entry <file>]
          [--golden-inputs <file>] [--baseline-inputs <file>] [--reference parent] [--parent <v>]
          [--expires <days>] [--health <file>] [--signature <file>] [--lineage <file>] [--training <file>]
                                       run the model here (golden outputs, baselines), upload its
                                       files to the artifact server, register it as a candidate
  model list [name]                    versions, newest first, with status and lineage
  model show <name>[@version]          one version: signed manifest, status, audit trail
  model approve|promote|quarantine|deprecate <name>@<version> [--reason <text>]
                                       move a version to approved, production, quarantined, deprecated
  model assign <name>@<version> <deviceId...> [--shadow <requests>]
                                       set the version in each device's desired state
  key show | rotate                    the fleet signing key; rotate endorses a new one with the old`;

const STATUS_VERBS: Record<string, ModelStatus> = { approve: 'approved', promote: 'production', quarantine: 'quarantined', deprecate: 'deprecated' };

/** Publishing hashes every file again on the fleet: give it longer than an ordinary request. */
const PUBLISH_TIMEOUT_SEC = 120;

/** A flag's value as a positive integer, undefined when the flag is absent; anything else is a usage error. */
export function positiveInt(ctx: Pick<CommandContext, 'usage'>, v: string | undefined, what: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw ctx.usage(`${what} takes a positive integer`);
  return n;
}

/** `name@version`; the version is required unless `optional`. */
export function parseRef(ref: string | undefined, optional = false): { name: string; version: number | undefined } | null {
  const m = /^([A-Za-z0-9][A-Za-z0-9._-]{0,63})(?:@([1-9][0-9]{0,9}))?$/.exec(ref ?? '');
  if (!m || (!optional && m[2] === undefined)) return null;
  return { name: m[1] as string, version: m[2] === undefined ? undefined : Number(m[2]) };
}

function ref(ctx: CommandContext, arg: string | undefined, optional = false): { name: string; version: number | undefined } {
  const r = parseRef(arg, optional);
  if (!r) throw ctx.usage(optional ? 'expected <name> or <name>@<version>' : 'expected <name>@<version>');
  return r;
}

/** The version `--reference parent` compares against when `--parent` is not given: the newest production, else approved, else candidate. */
async function defaultParent(c: OpsClient, name: string): Promise<number> {
  const { versions } = await c.call('models.list', { name, limit: 10_000 });
  for (const status of ['production', 'approved', 'candidate'] as const) {
    const v = versions.find((x) => x.status === status);
    if (v) return v.version;
  }
  throw new EdgefleetError('EF_UNKNOWN_MODEL', `--reference parent: ${name} has no version that is production, approved or candidate`);
}

async function publish(ctx: CommandContext, path: string | undefined): Promise<void> {
  const f = ctx.flags;
  if (path === undefined) throw ctx.usage('missing the model directory or file');
  if (f.name === undefined) throw ctx.usage('missing --name');
  if (f.runtime !== undefined && !(MODEL_RUNTIMES as readonly string[]).includes(f.runtime)) throw ctx.usage(`--runtime is one of ${MODEL_RUNTIMES.join(', ')}`);
  if (f.reference !== undefined && f.reference !== 'parent') throw ctx.usage('--reference takes "parent"');
  const version = positiveInt(ctx, f.version, '--version');
  const parentArg = positiveInt(ctx, f.parent, '--parent');
  const days = f.expires === undefined ? undefined : Number(f.expires);
  if (days !== undefined && !(days > 0)) throw ctx.usage('--expires takes a positive number of days');
  const profile = ctx.profile();
  if (!profile.artifactsUrl) {
    throw new EdgefleetError('EF_CONFIG_INVALID', 'no artifact server URL: the profile has no artifactsUrl; give --artifacts-url or EDGEFLEET_ARTIFACTS_URL');
  }
  const files = await collectModelFiles(path, { runtime: f.runtime as ModelRuntime | undefined, entry: f.entry });
  const name = f.name;
  await ctx.withClient(async (c) => {
    const parentVersion = parentArg ?? (f.reference === 'parent' ? await defaultParent(c, name) : undefined);
    const parent: SignedManifest | null = parentVersion === undefined ? null : (await c.call('models.show', { name, version: parentVersion })).signed;
    const draft = await buildDraft(files, {
      name,
      version,
      goldenInputs: f['golden-inputs'],
      baselineInputs: f['baseline-inputs'],
      referenceParent: f.reference === 'parent',
      parent,
      signature: f.signature,
      health: f.health,
      lineage: f.lineage,
      training: f.training,
      expiresAt: days === undefined ? null : Date.now() + Math.round(days * 86_400_000),
    });
    const artifacts = new ArtifactClient(profile.artifactsUrl as string, profile.username, profile.password);
    const { uploaded, params } = await uploadModel(artifacts, files, draft);
    const r = await c.call('models.publish', params);
    ctx.out({ ...r, files: files.files.length, uploaded, goldenVectors: draft.golden?.vectors?.length ?? 0 }, () =>
      [
        `published ${r.name}@${r.version} as a ${r.status} (${files.runtime}, entry ${files.entry})`,
        `files       ${files.files.length} (${uploaded} uploaded, ${files.files.length - uploaded} already stored)`,
        `golden      ${draft.golden?.vectors?.length ?? 0} vectors`,
        `baseline    outputs ${Object.keys(draft.baseline?.outputs ?? {}).join(', ') || 'none'}`,
        `manifest    sha256 ${r.manifestSha256}`,
        `next: edgefleet model approve ${r.name}@${r.version}`,
      ].join('\n'),
    );
  }, PUBLISH_TIMEOUT_SEC);
}

function transferLine(t: MethodResult<'models.show'>['transfer']): string {
  if (t.devices === 0) return 'no device has reported installing it yet';
  const whole = t.downloadedBytes + t.savedBytes;
  const pct = whole === 0 ? 0 : Math.floor((1000 * t.savedBytes) / whole) / 10;
  return `${t.devices} device(s) downloaded ${bytes(t.downloadedBytes)}, saved ${bytes(t.savedBytes)} (${pct} %) with ${t.patchedFiles} patched and ${t.fullFiles} whole file(s)${t.fallbacks > 0 ? `, ${t.fallbacks} patch fallback(s)` : ''}${t.reusedBytes > 0 ? `; ${bytes(t.reusedBytes)} already held` : ''}`;
}

async function show(ctx: CommandContext, arg: string | undefined): Promise<void> {
  const { name, version } = ref(ctx, arg, true);
  await ctx.withClient(async (c) => {
    const v = await c.call('models.show', { name, ...(version === undefined ? {} : { version }) });
    const m = v.signed.manifest;
    const spec = (s: (typeof m.inputs)[number]): string => `${s.name} ${s.dtype}[${s.shape.join(',')}]${s.range ? ` in [${s.range.min}, ${s.range.max}]` : ''}`;
    ctx.out(v, () =>
      [
        `model       ${v.name}@${v.version}`,
        `status      ${v.status} since ${time(v.statusAt)}`,
        `created     ${time(v.createdAt)}${v.expiresAt === null ? '' : ` · expires ${time(v.expiresAt)}`}`,
        `runtime     ${m.runtime}, entry ${m.entry}`,
        `inputs      ${m.inputs.map(spec).join('; ')}`,
        `outputs     ${m.outputs.map(spec).join('; ')}`,
        `golden      ${m.golden.vectors.length} vectors, tolerance abs ${m.golden.tolerance.abs} rel ${m.golden.tolerance.rel}`,
        `baseline    outputs ${Object.keys(m.baseline.outputs).join(', ') || 'none'} · inputs ${Object.keys(m.baseline.inputs).join(', ') || 'none'}`,
        `lineage     parent ${m.lineage.parent ?? '-'}, ${m.lineage.method}${m.lineage.dataSnapshot ? `, data ${m.lineage.dataSnapshot}` : ''}`,
        ...(m.lineage.federatedRound === undefined ? [] : [`            federated round ${m.lineage.federatedRound} (edgefleet fl status ${m.lineage.federatedRound})`]),
        ...(m.lineage.metrics && Object.keys(m.lineage.metrics).length > 0
          ? [`            ${Object.entries(m.lineage.metrics).map(([k, x]) => `${k} ${Number.isInteger(x) ? x : x.toPrecision(4)}`).join(' · ')}`]
          : []),
        ...(m.training ? [`training    ${m.training.loss}${m.training.personalLayers.length ? `, personal layers ${m.training.personalLayers.join(', ')}` : ''}`] : []),
        `signed      key ${v.signed.signature.keyId} (chain of ${v.signed.keyChain.length}) · manifest sha256 ${v.manifestSha256}`,
        'files:',
        ...m.files.map((f) => `  ${f.path}  ${bytes(f.size)}  ${f.sha256.slice(0, 16)}…`),
        `bandwidth   ${transferLine(v.transfer)}`,
        'audit:',
        ...v.audit.map((e) => `  ${time(e.ts)}  ${e.actor}  ${e.action}  ${JSON.stringify(e.detail)}`),
      ].join('\n'),
    );
  });
}

export async function runModelCommand(ctx: CommandContext, args: readonly string[]): Promise<void> {
  const [verb, a1, ...rest] = args;
  if (verb === 'publish') return publish(ctx, a1);
  if (verb === 'show') return show(ctx, a1);
  if (verb === 'list') {
    return ctx.withClient(async (c) => {
      const { versions } = await c.call('models.list', { ...(a1 === undefined ? {} : { name: a1 }) });
      ctx.out(versions, () =>
        versions.length === 0
          ? 'no model versions yet: publish one with `edgefleet model publish <dir> --name <name>`'
          : table(
              ['MODEL', 'VERSION', 'STATUS', 'RUNTIME', 'PARENT', 'SIZE', 'CREATED', 'EXPIRES'],
              versions.map((v) => [v.name, v.version, v.status, v.runtime, v.parent, bytes(v.sizeBytes), time(v.createdAt), v.expiresAt === null ? null : time(v.expiresAt)]),
            ),
      );
    });
  }
  const status = verb === undefined ? undefined : STATUS_VERBS[verb];
  if (status !== undefined) {
    const { name, version } = ref(ctx, a1);
    return ctx.withClient(async (c) => {
      const r = await c.call('models.setStatus', { name, version: version as number, status, ...(ctx.flags.reason === undefined ? {} : { reason: ctx.flags.reason }) });
      ctx.out(r, () => `${r.name}@${r.version}: ${r.previous} → ${r.status}`);
    });
  }
  if (verb === 'assign') {
    const { name, version } = ref(ctx, a1);
    if (rest.length === 0) throw ctx.usage('missing the device ids');
    const shadow = positiveInt(ctx, ctx.flags.shadow, '--shadow');
    return ctx.withClient(async (c) => {
      const r = await c.call('models.assign', { name, version: version as number, deviceIds: [...rest], ...(shadow === undefined ? {} : { shadow: { requests: shadow } }) });
      ctx.out(r, () =>
        [
          `${r.name}@${r.version} assigned (manifest ${r.manifestSha256.slice(0, 16)}…)`,
          table(['DEVICE', 'DESIRED', 'CHANGE'], r.devices.map((d) => [d.deviceId, d.desiredVersion, d.changed ? 'updated' : 'already so'])),
        ].join('\n'),
      );
    });
  }
  throw ctx.usage(verb === undefined ? 'missing the model command' : `unknown model command: ${verb}`);
}

export async function runKeyCommand(ctx: CommandContext, args: readonly string[]): Promise<void> {
  const [verb] = args;
  if (verb === 'show') {
    return ctx.withClient(async (c) => {
      const k = await c.call('keys.show', {});
      ctx.out(k, () =>
        [
          `signing key ${k.keyId} (since ${time(k.createdAt)})`,
          `public key  ${k.publicKey}`,
          `root        ${k.root.keyId}${k.chain.length > 0 ? ` → ${k.chain.map((e) => e.keyId).join(' → ')}` : ' (no rotation yet)'}`,
        ].join('\n'),
      );
    });
  }
  if (verb === 'rotate') {
    return ctx.withClient(async (c) => {
      const r = await c.call('keys.rotate', {});
      ctx.out(r, () =>
        [
          `fleet key rotated: ${r.previousKeyId} → ${r.keyId} (chain of ${r.chainLength})`,
          `devices that trust an earlier key follow the chain; provision new ones with ${r.publicKey}`,
        ].join('\n'),
      );
    });
  }
  throw ctx.usage(verb === undefined ? 'missing the key command' : `unknown key command: ${verb}`);
}
