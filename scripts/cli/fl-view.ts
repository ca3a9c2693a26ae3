/**
 * What `fl status`, `fl start` and `fl watch` print: pure renderers of a RoundView and the watch
 * loop, kept apart from the commands so they can be tested without a fleet (as rollout-view.ts).
 */
import { EXIT, FINAL_ROUND_STATES, type FlSchedule, type RoundConfig, type RoundState, type RoundView, type StrategySpec } from '../../proto/index.js';
import { ago, duration, pct, table, time } from './format.js';
import { formatSelector } from './rollout.js';
import { BAR_WIDTH, plural, progressBar } from './rollout-view.js';
import { WATCH_INTERRUPTED, watchView, type WatchIo as WatchIoOf } from './watch.js';

/** `fl watch` exit codes; 130 is the shell's convention for "interrupted by SIGINT". */
export const WATCH_EXIT = { succeeded: EXIT.OK, failed: EXIT.CLI_ROUND_FAILED, interrupted: WATCH_INTERRUPTED } as const;

/** The exit code a round in `state` ends a watch with; null while the round is still going. */
export function watchExit(state: RoundState): number | null {
  if (!FINAL_ROUND_STATES.includes(state)) return null;
  return state === 'succeeded' ? WATCH_EXIT.succeeded : WATCH_EXIT.failed;
}

// ---------------------------------------------------------------------------------------------
// Rendering

/** A figure without false precision: integers whole, the rest to 3 significant digits. */
const num = (n: number): string => (Number.isInteger(n) ? String(n) : String(Number(n.toPrecision(3))));
const loss = (n: number): string => n.toFixed(4);

/** `fedavg`, `trimmed-mean (20% trimmed each side)`, `dp-fedavg (clip 1, noise ×1.1, δ 1e-5)`. */
const bucketText = (size: number | undefined): string => (size && size > 1 ? `, over means of ${size} updates` : '');

export function strategyText(s: StrategySpec): string {
  switch (s.name) {
    case 'fedavg-clipped':
      return `${s.name} (norm bound ${num(s.normBound)})`;
    case 'trimmed-mean':
      return `${s.name} (${pct(s.trimShare)} trimmed each side${bucketText(s.bucketSize)})`;
    case 'median':
      return s.bucketSize && s.bucketSize > 1 ? `${s.name} (${bucketText(s.bucketSize).slice(2)})` : s.name;
    case 'dp-fedavg':
      return `${s.name} (clip ${num(s.clipNorm)}, noise ×${num(s.noiseMultiplier)}, δ ${s.delta.toExponential()})`;
    default:
      return s.name;
  }
}

/** `3 busy, 1 too-few-samples`: most frequent first; '' when there are none. */
export function byReason(counts: Record<string, number>): string {
  return Object.entries(counts)
    .filter(([, n]) => n > 0)
    .sort(([a, x], [b, y]) => y - x || a.localeCompare(b))
    .map(([r, n]) => `${n} ${r}`)
    .join(', ');
}

const total = (counts: Record<string, number>): number => Object.values(counts).reduce((a, b) => a + b, 0);

/** `round 12 iris@3 · collecting · 8 of 12 eligible invited`: what the one-line commands print. */
export function headline(v: RoundView): string {
  return `round ${v.id} ${v.model}@${v.baseVersion} · ${v.state} · ${v.counts.invited} of ${v.counts.eligible} eligible invited`;
}

/** Time left to send updates, or when collection closed. */
export function deadlineText(v: RoundView, now: number): string {
  if (v.state === 'collecting' && v.deadlineAt > now) return `in ${duration((v.deadlineAt - now) / 1000)} (${time(v.deadlineAt)})`;
  return `${v.state === 'collecting' ? 'passed' : 'collection closed'} ${ago(v.deadlineAt, now)} (${time(v.deadlineAt)})`;
}

/** `[██×░░]  5/8 updates · 1 declined · 1 failed · 1 waiting`: the bar fills with updates; declines and failures show as ×. */
export function updatesLine(c: RoundView['counts'], width = BAR_WIDTH): string {
  const gone = c.declined + c.failed;
  const waiting = Math.max(0, c.invited - c.updates - gone);
  return `[${progressBar({ members: c.invited, serving: c.updates, failed: gone }, width)}]  ${c.updates}/${c.invited} updates · ${c.declined} declined · ${c.failed} failed · ${waiting} waiting`;
}

function participationLine(v: RoundView): string {
  const d = byReason(v.declines);
  return `${v.counts.eligible} eligible · ${v.counts.invited} invited · ${v.counts.joined} joined · ${v.counts.declined} declined${d ? ` (${d})` : ''}`;
}

