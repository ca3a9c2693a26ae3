import { z } from 'zod';
import { ModelTransfer, ModelVersion } from '../../proto/index.js';

/**
 * The lifecycle of one model slot: every state, every allowed transition, and what a restart does
 * in each state. The manager persists the new state before it starts the step's work, so after a
 * crash the file says which step was interrupted.
 *
 *   idle ─▶ downloading ─▶ verifying ─▶ staging ─┬─▶ shadow ─┐
 *                 │             │           │    └───────────┴─▶ activating ─▶ probation ─▶ committing ─▶ idle
 *                 └─────────────┴───────────┴──────▶ failed ─▶ idle         │            │
 *                                                                            └────────────┴─▶ rolling_back ─▶ idle
 *   idle ─▶ rolling_back (a regression after commit, policy `afterCommit: rollback`)
 *
 * `idle` also follows any pre-activation state when desired state moves on (the candidate is
 * abandoned, not failed).
 *
 * Two switches leave probation through `rolling_back`: a fleet revert (desired state names a
 * version held here; the candidate is marked failed), and safe mode (the slot goes to its pinned
 * fallback; the candidate is abandoned: `rolling_back` is persisted with no candidate, so a
 * restart there fails nothing). Safe mode's switches from `idle` stay in `idle`: only `serving`
 * and `safeMode` change, in one write.
 */
export const SLOT_STATES = ['idle', 'downloading', 'verifying', 'staging', 'shadow', 'activating', 'probation', 'committing', 'rolling_back', 'failed'] as const;
export type SlotStateName = (typeof SLOT_STATES)[number];

export const TRANSITIONS: Record<SlotStateName, readonly SlotStateName[]> = {
  // rolling_back from idle: a regression after commit, when the manifest says to roll back.
  idle: ['downloading', 'activating', 'rolling_back'],
  downloading: ['verifying', 'failed', 'idle'],
  verifying: ['staging', 'failed', 'idle'],
  staging: ['shadow', 'activating', 'failed', 'idle'],
  shadow: ['activating', 'failed', 'idle'],
  activating: ['probation', 'rolling_back'],
  probation: ['committing', 'rolling_back'],
  committing: ['idle'],
  rolling_back: ['idle'],
  failed: ['idle'],
};

/**
 * What a restart does, by the state the file was left in. Before activation the stable version
 * never stopped serving, so the candidate is simply tried again; from activation on, the device
 * goes back to its last stable version first (conservative), then tries again. Once the
 * candidate has run (staging onwards) the attempt counter rises, and past `maxAttempts` the
 * candidate is marked failed: a version that crashes the agent cannot loop forever. A restart
 * during download or verification resumes without counting: nothing of the candidate ran.
 */
export const ON_RESTART: Record<SlotStateName, 'nothing' | 'resume' | 'retry' | 'roll-back' | 'finish-commit' | 'finish-rollback' | 'finish-fail'> = {
  idle: 'nothing',
  downloading: 'resume',
  verifying: 'resume',
  staging: 'retry',
  shadow: 'retry',
  activating: 'roll-back',
  probation: 'roll-back',
  committing: 'finish-commit',
  rolling_back: 'finish-rollback',
  failed: 'finish-fail',
};

export function canTransition(from: SlotStateName, to: SlotStateName): boolean {
  return TRANSITIONS[from].includes(to);
}

export const FailedEntry = z.object({ version: ModelVersion, reason: z.string().max(64), at: z.number() });
export type FailedEntry = z.infer<typeof FailedEntry>;

/** The persisted state of a slot: `<stateDir>/models/slots/<name>.json`. */
export const SlotState = z.object({
  name: z.string(),
  state: z.enum(SLOT_STATES),
  /** Committed versions, newest first; `stable[0]` is what serves when nothing is on probation. */
  stable: z.array(ModelVersion),
  /** The version answering requests: `stable[0]`, the candidate while on probation, the fallback in safe mode. */
  serving: ModelVersion.nullable(),
  candidate: ModelVersion.nullable(),
  /** Attempts at the current candidate; reset when it commits or fails. */
  attempts: z.number().int().min(0),
  failed: z.array(FailedEntry),
  /** Never collected; served when neither the active version nor any stable one verifies. */
  fallback: ModelVersion.nullable(),
  /**
   * Downloads below the floor are refused unless in `stable`. A version held here (in `stable`, or
   * the pinned fallback) is served by a local switch, which fetches nothing and needs no floor check.
   */
  floor: z.number().int().min(0),
  /** Total transitions taken, for reports and crash-loop diagnosis. */
  transitions: z.number().int().min(0),
  lastVerdict: z.record(z.string(), z.unknown()).nullable(),
  /**
   * Each stable version's latency as measured here on its probation, kept so that a candidate is
   * compared against it even when the agent restarted since (and has few fresh samples).
   */
  latency: z.array(z.object({ version: ModelVersion, p50Ms: z.number(), p95Ms: z.number() })).max(64).default([]),
  /**
   * Desired state put the device in safe mode and the slot serves its fallback. When safe mode
   * ends the slot switches back (to `stable[0]`, or to a held version desired state names) and this
   * clears in the same write; it is persisted so that a restart knows the fallback serves on purpose.
   */
  safeMode: z.boolean().default(false),
  /** Bytes the last download for this slot took and saved. */
  transfer: ModelTransfer.nullable().default(null),
  updatedAt: z.number(),
});
export type SlotState = z.infer<typeof SlotState>;

export function newSlotState(name: string): SlotState {
  return { name, state: 'idle', stable: [], serving: null, candidate: null, attempts: 0, failed: [], fallback: null, floor: 0, transitions: 0, lastVerdict: null, latency: [], safeMode: false, transfer: null, updatedAt: Date.now() };
}
