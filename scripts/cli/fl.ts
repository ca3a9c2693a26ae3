import { readFileSync } from 'node:fs';
import { EXIT, EdgefleetError, RoundConfig, StrategySpec } from '../../proto/index.js';
import type { OpsClient } from '../ops-client.js';
import { duration, time } from './format.js';
import { parseRef, positiveInt, type CommandContext } from './model.js';
import { parseSelector } from './rollout.js';
import { WATCH_EXIT, headline, renderRoundStatus, renderStarted, roundsTable, schedulesTable, strategyText, watchRound } from './fl-view.js';
import { processWatchIo } from './watch.js';

/**
 * `fl`: federated learning rounds and their schedules. The round config is built and checked here
 * (a file, the model argument, then the flags) so that every mistake shows at once, before anything
 * is sent; the renderers live in fl-view.ts.
 */

/** The flags that override fields of a round config. */
export interface RoundFlags {
  base?: string | undefined;
  selector?: string | undefined;
  'min-samples'?: string | undefined;
  fraction?: string | undefined;
  min?: string | undefined;
  max?: string | undefined;
  deadline?: string | undefined;
  strategy?: string | undefined;
}

/** The flags these commands read. */
export interface FlFlags extends RoundFlags {
  json?: boolean | undefined;
  config?: string | undefined;
  watch?: boolean | undefined;
  model?: string | undefined;
  active?: boolean | undefined;
  limit?: string | undefined;
  interval?: string | undefined;
  every?: string | undefined;
}

export type FlContext = Omit<CommandContext, 'flags'> & { flags: FlFlags };

export const STRATEGY_NAMES = StrategySpec.options.map((o) => o.shape.name.value);

export const FL_USAGE = `  fl start <model>[@<base>] [--config <file>] [--base <version>] [--selector <sel>] [--min-samples <n>]
          [--fraction <share>] [--min <n>] [--max <n>] [--deadline <duration>] [--strategy <name>] [--watch]
                                       start a federated round: a JSON RoundConfig file (proto/fl.ts)
                                       whose fields the flags override; checked here first
                                       <name>: ${STRATEGY_NAMES.join(', ')}
  fl status [<round>] [--model <m>] [--active] [--limit <n>]
                                       rounds in a table, or one round in detail
  fl watch <round> [--interval <sec>]  live progress (every 1 s by default; --json: a line per
                                       change); exits 0 succeeded, ${WATCH_EXIT.failed} failed or aborted, 130 Ctrl-C
  fl abort <round>                     stop a collecting or evaluating round
  fl schedule <model> --every <duration> [--config <file>] [the fl start flags]
                                       a round every 30m, 6h, 1d or <seconds> (at least 60 s; the first now)
  fl schedules | fl unschedule <id>    the schedules; remove one`;

// ---------------------------------------------------------------------------------------------
// Parsing operator input

/** `90`, `30m`, `6h`, `1d`, `1h30m` → seconds; null when it is none of these. */
export function parseDuration(text: string): number | null {
  const t = text.trim();
  if (/^\d+(\.\d+)?$/.test(t)) return Number(t);
  const m = /^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(t);
  if (!m || t === '') return null;
  const [d = 0, h = 0, min = 0, s = 0] = m.slice(1).map((x) => (x === undefined ? 0 : Number(x)));
  return d * 86_400 + h * 3600 + min * 60 + s;
}

/** Where each flag lands in a RoundConfig, so an error names the flag the operator typed. */
const FLAG_PATHS: Record<keyof RoundFlags, string> = { base: 'baseVersion', selector: 'selection.selector', 'min-samples': 'selection.minSamples', fraction: 'selection.fraction', min: 'selection.minParticipants', max: 'selection.maxParticipants', deadline: 'deadlineSec', strategy: 'strategy' };

function issuePath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '(config)';
  return path.map((p, i) => (typeof p === 'number' ? `[${p}]` : `${i === 0 ? '' : '.'}${String(p)}`)).join('');
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Sets `a.b` on `obj`, making `a` when absent; a non-object `a` is left for the schema to report. */
function setPath(obj: Record<string, unknown>, path: string, value: unknown): void {
  const [head = '', tail] = path.split('.');
  if (tail === undefined) {
    obj[head] = value;
    return;
  }
  if (obj[head] === undefined) obj[head] = {};
  const child = obj[head];
  if (isRecord(child)) child[tail] = value;
}

export type RoundConfigBuild = { ok: true; input: Record<string, unknown>; config: RoundConfig } | { ok: false; errors: string[] };

/**
 * The round config from the file's text (if any), the `<model>[@<base>]` argument and the flags,
 * in that order of precedence (later wins); or every error in them, one per line.
 */
