import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { RolloutPlan, VERDICTS, defaultPlan, worst, type GateVerdict, type ModelSlot, type RolloutStatus, type ServingMetrics } from '../../proto/index.js';
import { command, initialStatus, reconcile, waveTarget, type Decision, type DeviceObservation, type RolloutSpecData } from '../../fleet-server/rollouts/reconcile.js';

/**
 * The reconciler is pure, so a whole fleet fits in a test: devices are plain records, actions are
 * applied by hand, and each device "reports" by a rule the test picks.
 */
const SHA = 'a'.repeat(64);

interface FakeDevice {
  obs: DeviceObservation;
  /** What the device does with the target once desired state names it. */
  behaviour: 'healthy' | 'rollback' | 'offline' | 'degraded';
}

function metrics(version: number, o: Partial<ServingMetrics> = {}): ServingMetrics {
  return { version, requests: 100, errors: 0, nonFinite: 0, p95Ms: 10, meanConfidence: 0.9, ...o };
}

function fleet(n: number, behaviour: (i: number) => FakeDevice['behaviour'] = () => 'healthy'): FakeDevice[] {
  return Array.from({ length: n }, (_, i) => {
    const id = `dev-${String(i).padStart(5, '0')}`;
    const b = behaviour(i);
    return {
      behaviour: b,
      obs: {
        id,
        rank: hashRank(id),
        selected: true,
        safeMode: false,
        online: b !== 'offline',
        desiredVersion: 2,
        desired: { version: 1 },
        member: null,
        report: { desiredVersion: 2, model: { active: 1, activeSha256: null, history: [1], failed: [], metrics: metrics(1) } },
      },
    };
  });
}

function hashRank(id: string): string {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619) >>> 0;
  return h.toString(16).padStart(8, '0');
}

const spec = (plan: RolloutPlan = defaultPlan()): RolloutSpecData => ({ id: 7, name: 'm', version: 2, manifestSha256: SHA, selector: { kind: 'all' }, plan });

/** Applies a decision's desired-state actions to the fake fleet, as the service would. */
function apply(devices: FakeDevice[], d: Decision): void {
  for (const a of d.actions) {
    const dev = devices.find((x) => x.obs.id === ('deviceId' in a ? a.deviceId : ''));
    if (!dev) continue;
    if (a.kind === 'enlist') {
      dev.obs.desiredVersion++;
      dev.obs.desired = a.slot;
      dev.obs.member = { wave: a.wave, previous: a.previous, enlistedAt: dev.obs.desiredVersion };
    } else if (a.kind === 'revert') {
      dev.obs.desiredVersion++;
      dev.obs.desired = a.slot;
    }
  }
}

/** Every online device reports what its behaviour makes of its desired state. */
function devicesReport(devices: FakeDevice[]): void {
  for (const d of devices) {
    if (d.behaviour === 'offline') continue;
    const want = d.obs.desired?.version ?? null;
    const m = d.obs.report?.model;
    if (!m) continue;
    let next = { ...m };
    if (want === 2 && !m.failed.includes(2)) {
      if (d.behaviour === 'rollback') next = { ...m, active: 1, failed: [...m.failed, 2], metrics: metrics(1) };
      else if (d.behaviour === 'degraded') next = { ...m, active: 2, activeSha256: SHA, history: [2, 1], metrics: metrics(2, { errors: 30 }) };
      else next = { ...m, active: 2, activeSha256: SHA, history: [2, 1], metrics: metrics(2) };
    } else if (want !== null && want !== 2) {
      next = { ...m, active: want, activeSha256: null, metrics: metrics(want) };
    }
    d.obs.report = { desiredVersion: d.obs.desiredVersion, model: next };
  }
}

/** Runs reconcile, applies its actions, lets devices report; returns every decision. */
function drive(sp: RolloutSpecData, devices: FakeDevice[], start: RolloutStatus, t0: number, ticks: number, stepMs = 10_000): { status: RolloutStatus; decisions: Decision[] } {
  let status = start;
  const decisions: Decision[] = [];
  for (let i = 0; i < ticks; i++) {
    const d = reconcile(sp, status, { now: t0 + i * stepMs, devices: devices.map((x) => x.obs) });
    decisions.push(d);
    apply(devices, d);
    status = d.status;
    devicesReport(devices);
    if (status.state !== 'running') break;
  }
  return { status, decisions };
}