function rejectedLine(v: RoundView): string | null {
  const n = total(v.rejected);
  return n === 0 ? null : `${plural(n, 'update')} refused (${byReason(v.rejected)})`;
}

function localLine(l: NonNullable<RoundView['local']>): string {
  const acc = l.accuracyBefore === null || l.accuracyAfter === null ? '' : ` · accuracy ${pct(l.accuracyBefore)} → ${pct(l.accuracyAfter)}`;
  return `loss ${loss(l.lossBefore)} → ${loss(l.lossAfter)}${acc} (means over the updates, by samples)`;
}

function aggregateLine(a: NonNullable<RoundView['aggregate']>): string {
  const { clients, ...rest } = a.info;
  const info = Object.entries(rest).map(([k, n]) => `${k} ${num(n)}`);
  return [`update norm ${num(a.updateNorm)}`, ...(clients === undefined ? [] : [plural(clients, 'client')]), ...info].join(' · ');
}

function evaluationLine(v: RoundView): string {
  const e = v.evaluation;
  const spec = v.config.evaluation;
  if (!e) {
    if (v.state === 'evaluating') return `waiting for reports: ${v.counts.evaluations} so far, ${spec.minDevices} needed`;
    return `none${FINAL_ROUND_STATES.includes(v.state) ? '' : ` yet: after aggregation, on up to ${plural(spec.maxDevices, 'device')}`}`;
  }
  const acc = e.baseAccuracy === null || e.candidateAccuracy === null ? '' : `accuracy ${pct(e.baseAccuracy)} → ${pct(e.candidateAccuracy)} · `;
  const verdict = e.passed === null ? 'pending' : e.passed ? 'passed' : 'failed';
  return `${plural(e.devices, 'device')}, ${e.holdoutCount} holdout rows · ${acc}loss ${loss(e.baseLoss)} → ${loss(e.candidateLoss)} (base → candidate) · ${verdict}`;
}

/** `ε 2.31 at δ 1e-5 over 3 rounds of iris`: the privacy spent on the model so far. */
export function privacyText(v: RoundView): string | null {
  const p = v.privacy;
  return p ? `ε ${num(p.epsilon)} at δ ${p.delta.toExponential()} over ${plural(p.rounds, 'round')} of ${v.model}` : null;
}

function candidateLine(v: RoundView): string | null {
  const c = v.candidate;
  if (!c) return null;
  const ref = `${v.model}@${c.version}`;
  if (c.rolloutId !== null) return `${ref} (${c.status}) · rollout ${c.rolloutId}: edgefleet rollout watch ${c.rolloutId}`;
  return c.status === 'quarantined' ? `${ref} (quarantined)` : `${ref} (${c.status}) · waits for an operator: edgefleet rollout start ${ref}`;
}

function selectionText(c: RoundConfig): string {
  const s = c.selection;
  return `${formatSelector(s.selector, 5)}, ≥ ${plural(s.minSamples, 'sample')}, ${pct(s.fraction)} of eligible, quorum ${s.minParticipants}, at most ${s.maxParticipants}`;
}

function trainText(t: RoundConfig['train']): string {
  return `${plural(t.epochs, 'epoch')}, batch ${t.batchSize}, ${t.optimizer} lr ${t.learningRate}${t.proximalMu > 0 ? `, μ ${t.proximalMu}` : ''}, clip ${t.clipNorm}, ${t.encoding}`;
}

/** `fl status <id>`: everything the fleet says about one round. */
export function renderRoundStatus(v: RoundView, now = Date.now()): string {
  const lines = [
    `round       ${v.id}: ${v.model}@${v.baseVersion}, ${v.scheduleId === null ? 'started' : `from schedule ${v.scheduleId}`} ${ago(v.createdAt, now)}`,
    `state       ${v.state}${v.reason ? ` — ${v.reason}` : ''}`,
    `deadline    ${deadlineText(v, now)}`,
    `selection   ${selectionText(v.config)}`,
    `training    ${trainText(v.config.train)}`,
    `strategy    ${strategyText(v.config.strategy)} · server ${v.config.serverOptimizer.name} lr ${v.config.serverOptimizer.learningRate}`,
    `devices     ${participationLine(v)}`,
    `updates     ${updatesLine(v.counts)} · ${plural(v.counts.samples, 'sample')}`,
  ];
  const rejected = rejectedLine(v);
  if (rejected) lines.push(`refused     ${rejected}`);
  lines.push(`local       ${v.local ? localLine(v.local) : 'no updates yet'}`);
  if (v.aggregate) lines.push(`aggregate   ${aggregateLine(v.aggregate)}`);
  lines.push(`evaluation  ${evaluationLine(v)}`);
  const privacy = privacyText(v);
  if (privacy) lines.push(`privacy     ${privacy}`);
  lines.push(`candidate   ${candidateLine(v) ?? 'none'}`);
  return lines.join('\n');
}

