/**
 * What `rollout status` and `rollout watch` print: pure renderers of a RolloutView (progress bars
 * per wave, the gate table, the cohorts) and the watch loop, kept apart from the commands so they
 * can be tested without a fleet.
 */
import {
  EXIT,
  FINAL_ROLLOUT_STATES,
  type CohortFigures,
  type GateResult,
  type RolloutPlan,
  type RolloutStep,
  type RolloutView,
  type WaveCounts,
  type WaveStep,
} from '../../proto/index.js';
import { ago, duration, pct, table, time } from './format.js';
import { formatSelector } from './rollout.js';
import { WATCH_INTERRUPTED, watchView, type WatchIo as WatchIoOf } from './watch.js';

/** `rollout watch` exit codes; 130 is the shell's convention for "interrupted by SIGINT". */
export const WATCH_EXIT = { succeeded: EXIT.OK, failed: EXIT.CLI_ROLLOUT_FAILED, interrupted: WATCH_INTERRUPTED } as const;
// ---------------------------------------------------------------------------------------------
// Rendering

export const plural = (n: number, what: string): string => `${n} ${what}${n === 1 ? '' : 's'}`;

export function waveTarget(w: WaveStep): string {
  return w.percent !== undefined ? `${w.percent}%` : plural(w.count ?? 0, 'device');
}

export function describeStep(s: RolloutStep): string {
  switch (s.type) {
    case 'wave':
      return `wave to ${waveTarget(s)}${s.percent === undefined ? '' : ' of the selected devices'} (timeout ${duration(s.timeoutSec)}, applied at ${pct(s.minAppliedShare)})`;
    case 'analysis':
      return `analysis over ${duration(s.windowSec)}, ${plural(s.minDevices, 'device')} reporting at least (timeout ${duration(s.timeoutSec)})`;
    case 'pause':
      return s.untilApproved ? 'pause until approved (rollout approve)' : `pause for ${duration(s.seconds ?? 0)}`;
  }
}

function stepToken(s: RolloutStep): string {
  if (s.type === 'wave') return waveTarget(s);
  if (s.type === 'analysis') return `analysis ${duration(s.windowSec)}`;
  return s.untilApproved ? 'approval' : `pause ${duration(s.seconds ?? 0)}`;
}

/** One line: `1 device → 5% → 25% → 100%, analysis after each`, or every step when the plan is less regular. */
export function planSummary(plan: RolloutPlan): string {
  const waves = plan.steps.filter((s): s is WaveStep => s.type === 'wave');
  const alternating = plan.steps.length === 2 * waves.length && plan.steps.every((s, i) => s.type === (i % 2 === 0 ? 'wave' : 'analysis'));
  return alternating ? `${waves.map(waveTarget).join(' → ')}, analysis after each` : plan.steps.map(stepToken).join(' → ');
}

export const BAR_WIDTH = 20;

/**
 * `width` cells: █ serving, × failed, ░ the rest, by largest remainder. A count that is not zero
 * gets a cell, so 49 of 50 never looks done and one failure never disappears.
 */
export function progressBar(c: Pick<WaveCounts, 'members' | 'serving' | 'failed'>, width = BAR_WIDTH): string {
  const w = Math.max(3, Math.floor(width));
  const serving = Math.max(0, c.serving);
  const failed = Math.max(0, c.failed);
  const counts = [serving, failed, Math.max(0, c.members - serving - failed)];
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return '░'.repeat(w);
  const exact = counts.map((n) => (n / total) * w);
  const cells = exact.map((x, i) => ((counts[i] ?? 0) > 0 ? Math.max(1, Math.floor(x)) : 0));
  const sum = (): number => cells.reduce((a, b) => a + b, 0);
  while (sum() > w) {
    const i = cells.indexOf(Math.max(...cells));
    cells[i] = (cells[i] ?? 1) - 1;
  }
  while (sum() < w) {
    const gaps = cells.map((n, i) => ((counts[i] ?? 0) > 0 ? (exact[i] ?? 0) - n : -Infinity));
    const i = gaps.indexOf(Math.max(...gaps));
    cells[i] = (cells[i] ?? 0) + 1;
  }
  const [s = 0, f = 0, rest = 0] = cells;
  return '█'.repeat(s) + '×'.repeat(f) + '░'.repeat(rest);
}

/** One line per wave of the plan, counts beside a bar; waves not reached say so. */
export function waveLines(v: RolloutView, width = BAR_WIDTH): string[] {
  const waves = v.plan.steps.filter((s): s is WaveStep => s.type === 'wave');
  const targets = waves.map(waveTarget);
  const labelWidth = `wave ${waves.length}`.length;
  const targetWidth = Math.max(...targets.map((t) => t.length));
  return waves.map((_, i) => {
    const head = `${`wave ${i + 1}`.padEnd(labelWidth)}  ${(targets[i] ?? '').padEnd(targetWidth)}  `;
    const c = v.status.waves[i];
    return c ? `${head}[${progressBar(c, width)}]  ${c.serving}/${c.members} serving · ${c.failed} failed · ${c.pending} pending` : `${head}not started`;
  });
}

function gateFigure(gate: GateResult['gate'], n: number | null): string {
  if (n === null) return '-';
  if (gate === 'latency') return `${n.toFixed(2)}×`;
  if (gate === 'confidence') return n.toFixed(3);
  return pct(n, 2);
}

export function gateTable(gates: readonly GateResult[]): string {
  return table(
    ['GATE', 'VERDICT', 'VALUE', 'LIMIT', 'DETAIL'],
    gates.map((g) => [g.gate, g.verdict, gateFigure(g.gate, g.value), gateFigure(g.gate, g.limit), g.detail ?? '']),
  );
}