describe('rollout reconciler', () => {
  it('walks the default plan to 100 % when every device is healthy, and promotes the version', () => {
    const devices = fleet(200);
    const { status, decisions } = drive(spec(), devices, initialStatus(0), 0, 400, 20_000);
    expect(status.state).toBe('succeeded');
    expect(status.total.members).toBe(200);
    expect(status.total.committed).toBe(200);
    const actions = decisions.flatMap((d) => d.actions);
    expect(actions.filter((a) => a.kind === 'registry')).toEqual([expect.objectContaining({ status: 'production' })]);
    // Waves are cumulative: 1, then 5 % (10), then 25 % (50), then everything.
    expect(status.waves.map((w) => w.members)).toEqual([1, 9, 40, 150]);
    expect(devices.every((d) => d.obs.desired?.version === 2)).toBe(true);
  });

  it('halts at the canary when it rolls back, reverts it and quarantines the version', () => {
    const devices = fleet(100, () => 'rollback');
    const { status, decisions } = drive(spec(), devices, initialStatus(0), 0, 50);
    expect(status.state).toBe('halted');
    expect(status.total.members).toBe(1);
    expect(status.reason).toMatch(/failed-share/);
    const actions = decisions.flatMap((d) => d.actions);
    expect(actions).toContainEqual(expect.objectContaining({ kind: 'registry', status: 'quarantined' }));
    // The canary rolled back by itself: desired state names v1 again for it, and nobody else was touched.
    expect(devices.filter((d) => d.obs.desired?.version === 2)).toHaveLength(0);
    expect(devices.filter((d) => d.obs.member !== null)).toHaveLength(1);
  });

  it('a runtime gate (error rate against the stable devices) halts a version the devices themselves accept', () => {
    const devices = fleet(100, () => 'degraded');
    const { status } = drive(spec(), devices, initialStatus(0), 0, 50);
    expect(status.state).toBe('halted');
    expect(status.reason).toMatch(/error-rate/);
    expect(status.revert?.devices).toBe(1);
    // The revert goes out to every member; they report back on v1.
    devicesReport(devices);
    const after = reconcile(spec(), status, { now: 10_000_000, devices: devices.map((d) => d.obs) });
    expect(after.status.revert).toMatchObject({ devices: 1, reverted: 1 });
    expect(after.actions).toEqual([]);
  });

  it('picks the same canary whatever order devices come in (sticky hashing), and never re-enlists', () => {
    const a = fleet(50);
    const b = fleet(50).reverse();
    const da = reconcile(spec(), initialStatus(0), { now: 0, devices: a.map((d) => d.obs) });
    const db = reconcile(spec(), initialStatus(0), { now: 0, devices: b.map((d) => d.obs) });
    const pick = (d: Decision): string[] => d.actions.flatMap((x) => (x.kind === 'enlist' ? [x.deviceId] : []));
    expect(pick(da)).toEqual(pick(db));
    apply(a, da);
    // Level-triggered: the same observations again decide nothing new.
    const again = reconcile(spec(), da.status, { now: 1, devices: a.map((d) => d.obs) });
    expect(pick(again)).toEqual([]);
  });

  it('waits at an approval gate until approved', () => {
    const plan = RolloutPlan.parse({ steps: [{ type: 'wave', count: 1 }, { type: 'pause', untilApproved: true }, { type: 'wave', percent: 100 }] });
    const devices = fleet(10);
    const { status } = drive(spec(plan), devices, initialStatus(0), 0, 20);
    expect(status.state).toBe('awaiting-approval');
    const later = reconcile(spec(plan), status, { now: 9e9, devices: devices.map((d) => d.obs) });
    expect(later.status.state).toBe('awaiting-approval');
    expect(() => command(spec(plan), status, 'resume', 'op', undefined, { now: 1e6, devices: devices.map((d) => d.obs) })).toThrow(/only a paused/);
    const approved = command(spec(plan), status, 'approve', 'op', undefined, { now: 1e6, devices: devices.map((d) => d.obs) });
    expect(approved.status.state).toBe('running');
    apply(devices, approved);
    devicesReport(devices);
    const done = drive(spec(plan), devices, approved.status, 2e6, 10);
    expect(done.status.state).toBe('succeeded');
  });

  it('a wave with devices away past its timeout goes on when enough applied, else pauses as inconclusive', () => {
    const plan = RolloutPlan.parse({ steps: [{ type: 'wave', percent: 100, timeoutSec: 60, minAppliedShare: 0.8 }] });
    const mostly = fleet(10, (i) => (i === 0 ? 'offline' : 'healthy'));
    expect(drive(spec(plan), mostly, initialStatus(0), 0, 20).status.state).toBe('succeeded');
    const half = fleet(10, (i) => (i % 2 === 0 ? 'offline' : 'healthy'));
    const r = drive(spec(plan), half, initialStatus(0), 0, 20);
    expect(r.status.state).toBe('paused');
    expect(r.status.verdict).toBe('inconclusive');
    expect(r.status.reason).toMatch(/5 of 10 .*5 of those waiting offline/);
    // The offline devices come back and report: a resume starts the step again and it completes.
    for (const d of half) {
      d.behaviour = 'healthy';
      d.obs.online = true;
    }
    devicesReport(half);
    const resumed = command(spec(plan), r.status, 'resume', 'op', undefined, { now: 1e6, devices: half.map((d) => d.obs) });
    expect(resumed.status.state).toBe('succeeded');
  });

  it('takes online devices first, so a canary is never a device that is switched off; offline ones go in the last wave', () => {
    const plan = RolloutPlan.parse({ steps: [{ type: 'wave', count: 1 }, { type: 'wave', percent: 50 }, { type: 'wave', percent: 100, timeoutSec: 60, minAppliedShare: 0.5 }] });
    const ranked = fleet(20).sort((a, b) => (a.obs.rank < b.obs.rank ? -1 : 1));
    // The first five in the rollout's order are away.
    const away = new Set(ranked.slice(0, 5).map((d) => d.obs.id));
    const devices = fleet(20, (i) => (away.has(`dev-${String(i).padStart(5, '0')}`) ? 'offline' : 'healthy'));
    const first = reconcile(spec(plan), initialStatus(0), { now: 0, devices: devices.map((d) => d.obs) });
    const canary = first.actions.flatMap((a) => (a.kind === 'enlist' ? [a.deviceId] : []));
    expect(canary).toEqual([ranked[5]?.obs.id]);
    const { status, decisions } = drive(spec(plan), devices, initialStatus(0), 0, 20);
    expect(status.state).toBe('succeeded');
    const waveOf = new Map(decisions.flatMap((d) => d.actions.flatMap((a) => (a.kind === 'enlist' ? [[a.deviceId, a.wave] as const] : []))));
    expect([...away].map((id) => waveOf.get(id))).toEqual([3, 3, 3, 3, 3]);
    expect(status.waves.map((w) => w.pending)).toEqual([0, 0, 5]);
  });

  it('counts and ignores reports that contradict the fleet state', () => {
    const devices = fleet(20);
    // Not a member, yet claims to serve the target.
    const liar = devices[5] as FakeDevice;
    liar.obs.report = { desiredVersion: 2, model: { active: 2, activeSha256: SHA, history: [2, 1], failed: [], metrics: metrics(2) } };
    // A report of a desired version the fleet never issued.
    (devices[6] as FakeDevice).obs.report = { desiredVersion: 99, model: { active: 1, activeSha256: null, history: [1], failed: [2], metrics: metrics(1) } };
    const d = reconcile(spec(), initialStatus(0), { now: 0, devices: devices.map((x) => x.obs) });
    expect(d.status.contradictions).toBe(2);
    expect(d.status.total.serving).toBe(0);
    expect(d.status.total.failed).toBe(0);
  });

  it('holds while a selected device is in safe mode', () => {
    const devices = fleet(10);
    (devices[3] as FakeDevice).obs.safeMode = true;
    const d = reconcile(spec(), initialStatus(0), { now: 0, devices: devices.map((x) => x.obs) });
    expect(d.status.heldBy).toMatch(/safe mode/);
    expect(d.actions.filter((a) => a.kind === 'enlist')).toEqual([]);
  });

  it('an abort reverts every member to the exact slot it had, and refuses further commands', () => {
    const devices = fleet(40);
    const prevSlot: ModelSlot = { version: 1, manifestSha256: 'b'.repeat(64), shadow: { requests: 5 } };
    for (const d of devices) d.obs.desired = prevSlot;
    const { status } = drive(spec(), devices, initialStatus(0), 0, 8, 70_000);
    expect(status.total.members).toBeGreaterThan(1);
    const aborted = command(spec(), status, 'abort', 'op', 'bad', { now: 1e7, devices: devices.map((d) => d.obs) });
    expect(aborted.status.state).toBe('aborted');
    const reverts = aborted.actions.filter((a) => a.kind === 'revert');
    expect(reverts).toHaveLength(status.total.members);
    for (const r of reverts) expect(r).toMatchObject({ slot: prevSlot });
    expect(() => command(spec(), aborted.status, 'resume', 'op', undefined, { now: 1e7, devices: [] })).toThrow(/ended/);
  });
});

