import { createHash } from 'node:crypto';
import { mulberry32 } from '../../common/random.js';
import { isValidId } from '../../proto/index.js';

/**
 * What simulated devices do, as data: a scenario names how many devices there are and which of
 * them misbehave, and how. Assignment is deterministic (a seeded hash of each device id), so the
 * same scenario gives the same devices the same behaviour on every run.
 */

export const BEHAVIOURS = ['healthy', 'failing-probation', 'slow', 'crashing', 'offline', 'flapping', 'degraded'] as const;
export type Behaviour = (typeof BEHAVIOURS)[number];

/** Behaviours of the link, whatever version is installed; the others concern versions of a model. */
const LINK_BEHAVIOURS: readonly Behaviour[] = ['offline', 'flapping'];
export type VersionBehaviour = Exclude<Behaviour, 'offline' | 'flapping'>;

/** The serving figures a version reports: what rollout gates compare. */
export interface MetricsProfile {
  requestsPerSec: number;
  errorRate: number;
  p95Ms: number;
  meanConfidence: number;
}

export interface ScenarioRule {
  behaviour: Behaviour;
  /**
   * Share of the scenario's devices, 0..1. Rules with a share take disjoint slices of the devices
   * (in seeded-hash order), so `failing-probation: 0.1` and `slow: 0.2` name 30% of the fleet.
   */
  share?: number;
  /** These devices, in addition to any share. A rule with neither share nor ids applies to every device. */
  ids?: string[];
  /** The versions it affects; default: every version the device installs (not those it starts with). */
  versions?: number[];
  /** The model it affects; default: every model. */
  model?: string;
  /** `degraded` and `slow`: figures to report for affected versions instead of the defaults. */
  metrics?: Partial<MetricsProfile>;
}

export interface Scenario {
  devices: number;
  /** Device ids are `<prefix>-<n>`, n zero-padded; default `sim`. */
  prefix?: string;
  /** Seeds share assignment and per-device noise; default `edgefleet-sim`. */
  seed?: string;
  rules?: ScenarioRule[];
}

/** Timings of simulated work. Defaults suit a rehearsal; tests shorten them. */
export interface SimTiming {
  /** Download and verification of a new version: uniform in [min, max]. */
  applyMs: readonly [number, number];
  /** The same for `slow` devices on affected versions. */
  slowApplyMs: readonly [number, number];
  probationMs: number;
  reportIntervalMs: number;
  /** A `crashing` device comes back this long after it went down. */
  crashRestartMs: number;
  /** Crashes on one version before the device marks it failed (the agent's models.maxAttempts). */
  maxAttempts: number;
  /** `flapping`: connected for [min, max], then away for flapDownMs. */
  flapUpMs: readonly [number, number];
  flapDownMs: number;
  /** After a connection the device did not end itself was lost: retry after [min, max]. */
  reconnectMs: readonly [number, number];
  /** Mean requests per second a healthy device serves (each device within ±25%). */
  requestsPerSec: number;
}

export const DEFAULT_TIMING: SimTiming = {
  applyMs: [50, 200],
  slowApplyMs: [3000, 8000],
  probationMs: 1000,
  reportIntervalMs: 5000,
  crashRestartMs: 1000,
  maxAttempts: 2,
  flapUpMs: [3000, 6000],
  flapDownMs: 1000,
  reconnectMs: [500, 1500],
  requestsPerSec: 20,
};

/** What a degraded version does by default, relative to the device's healthy figures. */
const DEGRADED = { errorRate: 0.08, p95Factor: 3, confidenceDrop: 0.3 };
const SLOW_P95_FACTOR = 2;

/** A uint32 of sha256(seed, text): stable across runs, processes and platforms. */
export function stableHash(seed: string, text: string): number {
  return createHash('sha256').update(seed).update('\0').update(text).digest().readUInt32BE(0);
}

/** A seeded PRNG, uniform in [0, 1). */
export const prng = mulberry32;

export function deviceIds(scenario: Scenario): string[] {
  const prefix = scenario.prefix ?? 'sim';
  const width = Math.max(4, String(scenario.devices).length);
  return Array.from({ length: scenario.devices }, (_, i) => `${prefix}-${String(i + 1).padStart(width, '0')}`);
}

/** Every error of a scenario at once; empty when it is valid. */
export function scenarioErrors(scenario: Scenario): string[] {
  const errors: string[] = [];
  if (!Number.isInteger(scenario.devices) || scenario.devices < 0) errors.push('devices must be a whole number ≥ 0');
  const sample = deviceIds({ ...scenario, devices: Math.max(1, scenario.devices) }).at(-1) as string;
  if (!isValidId(sample)) errors.push(`prefix ${JSON.stringify(scenario.prefix)} does not make valid device ids (e.g. ${sample})`);
  let total = 0;
  for (const [i, r] of (scenario.rules ?? []).entries()) {
    if (!BEHAVIOURS.includes(r.behaviour)) errors.push(`rules[${i}]: unknown behaviour ${JSON.stringify(r.behaviour)}`);
    if (r.share !== undefined && !(r.share >= 0 && r.share <= 1)) errors.push(`rules[${i}]: share must be within 0..1`);
    total += r.share ?? 0;
    if (r.versions?.some((v) => !Number.isInteger(v) || v < 1)) errors.push(`rules[${i}]: versions are whole numbers ≥ 1`);
    if (LINK_BEHAVIOURS.includes(r.behaviour) && (r.versions || r.model)) errors.push(`rules[${i}]: ${r.behaviour} concerns the link, not versions or models`);
  }
  if (total > 1 + 1e-9) errors.push(`shares add up to ${total}, more than 1`);
  return errors;
}

