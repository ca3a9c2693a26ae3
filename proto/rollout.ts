import { z } from 'zod';
import { ID_PATTERN } from './topics.js';
import { ModelName, ModelVersion } from './model.js';

/**
 * Staged rollouts as data: a target version, the devices it is for, and the steps that take it
 * there. The fleet's reconciler (fleet-server/rollouts/reconcile.ts) is the only interpreter.
 */

const Id = z.string().regex(ID_PATTERN, 'letters, digits, ".", "_" or "-", at most 64, starting with a letter or digit');

/** A device tag: the same alphabet as ids. Devices get tags when provisioned (`devices.add`) or later (`devices.tag`). */
export const Tag = Id;
export const MAX_TAGS_PER_DEVICE = 32;

/**
 * Which devices: every device, the devices that carry every one of `tags`, or a list of ids.
 * Membership is evaluated whenever the reconciler runs, so a device tagged later joins later waves.
 */
export const Selector = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('all') }).strict(),
  z.object({ kind: z.literal('tags'), tags: z.array(Tag).min(1).max(16) }).strict(),
  z.object({ kind: z.literal('devices'), deviceIds: z.array(Id).min(1).max(100_000) }).strict(),
]);
export type Selector = z.infer<typeof Selector>;

export function selects(selector: Selector, device: { id: string; tags: readonly string[] }): boolean {
  switch (selector.kind) {
    case 'all':
      return true;
    case 'tags':
      return selector.tags.every((t) => device.tags.includes(t));
    case 'devices':
      return selector.deviceIds.includes(device.id);
  }
}

/**
 * Gates of an analysis step. Shares and rates are 0..1. The new version's figures come from the
 * devices that took it; the stable figures from the selected devices still on their previous version
 * (or, once none is left, from the figures taken when the rollout started).
 */
export const Gates = z
  .object({
    /** Largest share of the devices that took the version which rolled back, failed probation or refused it. */
    maxFailedShare: z.number().min(0).max(1).default(0.05),
    /** Largest error rate (errors / requests) on the new version, whatever the stable one does. */
    maxErrorRate: z.number().min(0).max(1).default(0.05),
    /** Largest rise of the error rate over the stable version's. */
    maxErrorRateIncrease: z.number().min(0).max(1).default(0.01),
    /** Largest ratio of the new version's latency p95 (median over devices) to the stable one's. */
    maxLatencyRatio: z.number().min(1).default(1.5),
    /** Largest fall of mean confidence (the stable version's minus the new one's). */
    maxConfidenceDrop: z.number().min(0).max(1).default(0.1),
    /** Requests a device must have served on a version before its figures count. */
    minRequests: z.number().int().min(0).default(20),
  })
  .strict();
export type Gates = z.infer<typeof Gates>;

/** Seconds a step may wait for devices (applied, or reporting) before the offline policy decides. */
const TimeoutSec = z.number().int().min(1).max(30 * 86_400);

export const WaveStep = z
  .object({
    type: z.literal('wave'),
    /** Cumulative: the wave brings the devices on the version to this share (or count) of the selected ones. */
    percent: z.number().gt(0).max(100).optional(),
    count: z.number().int().min(1).max(1_000_000).optional(),
    timeoutSec: TimeoutSec.default(900),
    /**
     * At the timeout, the wave counts as applied when at least this share of its devices reported
     * the version (or refused it); devices still away keep the version in desired state and catch up
     * when they return. Below it the rollout pauses as inconclusive, for a human.
     */
    minAppliedShare: z.number().min(0).max(1).default(0.9),
  })
  .strict();

export const PauseStep = z
  .object({
    type: z.literal('pause'),
    seconds: z.number().int().min(1).max(30 * 86_400).optional(),
    /** Wait until an operator approves (`rollout approve`). */
    untilApproved: z.literal(true).optional(),
  })
  .strict();

export const AnalysisStep = z
  .object({
    type: z.literal('analysis'),
    /** The observation window: gates run throughout, and it passes no sooner than this. A failed gate halts at once. */
    windowSec: z.number().int().min(0).max(7 * 86_400).default(60),
    /** Devices on the new version whose figures count, needed before the window can pass. */
    minDevices: z.number().int().min(1).max(1_000_000).default(1),
    /** After this, too few reporting devices is inconclusive: the rollout pauses for a human. */
    timeoutSec: TimeoutSec.default(900),
    gates: Gates.prefault({}),
  })
  .strict();

