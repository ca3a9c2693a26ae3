import { readFileSync } from 'node:fs';
import { ERRORS, EdgefleetError, RolloutPlan, Selector } from '../../proto/index.js';
import { table, time } from './format.js';
import { parseRef, positiveInt, type CommandContext } from './model.js';
import { headline, planSummary, plural, renderStatus, watchRollout } from './rollout-view.js';
import { processWatchIo } from './watch.js';

/**
 * `rollout`, `safe-mode` and `devices tag`: staged rollouts, the brake that holds them, and the tags
 * they select by. The renderers are pure (a view in, text out) so tests check them without a fleet.
 */

/** The flags these commands read. */
export interface RolloutFlags {
  json?: boolean | undefined;
  plan?: string | undefined;
  selector?: string | undefined;
  interval?: string | undefined;
  active?: boolean | undefined;
  name?: string | undefined;
  limit?: string | undefined;
  reason?: string | undefined;
  add?: string | undefined;
  remove?: string | undefined;
  tag?: string | undefined;
}

export type RolloutContext = Omit<CommandContext, 'flags'> & { flags: RolloutFlags };

export const ROLLOUT_USAGE = `  rollout start <name>@<version> [--plan <file>] [--selector <sel>]
                                       stage a version onto the selected devices (default: all) with
                                       a JSON plan {"steps":[...]} (default: 1 device → 5% → 25% →
                                       100%, analysis after each); the plan is checked here first
  rollout list [--name <model>] [--active] [--limit <n>]
                                       rollouts with their state, step and devices serving
  rollout status <id>                  state, step, waves, gates, cohorts, revert progress
  rollout watch <id> [--interval <sec>]
                                       live progress (every 0.5 s by default; --json: a line per
                                       change); exits 0 succeeded, 18 halted or aborted, 130 Ctrl-C
  rollout pause|resume|approve|abort <id> [--reason <text>]
  safe-mode on [--selector <sel>] [--reason <text>] | off [--selector <sel>] | status
                                       put devices on their pinned fallback models; rollouts that
                                       reach them wait
                                       <sel>: all, tag:<a>[,<b>...] (every tag), devices:<id>[,<id>...]`;


// ---------------------------------------------------------------------------------------------
// Parsing operator input

/** `a,b,c` → its items; null when an item is empty. */
export function parseList(text: string): string[] | null {
  const items = text.split(',').map((s) => s.trim());
  return items.some((s) => s === '') ? null : [...new Set(items)];
}

export type SelectorParse = { ok: true; selector: Selector } | { ok: false; error: string };

/** `all`, `tag:a,b` (devices carrying every tag) or `devices:d1,d2`. */
export function parseSelector(text: string): SelectorParse {
  const syntax = 'a selector is all, tag:<a>[,<b>...] or devices:<id>[,<id>...]';
  if (text === 'all') return { ok: true, selector: { kind: 'all' } };
  const m = /^(tag|devices):(.*)$/.exec(text);
  const items = m ? parseList(m[2] ?? '') : null;
  if (!m || !items) return { ok: false, error: `"${text}": ${syntax}` };
  const parsed = Selector.safeParse(m[1] === 'tag' ? { kind: 'tags', tags: items } : { kind: 'devices', deviceIds: items });
  if (parsed.success) return { ok: true, selector: parsed.data };
  const why = parsed.error.issues.map((i) => {
    const at = i.path[1];
    return typeof at === 'number' ? `"${items[at] ?? ''}": ${i.message}` : i.message;
  });
  return { ok: false, error: `"${text}": ${why.join('; ')}` };
}

/** The selector in the syntax `parseSelector` reads; long id lists are cut after `maxIds`. */
export function formatSelector(s: Selector, maxIds = Infinity): string {
  if (s.kind === 'all') return 'all';
  if (s.kind === 'tags') return `tag:${s.tags.join(',')}`;
  const shown = s.deviceIds.slice(0, maxIds).join(',');
  return s.deviceIds.length > maxIds ? `devices:${shown},… (${s.deviceIds.length} in all)` : `devices:${shown}`;
}

function issuePath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '(plan)';
  return path.map((p, i) => (typeof p === 'number' ? `[${p}]` : `${i === 0 ? '' : '.'}${String(p)}`)).join('');
}

export type PlanParse = { ok: true; plan: RolloutPlan; input: unknown } | { ok: false; errors: string[] };