describe('rollout plans', () => {
  it('lists every error of an invalid plan at once', () => {
    const r = RolloutPlan.safeParse({
      steps: [
        { type: 'wave', percent: 10, count: 3 },
        { type: 'pause' },
        { type: 'analysis', windowSec: -1 },
        { type: 'wave', percent: 150 },
      ],
    });
    expect(r.success).toBe(false);
    if (!r.success) expect(r.error.issues.length).toBeGreaterThanOrEqual(4);
  });

  it('refuses waves that do not grow', () => {
    expect(RolloutPlan.safeParse({ steps: [{ type: 'wave', percent: 50 }, { type: 'wave', percent: 25 }] }).success).toBe(false);
  });

  it('wave targets round up and never exceed the selection', () => {
    expect(waveTarget({ type: 'wave', percent: 5, timeoutSec: 1, minAppliedShare: 1 }, 10_000)).toBe(500);
    expect(waveTarget({ type: 'wave', percent: 5, timeoutSec: 1, minAppliedShare: 1 }, 3)).toBe(1);
    expect(waveTarget({ type: 'wave', count: 50, timeoutSec: 1, minAppliedShare: 1 }, 3)).toBe(3);
  });

  it('worst() orders verdicts successful < running < inconclusive < failed', () => {
    fc.assert(
      fc.property(fc.array(fc.constantFrom(...VERDICTS)), (vs: GateVerdict[]) => {
        const w = worst(...vs);
        for (const v of vs) expect(VERDICTS.indexOf(w)).toBeGreaterThanOrEqual(VERDICTS.indexOf(v));
        if (vs.length === 0) expect(w).toBe('successful');
        else expect(vs).toContain(w);
      }),
    );
  });

  it('any JSON either parses as a plan or is refused with located errors; the reconciler never throws on a valid one', () => {
    const step = fc.oneof(
      fc.record({ type: fc.constant('wave'), percent: fc.option(fc.double({ min: -10, max: 120, noNaN: true }), { nil: undefined }), count: fc.option(fc.integer({ min: -2, max: 50 }), { nil: undefined }) }),
      fc.record({ type: fc.constant('pause'), seconds: fc.option(fc.integer({ min: -1, max: 100 }), { nil: undefined }), untilApproved: fc.option(fc.constantFrom(true, false), { nil: undefined }) }),
      fc.record({ type: fc.constant('analysis'), windowSec: fc.integer({ min: -1, max: 100 }), minDevices: fc.integer({ min: 0, max: 5 }) }),
      fc.anything(),
    );
    fc.assert(
      fc.property(fc.array(step, { maxLength: 8 }), fc.integer({ min: 0, max: 30 }), (steps, n) => {
        const r = RolloutPlan.safeParse({ steps: steps.map((s) => (s && typeof s === 'object' ? Object.fromEntries(Object.entries(s).filter(([, v]) => v !== undefined)) : s)) });
        if (!r.success) {
          expect(r.error.issues.length).toBeGreaterThan(0);
          return;
        }
        const devices = fleet(n);
        const { status, decisions } = drive(spec(r.data), devices, initialStatus(0), 0, 60, 100_000);
        const enlisted = decisions.flatMap((d) => d.actions).filter((a) => a.kind === 'enlist');
        expect(new Set(enlisted.map((a) => (a.kind === 'enlist' ? a.deviceId : ''))).size).toBe(enlisted.length);
        expect(enlisted.length).toBeLessThanOrEqual(n);
        expect(['running', 'paused', 'awaiting-approval', 'succeeded']).toContain(status.state);
      }),
      { numRuns: 200 },
    );
  });
});