export const RolloutStep = z.discriminatedUnion('type', [WaveStep, PauseStep, AnalysisStep]);
export type RolloutStep = z.infer<typeof RolloutStep>;
export type WaveStep = z.infer<typeof WaveStep>;
export type PauseStep = z.infer<typeof PauseStep>;
export type AnalysisStep = z.infer<typeof AnalysisStep>;

export const MAX_PLAN_STEPS = 64;

export const RolloutPlan = z
  .object({
    steps: z.array(RolloutStep).min(1).max(MAX_PLAN_STEPS),
  })
  .strict()
  .superRefine((plan, ctx) => {
    let last = 0;
    let lastKind: 'percent' | 'count' | null = null;
    plan.steps.forEach((s, i) => {
      if (s.type === 'wave') {
        if ((s.percent === undefined) === (s.count === undefined)) {
          ctx.addIssue({ code: 'custom', path: ['steps', i], message: 'a wave gives exactly one of percent or count' });
          return;
        }
        const kind = s.percent !== undefined ? 'percent' : 'count';
        const v = s.percent ?? s.count ?? 0;
        if (kind === lastKind && v <= last) ctx.addIssue({ code: 'custom', path: ['steps', i], message: `waves are cumulative: ${v} does not grow past the previous wave's ${last}` });
        lastKind = kind;
        last = v;
      } else if (s.type === 'pause') {
        if ((s.seconds === undefined) === (s.untilApproved === undefined)) {
          ctx.addIssue({ code: 'custom', path: ['steps', i], message: 'a pause gives exactly one of seconds or untilApproved' });
        }
      }
    });
    if (!plan.steps.some((s) => s.type === 'wave')) ctx.addIssue({ code: 'custom', path: ['steps'], message: 'a plan needs at least one wave' });
  });
export type RolloutPlan = z.infer<typeof RolloutPlan>;
export type RolloutPlanInput = z.input<typeof RolloutPlan>;

/** One device canary, 5 %, 25 %, 100 %, each followed by an analysis with default gates. */
export function defaultPlan(): RolloutPlan {
  return RolloutPlan.parse({
    steps: [
      { type: 'wave', count: 1 },
      { type: 'analysis', windowSec: 60, minDevices: 1 },
      { type: 'wave', percent: 5 },
      { type: 'analysis', windowSec: 120 },
      { type: 'wave', percent: 25 },
      { type: 'analysis', windowSec: 300 },
      { type: 'wave', percent: 100 },
      { type: 'analysis', windowSec: 300 },
    ],
  });
}

/** What an operator submits. The fleet fills in the defaults and the target's manifest hash. */
export const RolloutSpec = z
  .object({
    name: ModelName,
    version: ModelVersion,
    selector: Selector.default({ kind: 'all' }),
    plan: RolloutPlan.optional(),
  })
  .strict();

// ---------------------------------------------------------------------------------------------
// Verdicts

/** Ordered best to worst; several verdicts combine into the worst of them. */
export const VERDICTS = ['successful', 'running', 'inconclusive', 'failed'] as const;
export type GateVerdict = (typeof VERDICTS)[number];

export function worst(...vs: GateVerdict[]): GateVerdict {
  let w: GateVerdict = 'successful';
  for (const v of vs) if (VERDICTS.indexOf(v) > VERDICTS.indexOf(w)) w = v;
  return w;
}

export const GATE_NAMES = ['failed-share', 'error-rate', 'latency', 'confidence', 'applied'] as const;
export type GateName = (typeof GATE_NAMES)[number];

export const GateResult = z
  .object({
    gate: z.enum(GATE_NAMES),
    verdict: z.enum(VERDICTS),
    /** The figure judged (null while there is none), and the limit it is judged against. */
    value: z.number().nullable(),
    limit: z.number().nullable(),
    detail: z.string().max(500).optional(),
  })
  .strict();
export type GateResult = z.infer<typeof GateResult>;

// ---------------------------------------------------------------------------------------------
// Status