/**
 * The rules that apply to each device, in scenario order. Devices are ordered by a seeded hash of
 * their id, and each rule with a share takes the next slice of that order; slice bounds round the
 * running total, so the counts are exact and never overlap.
 */
export function assignRules(scenario: Scenario): Map<string, ScenarioRule[]> {
  const errors = scenarioErrors(scenario);
  if (errors.length > 0) throw new RangeError(`invalid scenario: ${errors.join('; ')}`);
  const ids = deviceIds(scenario);
  const seed = scenario.seed ?? 'edgefleet-sim';
  const order = ids.map((id) => ({ id, h: stableHash(seed, id) })).sort((a, b) => a.h - b.h || (a.id < b.id ? -1 : 1));
  const out = new Map<string, ScenarioRule[]>(ids.map((id) => [id, []]));
  let cumulative = 0;
  for (const rule of scenario.rules ?? []) {
    const members = new Set(rule.ids ?? []);
    if (rule.share !== undefined) {
      const from = Math.round(cumulative * ids.length);
      cumulative += rule.share;
      const to = Math.round(cumulative * ids.length);
      for (const { id } of order.slice(from, to)) members.add(id);
    }
    const everyone = rule.share === undefined && rule.ids === undefined;
    for (const [id, rules] of out) if (everyone || members.has(id)) rules.push(rule);
  }
  return out;
}

/** The behaviour of one device: what its link does, and what each version of each model does. */
export class DeviceProfile {
  readonly offline: boolean;
  readonly flapping: boolean;
  /** The device's own healthy figures: ±25% rate, p95 within 5–10 ms, confidence 0.88–0.92. */
  readonly healthy: MetricsProfile;

  constructor(
    readonly rules: readonly ScenarioRule[],
    /** Versions the device starts out holding, per model: unaffected by rules without `versions`. */
    private readonly initial: Readonly<Record<string, number>>,
    timing: SimTiming,
    random: () => number,
  ) {
    this.offline = rules.some((r) => r.behaviour === 'offline');
    this.flapping = rules.some((r) => r.behaviour === 'flapping');
    this.healthy = {
      requestsPerSec: timing.requestsPerSec * (0.75 + 0.5 * random()),
      errorRate: 0,
      p95Ms: 5 + 5 * random(),
      meanConfidence: 0.88 + 0.04 * random(),
    };
  }

  get behaviours(): Behaviour[] {
    return [...new Set(this.rules.map((r) => r.behaviour))];
  }

  /** The first rule that concerns this version of this model decides; none: healthy. */
  forVersion(model: string, version: number): { behaviour: VersionBehaviour; metrics: MetricsProfile } {
    for (const r of this.rules) {
      if (LINK_BEHAVIOURS.includes(r.behaviour)) continue;
      if (r.model !== undefined && r.model !== model) continue;
      const affected = r.versions ? r.versions.includes(version) : this.initial[model] !== version;
      if (affected) return { behaviour: r.behaviour as VersionBehaviour, metrics: this.metricsFor(r) };
    }
    return { behaviour: 'healthy', metrics: this.healthy };
  }

  private metricsFor(r: ScenarioRule): MetricsProfile {
    const h = this.healthy;
    switch (r.behaviour) {
      case 'degraded':
        return {
          ...h,
          errorRate: DEGRADED.errorRate,
          p95Ms: h.p95Ms * DEGRADED.p95Factor,
          meanConfidence: Math.max(0, h.meanConfidence - DEGRADED.confidenceDrop),
          ...r.metrics,
        };
      case 'slow':
        return { ...h, p95Ms: h.p95Ms * SLOW_P95_FACTOR, ...r.metrics };
      default:
        return { ...h, ...r.metrics };
    }
  }
}

/**
 * A rule as the CLI writes it: `behaviour[:share][@v1,v2][#model]`, e.g. `failing-probation:0.1@3`,
 * `slow:0.2`, `degraded:0.05@4#iris`, `crashing` (every device).
 */
export function parseRuleSpec(spec: string): ScenarioRule {
  const m = /^([a-z-]+)(?::([0-9.]+))?(?:@([0-9,]+))?(?:#([A-Za-z0-9._-]+))?$/.exec(spec);
  if (!m) throw new RangeError(`cannot read rule ${JSON.stringify(spec)}: expected behaviour[:share][@versions][#model]`);
  const [, behaviour, share, versions, model] = m;
  if (!BEHAVIOURS.includes(behaviour as Behaviour)) throw new RangeError(`unknown behaviour ${JSON.stringify(behaviour)}; one of ${BEHAVIOURS.join(', ')}`);
  const rule: ScenarioRule = { behaviour: behaviour as Behaviour };
  if (share !== undefined) {
    rule.share = Number(share);
    if (!(rule.share >= 0 && rule.share <= 1)) throw new RangeError(`share in ${JSON.stringify(spec)} must be within 0..1`);
  }
  if (versions !== undefined) rule.versions = versions.split(',').filter((v) => v !== '').map(Number);
  if (model !== undefined) rule.model = model;
  return rule;
}