/** A plan file's text: the plan, or every error in it, one per line as `steps[2].windowSec: …`. */
export function parsePlan(text: string): PlanParse {
  let input: unknown;
  try {
    input = JSON.parse(text);
  } catch (e) {
    return { ok: false, errors: [`(plan): not JSON: ${(e as Error).message}`] };
  }
  const r = RolloutPlan.safeParse(input);
  if (!r.success) return { ok: false, errors: r.error.issues.map((i) => `${issuePath(i.path)}: ${i.message}`) };
  return { ok: true, plan: r.data, input };
}

// Commands

function rolloutId(ctx: RolloutContext, arg: string | undefined): number {
  const id = Number(arg);
  if (arg === undefined || !Number.isInteger(id) || id < 1) throw ctx.usage('expected a rollout id (a positive integer)');
  return id;
}

function selectorFlag(ctx: RolloutContext): Selector | undefined {
  if (ctx.flags.selector === undefined) return undefined;
  const r = parseSelector(ctx.flags.selector);
  if (!r.ok) throw ctx.usage(`--selector ${r.error}`);
  return r.selector;
}

function listFlag(ctx: RolloutContext, flag: 'add' | 'remove' | 'tag'): string[] {
  const v = ctx.flags[flag];
  if (v === undefined) return [];
  const items = parseList(v);
  if (!items) throw ctx.usage(`--${flag} takes a comma-separated list without empty items`);
  return items;
}

