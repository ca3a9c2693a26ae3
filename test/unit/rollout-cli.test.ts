/** `edgefleet rollout | safe-mode`: the parsers and renderers, without a fleet; and the plan check as a user meets it. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { EXIT, ID_PATTERN, RolloutView, defaultPlan, type RolloutStatus } from '../../proto/index.js';
import { formatSelector, parsePlan, parseSelector } from '../../scripts/cli/rollout.js';
import { initialStatus } from '../../fleet-server/rollouts/reconcile.js';
import { BAR_WIDTH, WATCH_EXIT, planSummary, progressBar, renderStatus, renderWatch, watchRollout, type WatchIo } from '../../scripts/cli/rollout-view.js';
import { watchRecorder, type WatchRecorder } from '../helpers/watch.js';

const NOW = Date.UTC(2025, 0, 1, 12);

function view(status: Partial<RolloutStatus> = {}): RolloutView {
  return RolloutView.parse({
    id: 7,
    name: 'iris',
    version: 3,
    manifestSha256: 'a'.repeat(64),
    selector: { kind: 'tags', tags: ['lab'] },
    plan: defaultPlan(),
    createdBy: 'admin',
    createdAt: NOW - 600_000,
    status: { ...initialStatus(NOW - 30_000), selected: 200, wanted: 1, updatedAt: NOW, ...status },
  });
}

describe('selectors', () => {
  it('reads all, tag:… and devices:…', () => {
    expect(parseSelector('all')).toEqual({ ok: true, selector: { kind: 'all' } });
    expect(parseSelector('tag:lab,eu-west')).toEqual({ ok: true, selector: { kind: 'tags', tags: ['lab', 'eu-west'] } });
    expect(parseSelector('devices:d1,d2,d1')).toEqual({ ok: true, selector: { kind: 'devices', deviceIds: ['d1', 'd2'] } });
  });

  it.each(['', 'ALL', 'everything', 'tag:', 'tag:a,,b', 'tags:a', 'devices:', 'device:d1', 'tag:a b', 'devices:-x'])('refuses %j, saying why', (text) => {
    const r = parseSelector(text);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.error).toContain(`"${text}"`);
  });

  it('names the offending tag', () => {
    const r = parseSelector('tag:ok,not ok');
    expect(r.ok ? '' : r.error).toMatch(/"not ok": letters, digits/);
  });

  it('formatSelector writes what parseSelector reads', () => {
    const id = fc.stringMatching(ID_PATTERN);
    const selector = fc.oneof(
      fc.constant({ kind: 'all' as const }),
      fc.uniqueArray(id, { minLength: 1, maxLength: 16 }).map((tags) => ({ kind: 'tags' as const, tags })),
      fc.uniqueArray(id, { minLength: 1, maxLength: 50 }).map((deviceIds) => ({ kind: 'devices' as const, deviceIds })),
    );
    fc.assert(
      fc.property(selector, (s) => {
        expect(parseSelector(formatSelector(s))).toEqual({ ok: true, selector: s });
      }),
    );
    expect(formatSelector({ kind: 'devices', deviceIds: ['a', 'b', 'c'] }, 2)).toBe('devices:a,b,… (3 in all)');
  });
});

describe('plans', () => {
  it('summarizes the default plan on one line', () => {
    expect(planSummary(defaultPlan())).toBe('1 device → 5% → 25% → 100%, analysis after each');
  });

  it('spells out every step of a less regular plan', () => {
    const r = parsePlan(JSON.stringify({ steps: [{ type: 'wave', count: 2 }, { type: 'pause', untilApproved: true }, { type: 'wave', percent: 50 }, { type: 'analysis', windowSec: 90 }, { type: 'pause', seconds: 600 }, { type: 'wave', percent: 100 }] }));
    expect(r.ok && planSummary(r.plan)).toBe('2 devices → approval → 50% → analysis 1m30s → pause 10m → 100%');
  });

  it('lists every error of a plan file at once, one per line with its path', () => {
    const r = parsePlan(JSON.stringify({ steps: [{ type: 'wave', percent: 150 }, { type: 'pause', seconds: 0 }, { type: 'analysis', windowSec: -1 }] }));
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.errors).toHaveLength(3);
    expect(r.errors[0]).toMatch(/^steps\[0\]\.percent: /);
    expect(r.errors[1]).toMatch(/^steps\[1\]\.seconds: /);
    expect(r.errors[2]).toMatch(/^steps\[2\]\.windowSec: /);
  });

  it('reports the plan-wide rules too, and text that is not JSON', () => {
    const r = parsePlan(JSON.stringify({ steps: [{ type: 'wave', percent: 50 }, { type: 'wave', percent: 10 }, { type: 'pause' }] }));
    expect(r.ok ? [] : r.errors).toEqual([
      "steps[1]: waves are cumulative: 10 does not grow past the previous wave's 50",
      'steps[2]: a pause gives exactly one of seconds or untilApproved',
    ]);
    const bad = parsePlan('{"steps": [');
    expect(bad.ok ? [] : bad.errors).toEqual([expect.stringMatching(/^\(plan\): not JSON/)]);
  });
});

describe('progress bars', () => {
  const cells = (bar: string, ch: string): number => [...bar].filter((c) => c === ch).length;

  it('is always the width asked for', () => {
    const counts = fc.tuple(fc.nat(1000), fc.nat(1000), fc.nat(1000), fc.integer({ min: 3, max: 80 }));
    fc.assert(
      fc.property(counts, ([serving, failed, pending, width]) => {
        const bar = progressBar({ members: serving + failed + pending, serving, failed }, width);
        expect([...bar]).toHaveLength(width);
        // A count that is not zero shows; only a whole count fills the bar.
        if (serving > 0) expect(cells(bar, '█')).toBeGreaterThan(0);
        if (failed > 0) expect(cells(bar, '×')).toBeGreaterThan(0);
        if (pending > 0) expect(cells(bar, '░')).toBeGreaterThan(0);
      }),
    );
  });

  it('handles the edges: no members, all failed, almost done, all serving', () => {
    expect(progressBar({ members: 0, serving: 0, failed: 0 }, 12)).toBe('░'.repeat(12));
    expect(progressBar({ members: 5, serving: 0, failed: 5 }, 12)).toBe('×'.repeat(12));
    expect(progressBar({ members: 50, serving: 49, failed: 0 }, 12)).toBe('█'.repeat(11) + '░');
    expect(progressBar({ members: 50, serving: 48, failed: 2 }, 12)).toBe('█'.repeat(11) + '×');
    expect(progressBar({ members: 3, serving: 3, failed: 0 })).toBe('█'.repeat(BAR_WIDTH));
  });
});

describe('status', () => {
  const halted = view({
    state: 'halted',
    step: 3,
    reason: 'gate error-rate failed: 12% on the new version, limit 5%',
    selected: 200,
    wanted: 10,
    waves: [
      { members: 1, serving: 1, committed: 1, failed: 0, pending: 0 },
      { members: 10, serving: 6, committed: 0, failed: 3, pending: 1 },
    ],
    total: { members: 11, serving: 7, committed: 1, failed: 3, pending: 1 },
    gates: [
      { gate: 'failed-share', verdict: 'failed', value: 0.2727, limit: 0.05 },
      { gate: 'error-rate', verdict: 'failed', value: 0.12, limit: 0.05, detail: 'stable 0.4%' },
      { gate: 'latency', verdict: 'successful', value: 1.1, limit: 1.5 },
      { gate: 'confidence', verdict: 'running', value: null, limit: 0.1 },
    ],
    verdict: 'failed',
    candidate: { devices: 7, requests: 1400, errorRate: 0.12, p95Ms: 41.6, meanConfidence: 0.812 },
    stable: { devices: 189, requests: 40_000, errorRate: 0.004, p95Ms: 38, meanConfidence: 0.85 },
    contradictions: 2,
    revert: { devices: 11, reverted: 9, startedAt: NOW - 60_000 },
    finishedAt: NOW - 60_000,
  });

  it('shows a halted rollout: why, where, the gates, the cohorts and how far the revert got', () => {
    const text = renderStatus(halted, NOW);
    expect(text).toContain('rollout     7: iris@3 to tag:lab, by admin 10m ago');
    expect(text).toContain('state       halted — gate error-rate failed: 12% on the new version, limit 5%');
    expect(text).toMatch(/^step {8}4\/8 analysis over 2m, 1 device reporting at least \(timeout 15m\) · for 30s$/m);
    expect(text).toContain('plan        1 device → 5% → 25% → 100%, analysis after each');
    expect(text).toMatch(/^revert {6}\[█{16}░{4}\] {2}9\/11 back on their previous version \(since 1m ago\)$/m);
    expect(text).toMatch(/^ {2}wave 1 {2}1 device {2}\[█{20}\] {2}1\/1 serving · 0 failed · 0 pending$/m);
    expect(text).toMatch(/^ {2}wave 2 {2}5% {8}\[█+×+░+\] {2}6\/10 serving · 3 failed · 1 pending$/m);
    expect(text).toMatch(/^ {2}wave 3 {2}25% {7}not started$/m);
    expect(text).toContain('gates (verdict failed):');
    expect(text).toMatch(/^ {2}error-rate +failed +12% +5% +stable 0\.4%$/m);
    expect(text).toMatch(/^ {2}latency +successful +1\.10× +1\.50×$/m);
    expect(text).toMatch(/^ {2}confidence +running +- +0\.100$/m);
    expect(text).toMatch(/^ {2}candidate +7 +1400 +12% +42 ms +0\.812$/m);
    expect(text).toMatch(/^ {2}stable +189 +40000 +0\.4% +38 ms +0\.850$/m);
    expect(text).toContain('reports     2 contradicted');
  });

  it('the watch block holds no clock unless given one', () => {
    expect(renderWatch(halted)).toBe(renderWatch(halted));
    expect(renderWatch(halted)).not.toContain('since');
    expect(renderWatch(halted, NOW)).toContain('(since 1m ago)');
    expect(renderWatch(view({ step: 8, state: 'succeeded' })).split('\n')[0]).toBe('rollout 7 iris@3 · succeeded · step 8/8: plan done');
  });
});

describe('watch', () => {
  const io = (views: RolloutView[], opts: Partial<WatchIo> = {}): WatchRecorder<RolloutView> => watchRecorder(views, NOW, opts);
  const running = view();
  const wave2 = view({ step: 2, waves: [{ members: 1, serving: 1, committed: 1, failed: 0, pending: 0 }] });

  it('without a terminal prints a block only when something changed; 0 once succeeded', async () => {
    const w = io([running, running, wave2, wave2, view({ state: 'succeeded', step: 8, total: { members: 200, serving: 200, committed: 200, failed: 0, pending: 0 } })]);
    expect(await watchRollout(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.succeeded);
    expect(w.polls).toBe(5);
    expect(w.out.match(/^rollout 7 iris@3 · /gm)).toHaveLength(3);
    expect(w.out).toContain('rollout 7 succeeded: iris@3 on 200 device(s)');
    expect(w.out).not.toContain('\x1b');
  });

  it('on a terminal redraws in place', async () => {
    const w = io([running, wave2, view({ state: 'aborted', reason: 'by admin' })], { tty: true, columns: 60 });
    expect(await watchRollout(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.failed);
    const first = renderWatch(running, NOW).split('\n').length;
    expect(w.out).toContain(`\x1b[${first}A\r\x1b[J`);
    expect(w.out.startsWith('\x1b[?25l') && w.out.endsWith('\x1b[?25h')).toBe(true);
    // eslint-disable-next-line no-control-regex -- stripping the ANSI sequences the watch writes
    const visible = w.out.replace(/\x1b\[[0-9;?]*[A-Za-z]|\r/g, '');
    for (const line of visible.split('\n')) expect(line.length).toBeLessThan(60);
    expect(w.err).toBe('edgefleet: rollout 7 aborted: by admin\n');
  });

  it('--json prints each changed view as a line; halted exits 1', async () => {
    const w = io([running, running, view({ state: 'halted', reason: 'gate', revert: { devices: 1, reverted: 0, startedAt: NOW } })], { json: true });
    expect(await watchRollout(w, 1, new AbortController().signal)).toBe(WATCH_EXIT.failed);
    const lines = w.out.trimEnd().split('\n').map((l) => JSON.parse(l) as RolloutView);
    expect(lines.map((l) => l.status.state)).toEqual(['running', 'halted']);
    expect(w.err).toContain('(0/1 reverted so far)');
  });

  it('Ctrl-C stops watching at once, even mid-request, and says the rollout carries on', async () => {
    const ac = new AbortController();
    let calls = 0;
    const w = io([], {
      show: () => (++calls === 1 ? Promise.resolve(running) : new Promise<RolloutView>(() => ac.abort())),
    });
    expect(await watchRollout(w, 1, ac.signal)).toBe(WATCH_EXIT.interrupted);
    expect(w.err).toBe('edgefleet: stopped watching rollout 7 (running); it carries on without you\n');
  });
});

describe('edgefleet rollout start --plan', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ef-rollout-cli-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const cli = (...args: string[]): { code: number | null; stdout: string; stderr: string } => {
    const r = spawnSync(process.execPath, [resolve('dist/scripts/cli.js'), ...args], { encoding: 'utf8', timeout: 30_000, cwd: dir, env: { PATH: process.env.PATH ?? '' } });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it('checks the plan before reaching for the fleet, and prints every error', () => {
    const plan = join(dir, 'plan.json');
    writeFileSync(plan, JSON.stringify({ steps: [{ type: 'wave', percent: 150 }, { type: 'pause', seconds: 0 }, { type: 'analysis', windowSec: -1 }] }));
    const r = cli('rollout', 'start', 'iris@3', '--plan', plan);
    expect(r.code, r.stderr).toBe(EXIT.CLI_INVALID);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines[0]).toMatch(/EF_PLAN_INVALID/);
    expect(lines.slice(1)).toHaveLength(3);
    const json = cli('--json', 'rollout', 'start', 'iris@3', '--plan', plan);
    expect((JSON.parse(json.stdout) as { error: { details: string[] } }).error.details).toHaveLength(3);
  });

  it('refuses a malformed selector as a usage error', () => {
    const r = cli('rollout', 'start', 'iris@3', '--selector', 'tag:');
    expect(r.code).toBe(EXIT.USAGE);
    expect(r.stderr).toMatch(/--selector "tag:": a selector is all/);
  });
});