export function buildRoundConfig(fileText: string | undefined, modelArg: string | undefined, flags: RoundFlags): RoundConfigBuild {
  const errors: string[] = [];
  let input: Record<string, unknown> = {};
  if (fileText !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(fileText);
    } catch (e) {
      return { ok: false, errors: [`(config): not JSON: ${(e as Error).message}`] };
    }
    if (!isRecord(parsed)) return { ok: false, errors: ['(config): a round config is a JSON object'] };
    input = parsed;
  }
  const ref = modelArg === undefined ? null : parseRef(modelArg, true);
  if (modelArg !== undefined) input.model = ref ? ref.name : modelArg;
  if (ref?.version !== undefined) input.baseVersion = ref.version;
  const number = (flag: keyof RoundFlags, text: string): number | undefined => {
    const n = text.trim() === '' ? NaN : Number(text);
    if (Number.isFinite(n)) return n;
    errors.push(`--${flag}: "${text}" is not a number`);
    return undefined;
  };
  const values: Partial<Record<keyof RoundFlags, unknown>> = {};
  if (flags.selector !== undefined) {
    const r = parseSelector(flags.selector);
    if (r.ok) values.selector = r.selector;
    else errors.push(`--selector ${r.error}`);
  }
  for (const f of ['base', 'min-samples', 'min', 'max'] as const) {
    const text = flags[f];
    if (text !== undefined) values[f] = number(f, text);
  }
  if (flags.fraction !== undefined) {
    // `25%` reads as 0.25: operators say shares both ways.
    const pct = /^\s*(.*?)\s*%\s*$/.exec(flags.fraction);
    const n = number('fraction', pct ? (pct[1] ?? '') : flags.fraction);
    values.fraction = n === undefined || !pct ? n : n / 100;
  }
  if (flags.deadline !== undefined) {
    values.deadline = parseDuration(flags.deadline) ?? undefined;
    if (values.deadline === undefined) errors.push(`--deadline: "${flags.deadline}" is not a duration (seconds, or like 90s, 10m, 2h)`);
  }
  let replacedStrategy = false;
  if (flags.strategy !== undefined) {
    if (!(STRATEGY_NAMES as readonly string[]).includes(flags.strategy)) errors.push(`--strategy: "${flags.strategy}" is none of ${STRATEGY_NAMES.join(', ')}`);
    else if (isRecord(input.strategy) && input.strategy.name === flags.strategy) values.strategy = input.strategy;
    else {
      values.strategy = { name: flags.strategy };
      replacedStrategy = true;
    }
  }
  if (values.base !== undefined && ref?.version !== undefined && values.base !== ref.version) errors.push(`--base: ${flags.base} contradicts ${modelArg}`);
  for (const [flag, value] of Object.entries(values)) if (value !== undefined) setPath(input, FLAG_PATHS[flag as keyof RoundFlags], value);

  const r = RoundConfig.safeParse(input);
  if (r.success && errors.length === 0) return { ok: true, input, config: r.data };
  const set = (Object.keys(FLAG_PATHS) as (keyof RoundFlags)[]).filter((f) => values[f] !== undefined);
  for (const issue of r.error?.issues ?? []) {
    const path = issuePath(issue.path);
    const flag = set.find((f) => path === FLAG_PATHS[f] || path.startsWith(`${FLAG_PATHS[f]}.`));
    const hint = flag === 'strategy' && replacedStrategy && path !== 'strategy' ? ` (--strategy ${flags.strategy} takes its settings from the --config file)` : '';
    errors.push(`${path}${flag && !hint ? ` (--${flag})` : ''}: ${issue.message}${hint}`);
  }
  return { ok: false, errors };
}

// Commands

function positiveId(ctx: FlContext, arg: string | undefined, what: string): number {
  const id = Number(arg);
  if (arg === undefined || !Number.isInteger(id) || id < 1) throw ctx.usage(`expected a ${what} id (a positive integer)`);
  return id;
}

