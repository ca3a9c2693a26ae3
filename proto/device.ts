import { z } from 'zod';
import { AgentSettings } from './desired.js';
import { ModelName, ModelSlotReport } from './model.js';

/** `up/status`, retained. Also the Last Will (`offline`), so `ts` is optional. */
export const StatusMessage = z
  .object({
    state: z.enum(['online', 'offline']),
    /**
     * The agent's connection counter, persisted on the device and raised on every connect. The Last
     * Will carries the value of its own session, so a late will from an older session (a broker
     * restart can publish one long after the device came back) is recognised and ignored.
     */
    session: z.number().int().nonnegative(),
    ts: z.number().int().nonnegative().optional(),
    agentVersion: z.string().max(64).optional(),
  })
  .strict();
export type StatusMessage = z.infer<typeof StatusMessage>;

const Bytes = z.number().nonnegative();

/** `up/facts`: what the device is, collected by the agent with systeminformation. */
export const FactsMessage = z
  .object({
    collectedAt: z.number().int().nonnegative(),
    hostname: z.string().max(255),
    agentVersion: z.string().max(64),
    node: z.string().max(64),
    os: z.object({
      platform: z.string().max(64),
      distro: z.string().max(128),
      release: z.string().max(128),
      kernel: z.string().max(128),
      arch: z.string().max(32),
    }),
    board: z.object({
      manufacturer: z.string().max(128),
      model: z.string().max(128),
    }),
    cpu: z.object({
      brand: z.string().max(128),
      cores: z.number().int().nonnegative(),
      speedGHz: z.number().nonnegative().nullable(),
    }),
    memory: z.object({ totalBytes: Bytes, availableBytes: Bytes }),
    disks: z.array(z.object({ mount: z.string().max(255), sizeBytes: Bytes, usedBytes: Bytes })).max(64),
    temperatureC: z.number().min(-100).max(250).nullable(),
    runtimes: z.object({
      onnxruntime: z.string().max(64).nullable(),
      tfjsBackend: z.string().max(64).nullable(),
    }),
  })
  .strict();
export type FactsMessage = z.infer<typeof FactsMessage>;

/** `up/reported`: what the agent actually runs, after reconciling toward desired state. */
export const ReportedMessage = z
  .object({
    ts: z.number().int().nonnegative(),
    /** The desired-state version this report reflects; 0 before the first desired state arrived. */
    desiredVersion: z.number().int().nonnegative(),
    agent: AgentSettings,
    /** Per model slot: what serves, the stable history, failures, the pinned fallback, the last verdict. */
    models: z.record(ModelName, ModelSlotReport),
  })
  .strict();
export type ReportedMessage = z.infer<typeof ReportedMessage>;

/** `up/resync`: the agent asks for the whole desired document (its version did not line up). */
export const ResyncMessage = z
  .object({
    have: z.number().int().nonnegative(),
    reason: z.enum(['version-gap', 'patch-failed', 'digest-mismatch', 'invalid-message', 'startup']),
  })
  .strict();
export type ResyncMessage = z.infer<typeof ResyncMessage>;