/** `fl watch`'s block. Without `now` it holds no clock, so an equal view renders equal text. */
export function renderRoundWatch(v: RoundView, now?: number, width = BAR_WIDTH): string {
  const left = now === undefined || v.state !== 'collecting' ? '' : v.deadlineAt > now ? ` · deadline in ${duration((v.deadlineAt - now) / 1000)}` : ' · deadline passed';
  const lines = [`${headline(v)}${left}`, `devices    ${participationLine(v)}`, `updates    ${updatesLine(v.counts, width)}`];
  const rejected = rejectedLine(v);
  if (rejected) lines.push(`refused    ${rejected}`);
  if (v.local) lines.push(`local      ${localLine(v.local)}`);
  if (v.aggregate) lines.push(`aggregate  ${v.config.strategy.name} · ${aggregateLine(v.aggregate)}`);
  if (v.aggregate || v.evaluation) lines.push(`evaluation ${evaluationLine(v)}`);
  const privacy = privacyText(v);
  if (privacy) lines.push(`privacy    ${privacy}`);
  if (v.reason) lines.push(`reason     ${v.reason}`);
  const candidate = candidateLine(v);
  if (candidate) lines.push(`candidate  ${candidate}`);
  return lines.join('\n');
}

/** What `fl start` prints: the headline and deadline, or why the round failed at once. */
export function renderStarted(v: RoundView, now = Date.now()): string {
  if (v.state === 'failed') return `round ${v.id} of ${v.model}@${v.baseVersion} failed at start: ${v.reason ?? 'no reason given'}`;
  return [
    `started ${headline(v)}`,
    `deadline    ${deadlineText(v, now)}`,
    `strategy    ${strategyText(v.config.strategy)} · quorum ${v.config.selection.minParticipants}`,
    `follow it:  edgefleet fl watch ${v.id}`,
  ].join('\n');
}

/** `fl status` without an id: one row per round. */
export function roundsTable(rounds: readonly RoundView[], now = Date.now()): string {
  return table(
    ['ID', 'MODEL', 'BASE', 'STATE', 'UPDATES/INVITED', 'SAMPLES', 'CANDIDATE', 'AGE/REASON'],
    rounds.map((v) => [
      v.id,
      v.model,
      v.baseVersion,
      v.state,
      `${v.counts.updates}/${v.counts.invited}`,
      v.counts.samples,
      v.candidate ? `${v.candidate.version} ${v.candidate.status}${v.candidate.rolloutId === null ? '' : `, rollout ${v.candidate.rolloutId}`}` : null,
      v.reason ?? ago(v.createdAt, now),
    ]),
  );
}

export function schedulesTable(schedules: readonly FlSchedule[], now = Date.now()): string {
  return table(
    ['ID', 'MODEL', 'BASE', 'EVERY', 'NEXT', 'STRATEGY', 'BY'],
    schedules.map((s) => [
      s.id,
      s.config.model,
      s.config.baseVersion ?? 'production',
      duration(s.everySec),
      s.nextAt > now ? `in ${duration((s.nextAt - now) / 1000)}` : 'due',
      strategyText(s.config.strategy),
      s.createdBy,
    ]),
  );
}

// ---------------------------------------------------------------------------------------------
// Watching

export type WatchIo = WatchIoOf<RoundView>;

/** Polls until the round ends (or `signal` aborts, e.g. on Ctrl-C) and returns the exit code. */
export function watchRound(io: WatchIo, intervalMs: number, signal: AbortSignal): Promise<number> {
  return watchView(io, intervalMs, signal, {
    key: (v) => JSON.stringify({ ...v, updatedAt: 0 }),
    render: (v, now) => renderRoundWatch(v, now),
    finish: (v, out) => {
      const code = watchExit(v.state);
      if (code === WATCH_EXIT.succeeded) {
        if (!out.json) out.stdout(`round ${v.id} succeeded${v.candidate ? `: candidate ${v.model}@${v.candidate.version} (${v.candidate.status})${v.candidate.rolloutId === null ? '' : `, rollout ${v.candidate.rolloutId} started`}` : ''}\n`);
      } else if (code !== null) out.stderr(`edgefleet: round ${v.id} ${v.state}${v.reason ? `: ${v.reason}` : ''}\n`);
      return code;
    },
    stopped: (seen) => (seen ? ` round ${seen.id} (${seen.state}); it carries on without you (edgefleet fl abort ${seen.id} stops it)` : ''),
  });
}