/** The plan file, checked here so that every mistake shows at once, before anything is sent. */
function readPlan(path: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new EdgefleetError('EF_BAD_PARAMS', `cannot read the plan ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const r = parsePlan(text);
  if (!r.ok) throw new EdgefleetError('EF_PLAN_INVALID', `${path}: ${ERRORS.EF_PLAN_INVALID}`, { details: r.errors });
  return r.input;
}

async function start(ctx: RolloutContext, arg: string | undefined): Promise<void> {
  const ref = parseRef(arg);
  if (!ref || ref.version === undefined) throw ctx.usage('expected <name>@<version>');
  const selector = selectorFlag(ctx);
  const plan = ctx.flags.plan === undefined ? undefined : readPlan(ctx.flags.plan);
  const params = { name: ref.name, version: ref.version, ...(selector ? { selector } : {}), ...(plan === undefined ? {} : { plan }) };
  await ctx.withClient(async (c) => {
    const r = await c.call('rollouts.start', params);
    ctx.out(r, () => {
      const v = r.rollout;
      if (!v) return `nothing to start: ${r.noop ?? 'every selected device already has that version'}`;
      return [
        `started rollout ${v.id}: ${v.name}@${v.version} to ${formatSelector(v.selector, 5)}`,
        `plan        ${planSummary(v.plan)}`,
        `follow it:  edgefleet rollout watch ${v.id}`,
      ].join('\n');
    });
  });
}

const COMMAND_METHODS = { pause: 'rollouts.pause', resume: 'rollouts.resume', approve: 'rollouts.approve', abort: 'rollouts.abort' } as const;

async function watch(ctx: RolloutContext, id: number): Promise<number> {
  const intervalSec = ctx.flags.interval === undefined ? 0.5 : Number(ctx.flags.interval);
  if (!Number.isFinite(intervalSec) || intervalSec < 0.1) throw ctx.usage('--interval takes a number of seconds, at least 0.1');
  const ac = new AbortController();
  const onSigint = (): void => ac.abort();
  process.once('SIGINT', onSigint);
  try {
    return await ctx.withClient((c) =>
      watchRollout(
        processWatchIo(() => c.call('rollouts.show', { id }), ctx.flags.json === true),
        intervalSec * 1000,
        ac.signal,
      ),
    );
  } finally {
    process.off('SIGINT', onSigint);
  }
}

export async function runRolloutCommand(ctx: RolloutContext, args: readonly string[]): Promise<number | void> {
  const [verb, a1] = args;
  if (verb === 'start') return start(ctx, a1);
  if (verb === 'watch') return watch(ctx, rolloutId(ctx, a1));
  if (verb === 'status') {
    const id = rolloutId(ctx, a1);
    return ctx.withClient(async (c) => {
      const v = await c.call('rollouts.show', { id });
      ctx.out(v, () => renderStatus(v));
    });
  }
  if (verb === 'list') {
    const limit = positiveInt(ctx, ctx.flags.limit, '--limit');
    return ctx.withClient(async (c) => {
      const { rollouts } = await c.call('rollouts.list', {
        ...(ctx.flags.name === undefined ? {} : { name: ctx.flags.name }),
        ...(ctx.flags.active ? { active: true } : {}),
        ...(limit === undefined ? {} : { limit }),
      });
      ctx.out({ rollouts }, () =>
        rollouts.length === 0
          ? 'no rollouts: start one with `edgefleet rollout start <name>@<version>`'
          : table(
              ['ID', 'MODEL', 'STATE', 'STEP', 'SERVING', 'SELECTOR', 'BY', 'CREATED'],
              rollouts.map((v) => [
                v.id,
                `${v.name}@${v.version}`,
                v.status.state,
                `${Math.min(v.status.step + 1, v.plan.steps.length)}/${v.plan.steps.length}`,
                `${v.status.total.serving}/${v.status.selected}`,
                formatSelector(v.selector, 3),
                v.createdBy,
                time(v.createdAt),
              ]),
            ),
      );
    });
  }
  if (verb === 'pause' || verb === 'resume' || verb === 'approve' || verb === 'abort') {
    const id = rolloutId(ctx, a1);
    const reason = ctx.flags.reason;
    return ctx.withClient(async (c) => {
      const v = await c.call(COMMAND_METHODS[verb], { id, ...(reason === undefined ? {} : { reason }) });
      ctx.out(v, () => `${verb} recorded: ${headline(v)}${v.status.reason ? `\nreason      ${v.status.reason}` : ''}`);
    });
  }
  throw ctx.usage(verb === undefined ? 'missing the rollout command' : `unknown rollout command: ${verb}`);
}

export async function runSafeModeCommand(ctx: RolloutContext, args: readonly string[]): Promise<void> {
  const [verb] = args;
  if (verb === 'on') {
    const selector = selectorFlag(ctx);
    const reason = ctx.flags.reason;
    return ctx.withClient(async (c) => {
      const r = await c.call('safeMode.on', { ...(selector ? { selector } : {}), ...(reason === undefined ? {} : { reason }) });
      ctx.out(r, () =>
        [
          `safe mode on for ${formatSelector(r.record.selector, 5)} (record ${r.record.id}): ${plural(r.devices, 'device')} go to their fallback models`,
          'rollouts that reach them wait; follow it with `edgefleet safe-mode status`',
        ].join('\n'),
      );
    });
  }
  if (verb === 'off') {
    const selector = selectorFlag(ctx);
    return ctx.withClient(async (c) => {
      const r = await c.call('safeMode.off', selector ? { selector } : {});
      ctx.out(r, () =>
        r.ended.length === 0
          ? `no safe-mode record${selector ? ` with selector ${formatSelector(selector, 5)}` : ''}: nothing ended`
          : `safe mode off: ended record(s) ${r.ended.map((e) => `${e.id} (${formatSelector(e.selector, 5)})`).join(', ')}; ${plural(r.devices, 'device')} return to their desired state`,
      );
    });
  }
  if (verb === 'status') {
    return ctx.withClient(async (c) => {
      const r = await c.call('safeMode.status', {});
      ctx.out(r, () =>
        r.records.length === 0 && r.devices === 0
          ? 'safe mode is off everywhere'
          : [
              table(['ID', 'SELECTOR', 'SINCE', 'BY', 'REASON'], r.records.map((e) => [e.id, formatSelector(e.selector, 5), time(e.since), e.by, e.reason])),
              `devices     ${r.devices} in safe mode, ${r.converged} on their fallback models (${r.devices - r.converged} still switching)`,
            ].join('\n'),
      );
    });
  }
  throw ctx.usage(verb === undefined ? 'missing the safe-mode command' : `unknown safe-mode command: ${verb}`);
}

/** `--tag a,b` of `devices add`. */
export function tagFlag(ctx: RolloutContext): string[] | undefined {
  return ctx.flags.tag === undefined ? undefined : listFlag(ctx, 'tag');
}

export function tagsCell(tags: readonly string[]): string | null {
  return tags.length > 0 ? tags.join(',') : null;
}

/** `devices tag <id>[,<id>...] [--add a,b] [--remove c]`. */
export async function runDevicesTag(ctx: RolloutContext, args: readonly string[]): Promise<void> {
  const deviceIds = [...new Set(args.flatMap((a) => parseList(a) ?? []))];
  if (deviceIds.length === 0 || args.some((a) => parseList(a) === null)) throw ctx.usage('devices tag takes <id>[,<id>...]');
  const add = listFlag(ctx, 'add');
  const remove = listFlag(ctx, 'remove');
  if (add.length === 0 && remove.length === 0) throw ctx.usage('devices tag needs --add and/or --remove');
  await ctx.withClient(async (c) => {
    const r = await c.call('devices.tag', { deviceIds, add, remove });
    ctx.out(r, () => table(['DEVICE', 'TAGS'], r.devices.map((d) => [d.deviceId, tagsCell(d.tags)])));
  });
}