export function cohortTable(cohorts: Record<string, CohortFigures | null>): string {
  const rows = Object.entries(cohorts).flatMap(([name, c]) =>
    c ? [[name, c.devices, c.requests, pct(c.errorRate, 2), c.p95Ms === null ? null : `${Math.round(c.p95Ms)} ms`, c.meanConfidence?.toFixed(3)]] : [],
  );
  return table(['COHORT', 'DEVICES', 'REQUESTS', 'ERROR RATE', 'P95', 'CONFIDENCE'], rows);
}

const indent = (text: string): string[] => text.split('\n').map((l) => `  ${l}`);

/** `3/8 analysis over 2m, … · for 40s`, or `8/8 plan done`. Elapsed time only when `now` is given. */
function stepLine(v: RolloutView, now: number | undefined): string {
  const n = v.plan.steps.length;
  const step = v.plan.steps[v.status.step];
  if (!step) return `${n}/${n} plan done`;
  const since = now === undefined ? '' : ` · for ${duration((now - v.status.stepStartedAt) / 1000)}`;
  return `${v.status.step + 1}/${n} ${describeStep(step)}${since}`;
}

/** `rollout 7 iris@3 · paused · step 4/8`: what the one-line commands print. */
export function headline(v: RolloutView): string {
  const n = v.plan.steps.length;
  return `rollout ${v.id} ${v.name}@${v.version} · ${v.status.state} · step ${Math.min(v.status.step + 1, n)}/${n}`;
}

function revertLine(r: NonNullable<RolloutView['status']['revert']>, now: number | undefined): string {
  const since = now === undefined ? '' : ` (since ${ago(r.startedAt, now)})`;
  return `[${progressBar({ members: r.devices, serving: r.reverted, failed: 0 })}]  ${r.reverted}/${r.devices} back on their previous version${since}`;
}

/** `rollout status`: everything the fleet says about one rollout. */
export function renderStatus(v: RolloutView, now = Date.now()): string {
  const s = v.status;
  const lines = [
    `rollout     ${v.id}: ${v.name}@${v.version} to ${formatSelector(v.selector, 5)}, by ${v.createdBy} ${ago(v.createdAt, now)}`,
    `state       ${s.state}${s.reason ? ` — ${s.reason}` : ''}`,
    `step        ${stepLine(v, now)}`,
    `plan        ${planSummary(v.plan)}`,
    `devices     ${s.selected} selected; the current wave wants ${s.wanted} on version ${v.version}`,
  ];
  if (s.heldBy) lines.push(`held by     ${s.heldBy}: nothing advances until safe mode is off`);
  if (s.revert) lines.push(`revert      ${revertLine(s.revert, now)}`);
  if (s.finishedAt !== null) lines.push(`finished    ${time(s.finishedAt)}`);
  lines.push('waves:', ...waveLines(v).map((l) => `  ${l}`));
  lines.push(`  total  ${s.total.members} moved · ${s.total.serving} serving (${s.total.committed} committed) · ${s.total.failed} failed · ${s.total.pending} pending`);
  if (s.gates.length > 0) lines.push(`gates${s.verdict ? ` (verdict ${s.verdict})` : ''}:`, ...indent(gateTable(s.gates)));
  else lines.push('gates       none judged yet');
  if (s.candidate || s.stable) lines.push('cohorts:', ...indent(cohortTable({ candidate: s.candidate, stable: s.stable, baseline: s.baseline })));
  else lines.push('cohorts     no figures yet');
  lines.push(`reports     ${s.contradictions} contradicted the fleet's state (counted, never judged)`);
  return lines.join('\n');
}

/** `rollout watch`'s block. Without `now` it holds no clock, so equal status renders equal text. */
export function renderWatch(v: RolloutView, now?: number, width = BAR_WIDTH): string {
  const s = v.status;
  const lines = [`${headline(v)}: ${stepLine(v, now).replace(/^\d+\/\d+ /, '')}`, ...waveLines(v, width)];
  if (s.gates.length > 0) lines.push(...gateTable(s.gates).split('\n'));
  if (s.reason) lines.push(`reason   ${s.reason}`);
  if (s.heldBy) lines.push(`held by  ${s.heldBy}`);
  if (s.revert) lines.push(`revert   ${revertLine(s.revert, now)}`);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// Watching

export type WatchIo = WatchIoOf<RolloutView>;

/** Polls until the rollout ends (or `signal` aborts, e.g. on Ctrl-C) and returns the exit code. */
export function watchRollout(io: WatchIo, intervalMs: number, signal: AbortSignal): Promise<number> {
  return watchView(io, intervalMs, signal, {
    key: (v) => JSON.stringify({ ...v, status: { ...v.status, updatedAt: 0 } }),
    render: (v, now) => renderWatch(v, now),
    finish: (v, out) => {
      if (!FINAL_ROLLOUT_STATES.includes(v.status.state)) return null;
      if (v.status.state === 'succeeded') {
        if (!out.json) out.stdout(`rollout ${v.id} succeeded: ${v.name}@${v.version} on ${v.status.total.serving} device(s)\n`);
        return WATCH_EXIT.succeeded;
      }
      const r = v.status.revert;
      out.stderr(`edgefleet: rollout ${v.id} ${v.status.state}${v.status.reason ? `: ${v.status.reason}` : ''}${r ? ` (${r.reverted}/${r.devices} reverted so far)` : ''}\n`);
      return WATCH_EXIT.failed;
    },
    stopped: (seen) => (seen ? ` rollout ${seen.id} (${seen.status.state}); it carries on without you` : ''),
  });
}

// ---------------------------------------------------------------------------------------------
