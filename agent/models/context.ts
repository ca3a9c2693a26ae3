import type { RecordClass } from '../../proto/index.js';
import type { SampleInput } from '../learner/sample-store.js';
import type { Logger } from '../../common/log.js';
import type { FetchAuth } from './fetch.js';
import type { Slot } from './slot.js';
import type { ModelStore } from './store.js';
import type { Trust } from './trust.js';

export interface ModelManagerOptions {
  stateDir: string;
  /** Raw Ed25519 fleet public keys (base64) this device trusts. */
  trustedKeys: string[];
  fetch: FetchAuth | null;
  keepStable: number;
  maxModelBytes: number;
  maxAttempts: number;
  childCheckTimeoutMs: number;
  /** Seconds between health checks while on probation. */
  checkIntervalMs: number;
  /** Delta downloads (patches against files held, or compressed images); null: whole files only. */
  delta?: { offerTimeoutMs: number } | null;
  report: (cls: RecordClass, type: string, body: unknown) => void;
  onChange: () => void;
  log: Logger;
  /** Report sample counts (the device takes part in federated rounds). Default true. */
  reportSamples?: boolean;
  feedback?: {
    record(requestId: string, model: string, version: number, input?: SampleInput): void;
    label(model: string, requestId: string, label: unknown): boolean;
    addSample(model: string, input: Float32Array, featureShape: number[], label: unknown): number;
    sampleCount(model: string): number;
  };
}

/**
 * What the slot steps (steps.ts, versions.ts, candidate.ts, shadow.ts, probation.ts, switch.ts)
 * need from the manager that owns the slots: its options, the store and trust, whether safe mode
 * holds, and a way to schedule the slot's next pass.
 */
export interface SlotContext {
  readonly opts: ModelManagerOptions;
  readonly store: ModelStore;
  readonly trust: Trust;
  /** Desired state says safe mode (read at the time of asking: reconcile flips it). */
  inSafeMode(): boolean;
  /** Runs one pass of the slot toward desired state, or queues one behind the pass under way. */
  kick(slot: Slot): void;
  /** Logs a task that nobody awaits when it fails. */
  track(p: Promise<unknown>): void;
}