/** The config from `--config`, the model argument and the flags, checked here so every mistake shows at once. */
function roundConfig(ctx: FlContext, modelArg: string | undefined): Record<string, unknown> {
  const path = ctx.flags.config;
  if (modelArg === undefined && path === undefined) throw ctx.usage('expected <model> (or a --config file naming it)');
  let text: string | undefined;
  if (path !== undefined) {
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      throw new EdgefleetError('EF_BAD_PARAMS', `cannot read the config ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  }
  const r = buildRoundConfig(text, modelArg, ctx.flags);
  if (!r.ok) throw new EdgefleetError('EF_BAD_PARAMS', `the round config is not valid: ${r.errors.join('; ')}`, { details: r.errors });
  return r.input;
}

async function follow(ctx: FlContext, c: OpsClient, id: number): Promise<number> {
  const intervalSec = ctx.flags.interval === undefined ? 1 : Number(ctx.flags.interval);
  if (!Number.isFinite(intervalSec) || intervalSec < 0.1) throw ctx.usage('--interval takes a number of seconds, at least 0.1');
  const ac = new AbortController();
  const onSigint = (): void => ac.abort();
  process.once('SIGINT', onSigint);
  try {
    return await watchRound(
      processWatchIo(() => c.call('fl.show', { id }), ctx.flags.json === true),
      intervalSec * 1000,
      ac.signal,
    );
  } finally {
    process.off('SIGINT', onSigint);
  }
}

async function start(ctx: FlContext, modelArg: string | undefined): Promise<number> {
  const config = roundConfig(ctx, modelArg);
  return ctx.withClient(async (c) => {
    const v = await c.call('fl.start', { config });
    // With --json --watch the watch's first line is this view already.
    if (!(ctx.flags.watch && ctx.flags.json)) ctx.out(v, () => renderStarted(v));
    if (v.state === 'failed') return WATCH_EXIT.failed;
    return ctx.flags.watch ? follow(ctx, c, v.id) : EXIT.OK;
  });
}

async function schedule(ctx: FlContext, modelArg: string | undefined): Promise<void> {
  if (ctx.flags.every === undefined) throw ctx.usage('fl schedule needs --every <duration>');
  const everySec = parseDuration(ctx.flags.every);
  if (everySec === null || !Number.isInteger(everySec) || everySec < 60) throw ctx.usage('--every takes a whole number of seconds, at least 60, or a duration like 30m, 6h, 1d');
  const config = roundConfig(ctx, modelArg);
  await ctx.withClient(async (c) => {
    const s = await c.call('fl.schedule', { config, everySec });
    ctx.out(s, () =>
      [
        `schedule ${s.id}: a round of ${s.config.model}@${s.config.baseVersion ?? 'production'} every ${duration(s.everySec)} (${strategyText(s.config.strategy)})`,
        `next        ${time(s.nextAt)}; a round still running skips its turn`,
        `stop it:    edgefleet fl unschedule ${s.id}`,
      ].join('\n'),
    );
  });
}

export async function runFlCommand(ctx: FlContext, args: readonly string[]): Promise<number | void> {
  const [verb, a1] = args;
  if (verb === 'start') return start(ctx, a1);
  if (verb === 'schedule') return schedule(ctx, a1);
  if (verb === 'watch') {
    const id = positiveId(ctx, a1, 'round');
    return ctx.withClient((c) => follow(ctx, c, id));
  }
  if (verb === 'status' && a1 !== undefined) {
    const id = positiveId(ctx, a1, 'round');
    return ctx.withClient(async (c) => {
      const v = await c.call('fl.show', { id });
      ctx.out(v, () => renderRoundStatus(v));
    });
  }
  if (verb === 'status') {
    const limit = positiveInt(ctx, ctx.flags.limit, '--limit');
    return ctx.withClient(async (c) => {
      const { rounds } = await c.call('fl.list', {
        ...(ctx.flags.model === undefined ? {} : { model: ctx.flags.model }),
        ...(ctx.flags.active ? { active: true } : {}),
        ...(limit === undefined ? {} : { limit }),
      });
      ctx.out({ rounds }, () => (rounds.length === 0 ? 'no rounds: start one with `edgefleet fl start <model>`' : roundsTable(rounds)));
    });
  }
  if (verb === 'abort') {
    const id = positiveId(ctx, a1, 'round');
    return ctx.withClient(async (c) => {
      const v = await c.call('fl.abort', { id });
      ctx.out(v, () => `abort recorded: ${headline(v)}${v.reason ? `\nreason      ${v.reason}` : ''}`);
    });
  }
  if (verb === 'schedules') {
    return ctx.withClient(async (c) => {
      const { schedules } = await c.call('fl.schedules', {});
      ctx.out({ schedules }, () => (schedules.length === 0 ? 'no schedules: add one with `edgefleet fl schedule <model> --every <duration>`' : schedulesTable(schedules)));
    });
  }
  if (verb === 'unschedule') {
    const id = positiveId(ctx, a1, 'schedule');
    return ctx.withClient(async (c) => {
      const r = await c.call('fl.unschedule', { id });
      ctx.out(r, () => (r.removed ? `removed schedule ${id}; rounds it started carry on` : `no schedule ${id}: nothing removed`));
      return r.removed ? EXIT.OK : EXIT.CLI_NOT_FOUND;
    });
  }
  throw ctx.usage(verb === undefined ? 'missing the fl command' : `unknown fl command: ${verb}`);
}
