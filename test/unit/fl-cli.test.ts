/** `edgefleet fl`: the config merge, the parsers and the renderers, without a fleet; and the config check as a user meets it. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { EXIT, ROUND_STATES, RoundView, type RoundConfigInput } from '../../proto/index.js';
import { duration } from '../../scripts/cli/format.js';
import { buildRoundConfig, parseDuration } from '../../scripts/cli/fl.js';
import { WATCH_EXIT, renderRoundStatus, renderRoundWatch, renderStarted, roundsTable, watchExit, watchRound, type WatchIo } from '../../scripts/cli/fl-view.js';
import { watchRecorder, type WatchRecorder } from '../helpers/watch.js';

const NOW = Date.UTC(2025, 0, 1, 12);

type StrategyInput = NonNullable<RoundConfigInput['strategy']>;

type ViewInput = Omit<Partial<RoundView>, 'counts' | 'config'> & { counts?: Partial<RoundView['counts']>; config?: Partial<RoundConfigInput> };

function round(v: ViewInput = {}): RoundView {
  const { counts, config, ...rest } = v;
  return RoundView.parse({
    id: 12,
    model: 'iris',
    baseVersion: 3,
    state: 'collecting',
    reason: null,
    config: { model: 'iris', baseVersion: 3, ...config },
    createdAt: NOW - 120_000,
    deadlineAt: NOW + 250_000,
    updatedAt: NOW,
    scheduleId: null,
    counts: { eligible: 12, invited: 8, joined: 6, declined: 2, updates: 4, failed: 1, samples: 320, evaluations: 0, ...counts },
    rejected: {},
    declines: { busy: 1, 'too-few-samples': 1 },
    local: null,
    aggregate: null,
    evaluation: null,
    privacy: null,
    candidate: null,
    ...rest,
  });
}

const collecting = round({ rejected: { late: 1, 'norm-above-bound': 2 }, local: { lossBefore: 0.6931, lossAfter: 0.412, accuracyBefore: 0.612, accuracyAfter: 0.785 } });
const evaluating = round({
  state: 'evaluating',
  deadlineAt: NOW - 30_000,
  counts: { updates: 7, failed: 0, declined: 1, samples: 560, evaluations: 1 },
  config: { evaluation: { minDevices: 2 } },
  local: { lossBefore: 0.7, lossAfter: 0.4, accuracyBefore: null, accuracyAfter: null },
  aggregate: { updateNorm: 0.81234, info: { clients: 7, trimmedEachSide: 1 } },
});
const succeeded = round({
  ...evaluating,
  state: 'succeeded',
  counts: evaluating.counts,
  config: evaluating.config,
  evaluation: { devices: 5, holdoutCount: 412, baseAccuracy: 0.781, candidateAccuracy: 0.79, baseLoss: 0.4512, candidateLoss: 0.4301, passed: true },
  candidate: { version: 4, status: 'candidate', rolloutId: 9 },
});
const quorumReason = 'quorum not met: 1 eligible device (online, on the base version, with enough samples), 2 needed';
const failedAtStart = round({ state: 'failed', reason: quorumReason, counts: { eligible: 1, invited: 0, joined: 0, declined: 0, updates: 0, failed: 0, samples: 0 }, declines: {} });

describe('renderers', () => {
  it('shows a collecting round: who joined and declined, the updates so far, what was refused, the local means', () => {
    const text = renderRoundStatus(collecting, NOW);
    expect(text).toContain('round       12: iris@3, started 2m ago');
    expect(text).toMatch(/^state {7}collecting$/m);
    expect(text).toContain('deadline    in 4m10s (2025-01-01 12:04:10Z)');
    expect(text).toContain('selection   all, ≥ 10 samples, 100% of eligible, quorum 2, at most 100');
    expect(text).toContain('strategy    fedavg · server sgd lr 1');
    expect(text).toContain('devices     12 eligible · 8 invited · 6 joined · 2 declined (1 busy, 1 too-few-samples)');
    expect(text).toMatch(/^updates {5}\[█{10}×{8}░{2}\] {2}4\/8 updates · 2 declined · 1 failed · 1 waiting · 320 samples$/m);
    expect(text).toContain('refused     3 updates refused (2 norm-above-bound, 1 late)');
    expect(text).toContain('local       loss 0.6931 → 0.4120 · accuracy 61.2% → 78.5% (means over the updates, by samples)');
    expect(text).toContain('evaluation  none yet: after aggregation, on up to 20 devices');
    expect(text).toContain('candidate   none');
    expect(text).not.toContain('privacy');
  });

  it('shows an evaluating round: the aggregate and the reports awaited', () => {
    const text = renderRoundStatus(evaluating, NOW);
    expect(text).toContain('deadline    collection closed 30s ago');
    expect(text).toContain('aggregate   update norm 0.812 · 7 clients · trimmedEachSide 1');
    expect(text).toContain('evaluation  waiting for reports: 1 so far, 2 needed');
    expect(text).toContain('local       loss 0.7000 → 0.4000 (means');
    const block = renderRoundWatch(evaluating);
    expect(block.split('\n')[0]).toBe('round 12 iris@3 · evaluating · 8 of 12 eligible invited');
    expect(block).toContain('aggregate  fedavg · update norm 0.812 · 7 clients');
    expect(block).toContain('evaluation waiting for reports: 1 so far, 2 needed');
  });

  it('shows a succeeded round: the evaluation that passed, the candidate and its rollout', () => {
    const text = renderRoundStatus(succeeded, NOW);
    expect(text).toMatch(/^state {7}succeeded$/m);
    expect(text).toContain('evaluation  5 devices, 412 holdout rows · accuracy 78.1% → 79% · loss 0.4512 → 0.4301 (base → candidate) · passed');
    expect(text).toContain('candidate   iris@4 (candidate) · rollout 9: edgefleet rollout watch 9');
    const waiting = renderRoundStatus({ ...succeeded, candidate: { version: 4, status: 'candidate', rolloutId: null } }, NOW);
    expect(waiting).toContain('candidate   iris@4 (candidate) · waits for an operator: edgefleet rollout start iris@4');
    expect(roundsTable([succeeded], NOW).split('\n')[1]).toMatch(/^12 +iris +3 +succeeded +7\/8 +560 +4 candidate, rollout 9 +2m ago$/);
  });

  it('shows a round that failed for want of a quorum, and `fl start` says so', () => {
    expect(renderRoundStatus(failedAtStart, NOW)).toContain(`state       failed — ${quorumReason}`);
    expect(renderRoundStatus(failedAtStart, NOW)).toContain('evaluation  none\n');
    expect(renderStarted(failedAtStart, NOW)).toBe(`round 12 of iris@3 failed at start: ${quorumReason}`);
    expect(roundsTable([failedAtStart], NOW).split('\n')[1]).toMatch(new RegExp(`^12 +iris +3 +failed +0/0 +0 +- +${quorumReason.replace(/[()]/g, '\\$&')}$`));
    expect(renderStarted(collecting, NOW).split('\n')).toEqual([
      'started round 12 iris@3 · collecting · 8 of 12 eligible invited',
      'deadline    in 4m10s (2025-01-01 12:04:10Z)',
      'strategy    fedavg · quorum 2',
      'follow it:  edgefleet fl watch 12',
    ]);
  });

  it('shows the privacy spent by DP rounds, and the DP settings', () => {
    const dp = round({
      ...evaluating,
      counts: evaluating.counts,
      config: { strategy: { name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 1.1 } },
      privacy: { epsilon: 2.3117, delta: 1e-5, rounds: 3 },
    });
    const text = renderRoundStatus(dp, NOW);
    expect(text).toContain('privacy     ε 2.31 at δ 1e-5 over 3 rounds of iris');
    expect(text).toContain('strategy    dp-fedavg (clip 1, noise ×1.1, δ 1e-5)');
    expect(renderRoundWatch(dp)).toContain('privacy    ε 2.31 at δ 1e-5 over 3 rounds of iris');
  });

  it('names the robust rules with their settings, buckets included', () => {
    const show = (strategy: StrategyInput): string => renderRoundStatus(round({ ...evaluating, counts: evaluating.counts, config: { strategy } }), NOW);
    expect(show({ name: 'median' })).toContain('strategy    median · server');
    expect(show({ name: 'median', bucketSize: 2 })).toContain('strategy    median (over means of 2 updates) · server');
    expect(show({ name: 'trimmed-mean', trimShare: 0.2, bucketSize: 3 })).toContain('strategy    trimmed-mean (20% trimmed each side, over means of 3 updates) · server');
  });

  it('the watch block holds no clock unless given one', () => {
    expect(renderRoundWatch(collecting)).toBe(renderRoundWatch(round({ ...collecting, counts: collecting.counts, config: collecting.config, updatedAt: NOW + 1 })));
    expect(renderRoundWatch(collecting)).not.toContain('deadline');
    expect(renderRoundWatch(collecting, NOW).split('\n')[0]).toBe('round 12 iris@3 · collecting · 8 of 12 eligible invited · deadline in 4m10s');
    expect(renderRoundWatch(collecting, NOW + 300_000).split('\n')[0]).toMatch(/· deadline passed$/);
  });
});

describe('round config', () => {
  const file = JSON.stringify({ model: 'other', selection: { minSamples: 50, fraction: 0.5 }, train: { epochs: 3 }, strategy: { name: 'trimmed-mean', trimShare: 0.1 } });

  it('fills the model from the argument, keeps the file, and lets each flag override its field', () => {
    const r = buildRoundConfig(file, 'iris@3', { fraction: '25%', min: '3', max: '40', deadline: '10m', selector: 'tag:lab', strategy: 'trimmed-mean' });
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(r.config.model).toBe('iris');
    expect(r.config.baseVersion).toBe(3);
    expect(r.config.selection).toEqual({ selector: { kind: 'tags', tags: ['lab'] }, minSamples: 50, fraction: 0.25, minParticipants: 3, maxParticipants: 40 });
    expect(r.config.train.epochs).toBe(3);
    expect(r.config.deadlineSec).toBe(600);
    // The same strategy name keeps the file's settings for it.
    expect(r.config.strategy).toEqual({ name: 'trimmed-mean', trimShare: 0.1 });
    // What is sent is what was given; the fleet applies its own defaults.
    expect(r.input).not.toHaveProperty('evaluation');
  });

  it('needs no file: the model argument and the defaults make a round', () => {
    const r = buildRoundConfig(undefined, 'iris', { base: '2', 'min-samples': '20', strategy: 'median' });
    expect(r.ok && r.config).toMatchObject({ model: 'iris', baseVersion: 2, selection: { minSamples: 20, minParticipants: 2 }, strategy: { name: 'median' }, deadlineSec: 600 });
  });

  it('lists every error at once, naming the flag that caused it', () => {
    const r = buildRoundConfig(JSON.stringify({ train: { epochs: 0 }, extra: 1 }), 'iris@3', { fraction: '2', min: 'x', max: '1.5', deadline: 'soon', base: '4', selector: 'tag:', strategy: 'fedsgd' });
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.errors).toEqual([
      expect.stringMatching(/^--selector "tag:": a selector is all/),
      '--min: "x" is not a number',
      '--deadline: "soon" is not a duration (seconds, or like 90s, 10m, 2h)',
      '--strategy: "fedsgd" is none of fedavg, fedavg-clipped, median, trimmed-mean, dp-fedavg',
      '--base: 4 contradicts iris@3',
      'selection.fraction (--fraction): Too big: expected number to be <=1',
      'selection.maxParticipants (--max): Invalid input: expected int, received number',
      'train.epochs: Too small: expected number to be >=1',
      '(config): Unrecognized key: "extra"',
    ]);
  });

  it('says where the settings of a strategy chosen by flag go', () => {
    const r = buildRoundConfig(undefined, 'iris', { strategy: 'dp-fedavg' });
    expect(r.ok ? [] : r.errors).toEqual([
      'strategy.clipNorm: Invalid input: expected number, received undefined (--strategy dp-fedavg takes its settings from the --config file)',
      'strategy.noiseMultiplier: Invalid input: expected number, received undefined (--strategy dp-fedavg takes its settings from the --config file)',
    ]);
    const withFile = buildRoundConfig(JSON.stringify({ strategy: { name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 0.8 } }), 'iris', { strategy: 'dp-fedavg' });
    expect(withFile.ok && withFile.config.strategy).toEqual({ name: 'dp-fedavg', clipNorm: 1, noiseMultiplier: 0.8, delta: 1e-5 });
  });

  it('refuses a file that is not JSON, or not an object, and a quorum above the cap', () => {
    expect(buildRoundConfig('{"model": ', 'iris', {})).toEqual({ ok: false, errors: [expect.stringMatching(/^\(config\): not JSON/)] });
    expect(buildRoundConfig('[1]', 'iris', {})).toEqual({ ok: false, errors: ['(config): a round config is a JSON object'] });
    const r = buildRoundConfig(undefined, 'iris', { min: '5', max: '4' });
    expect(r.ok ? [] : r.errors).toEqual(['selection.minParticipants (--min): minParticipants is above maxParticipants']);
  });
});

describe('durations', () => {
  it.each([
    ['90', 90],
    ['2.5', 2.5],
    ['45s', 45],
    ['30m', 1800],
    ['6h', 21_600],
    ['1d', 86_400],
    ['1h30m', 5400],
    ['2d4h', 187_200],
  ])('reads %j as %d s', (text, sec) => expect(parseDuration(text)).toBe(sec));

  it.each(['', 'm', '30x', '1m2h', '-5', '1.5h', 'h1', '6 h'])('refuses %j', (text) => expect(parseDuration(text)).toBeNull());

  it('reads what `duration` writes (which drops the smallest units past an hour)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 400 * 86_400 }), (sec) => {
        const back = parseDuration(duration(sec));
        expect(back).not.toBeNull();
        expect(back).toBeLessThanOrEqual(sec);
        expect(sec - (back ?? 0)).toBeLessThan(sec < 3600 ? 1 : sec < 86_400 ? 60 : 3600);
      }),
    );
  });
});

describe('watch', () => {
  it('ends 0 on succeeded, 19 on failed or aborted, and goes on otherwise', () => {
    expect(WATCH_EXIT.failed).toBe(19);
    expect(Object.fromEntries(ROUND_STATES.map((s) => [s, watchExit(s)]))).toEqual({ collecting: null, evaluating: null, succeeded: 0, failed: 19, aborted: 19 });
  });

  const io = (views: RoundView[], opts: Partial<WatchIo> = {}): WatchRecorder<RoundView> => watchRecorder(views, NOW, opts);

  it('without a terminal prints a block only when something changed; 0 once succeeded', async () => {
    const w = io([collecting, collecting, evaluating, evaluating, succeeded]);
    expect(await watchRound(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.succeeded);
    expect(w.polls).toBe(5);
    expect(w.out.match(/^round 12 iris@3 · /gm)).toHaveLength(3);
    expect(w.out).toContain('round 12 succeeded: candidate iris@4 (candidate), rollout 9 started');
    expect(w.out).not.toContain('\x1b');
  });

  it('on a terminal redraws in place; an aborted round exits 19', async () => {
    const w = io([collecting, round({ state: 'aborted', reason: 'aborted by admin' })], { tty: true, columns: 60 });
    expect(await watchRound(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.failed);
    expect(w.out).toContain(`\x1b[${renderRoundWatch(collecting, NOW).split('\n').length}A\r\x1b[J`);
    expect(w.out.startsWith('\x1b[?25l') && w.out.endsWith('\x1b[?25h')).toBe(true);
    // eslint-disable-next-line no-control-regex -- stripping the ANSI sequences the watch writes
    for (const line of w.out.replace(/\x1b\[[0-9;?]*[A-Za-z]|\r/g, '').split('\n')) expect(line.length).toBeLessThan(60);
    expect(w.err).toBe('edgefleet: round 12 aborted: aborted by admin\n');
  });

  it('--json prints each changed view as a line; failed exits 19', async () => {
    const failed = round({ state: 'failed', reason: 'quorum not met: 1 update by the deadline, 2 needed' });
    const w = io([collecting, round({ ...collecting, counts: collecting.counts, config: collecting.config, updatedAt: NOW + 5 }), failed], { json: true });
    expect(await watchRound(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.failed);
    expect(w.out.trimEnd().split('\n').map((l) => (JSON.parse(l) as RoundView).state)).toEqual(['collecting', 'failed']);
    expect(w.err).toBe('edgefleet: round 12 failed: quorum not met: 1 update by the deadline, 2 needed\n');
  });

  it('Ctrl-C stops watching at once, even mid-request, and says the round carries on', async () => {
    const ac = new AbortController();
    let calls = 0;
    const w = io([], { show: () => (++calls === 1 ? Promise.resolve(collecting) : new Promise<RoundView>(() => ac.abort())) });
    expect(await watchRound(w, 1, ac.signal)).toBe(WATCH_EXIT.interrupted);
    expect(w.err).toBe('edgefleet: stopped watching round 12 (collecting); it carries on without you (edgefleet fl abort 12 stops it)\n');
  });
});

describe('edgefleet fl start / schedule', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ef-fl-cli-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const cli = (...args: string[]): { code: number | null; stdout: string; stderr: string } => {
    const r = spawnSync(process.execPath, [resolve('dist/scripts/cli.js'), ...args], { encoding: 'utf8', timeout: 30_000, cwd: dir, env: { PATH: process.env.PATH ?? '' } });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it('checks the config before reaching for the fleet, and prints every error', () => {
    const config = join(dir, 'round.json');
    writeFileSync(config, JSON.stringify({ train: { epochs: 0 } }));
    const r = cli('fl', 'start', 'iris', '--config', config, '--fraction', '2', '--min', 'x');
    expect(r.code, r.stderr).toBe(EXIT.CLI_INVALID);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toMatch(/EF_BAD_PARAMS/);
    expect(lines.slice(1)).toEqual(['  --min: "x" is not a number', expect.stringMatching(/^ {2}selection\.fraction \(--fraction\): /), expect.stringMatching(/^ {2}train\.epochs: /)]);
    const json = cli('--json', 'fl', 'start', 'iris', '--config', config);
    expect((JSON.parse(json.stdout) as { error: { details: string[] } }).error.details).toHaveLength(1);
  });

  it('refuses a schedule more often than a minute, and a watch without a round, as usage errors', () => {
    const r = cli('fl', 'schedule', 'iris', '--every', '30s');
    expect(r.code).toBe(EXIT.USAGE);
    expect(r.stderr).toMatch(/--every takes a whole number of seconds, at least 60/);
    expect(cli('fl', 'watch').code).toBe(EXIT.USAGE);
    expect(cli('fl', 'status', 'x').stderr).toMatch(/expected a round id/);
  });
});