export const ROLLOUT_STATES = [
  /** Moving through its steps. */
  'running',
  /** Stopped by an operator, or by an inconclusive step; resumes on `resume` (or `approve`). */
  'paused',
  /** At a `pause untilApproved` step. */
  'awaiting-approval',
  /** Reached the end of its plan. */
  'succeeded',
  /** A gate failed: the devices that took the version were reverted and the version quarantined. */
  'halted',
  /** An operator aborted it: reverted and quarantined as for a halt. */
  'aborted',
] as const;
export type RolloutState = (typeof ROLLOUT_STATES)[number];
export const FINAL_ROLLOUT_STATES: readonly RolloutState[] = ['succeeded', 'halted', 'aborted'];

/** Figures of one side of the comparison. */
export const CohortFigures = z
  .object({
    devices: z.number().int().min(0),
    requests: z.number().min(0),
    errorRate: z.number().nullable(),
    p95Ms: z.number().nullable(),
    meanConfidence: z.number().nullable(),
  })
  .strict();
export type CohortFigures = z.infer<typeof CohortFigures>;

/** Counts of the devices the rollout moved, by what they report of the target version. */
export const WaveCounts = z
  .object({
    /** Devices the rollout put on the version. */
    members: z.number().int().min(0),
    /** Reported serving it (probation or committed). */
    serving: z.number().int().min(0),
    /** Committed it (it passed probation there). */
    committed: z.number().int().min(0),
    /** Rolled it back, failed probation, or refused it. */
    failed: z.number().int().min(0),
    /** Nothing reported on it yet (offline, downloading, or not reached). */
    pending: z.number().int().min(0),
  })
  .strict();
export type WaveCounts = z.infer<typeof WaveCounts>;

export const RolloutStatus = z
  .object({
    state: z.enum(ROLLOUT_STATES),
    /** Index of the current step; `steps.length` once the plan is done. */
    step: z.number().int().min(0),
    stepStartedAt: z.number(),
    /** Why it is in this state, in words, when a human should know. */
    reason: z.string().max(1000).nullable(),
    /** Selected devices when last reconciled, and how many the current (cumulative) wave wants on the version. */
    selected: z.number().int().min(0),
    wanted: z.number().int().min(0),
    /** Per wave (1-based, in plan order), and in all. */
    waves: z.array(WaveCounts).max(64),
    total: WaveCounts,
    /** The last gate results of the current or last analysis step. */
    gates: z.array(GateResult).max(16),
    verdict: z.enum(VERDICTS).nullable(),
    /** The two cohorts the gates compare. */
    candidate: CohortFigures.nullable(),
    stable: CohortFigures.nullable(),
    /** Stable figures taken when the rollout started, used once no selected device is left on the stable version. */
    baseline: CohortFigures.nullable(),
    /** Device reports that contradicted the fleet's state: counted, never judged. */
    contradictions: z.number().int().min(0),
    /** Set while a safe mode covers selected devices: nothing advances. */
    heldBy: z.string().max(200).nullable(),
    /** After a halt or an abort: devices given their previous version back, and how many report serving it. */
    revert: z.object({ devices: z.number().int().min(0), reverted: z.number().int().min(0), startedAt: z.number() }).strict().nullable(),
    finishedAt: z.number().nullable(),
    updatedAt: z.number(),
  })
  .strict();
export type RolloutStatus = z.infer<typeof RolloutStatus>;

export const RolloutView = z.object({
  id: z.number().int(),
  name: z.string(),
  version: z.number(),
  manifestSha256: z.string(),
  selector: Selector,
  plan: RolloutPlan,
  createdBy: z.string(),
  createdAt: z.number(),
  status: RolloutStatus,
});
export type RolloutView = z.infer<typeof RolloutView>;

/** Operator intents the reconciler consumes: each is recorded, then judged against the state. */
export const ROLLOUT_COMMANDS = ['pause', 'resume', 'approve', 'abort'] as const;
export type RolloutCommand = (typeof ROLLOUT_COMMANDS)[number];

export const SafeModeRecord = z.object({
  id: z.number().int(),
  selector: Selector,
  since: z.number(),
  by: z.string(),
  reason: z.string().nullable(),
});
export type SafeModeRecord = z.infer<typeof SafeModeRecord>;
