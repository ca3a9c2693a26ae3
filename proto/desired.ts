import { createHash } from 'node:crypto';
import { z } from 'zod';
import { canonicalJson } from './codec.js';
import { ID_PATTERN } from './topics.js';
import { ModelSlot } from './model.js';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;

/** Agent settings the fleet may change remotely; the agent applies them without a restart. */
export const AgentSettings = z
  .object({
    logLevel: z.enum(LOG_LEVELS).default('info').describe('agent log level'),
    reportIntervalSec: z
      .number()
      .int()
      .min(10)
      .max(86_400)
      .default(300)
      .describe('seconds between periodic reported-state publications (one is also sent after every change)'),
    factsIntervalSec: z
      .number()
      .int()
      .min(60)
      .max(7 * 86_400)
      .default(3600)
      .describe('seconds between device-facts publications (one is also sent on every connect)'),
  })
  .strict();
export type AgentSettings = z.infer<typeof AgentSettings>;

/** The desired-state document of one device. Its version lives beside it, not inside it. */
export const DesiredDoc = z
  .object({
    agent: AgentSettings.prefault({}),
    models: z.record(z.string().regex(ID_PATTERN), ModelSlot).default({}),
    /**
     * Emergency safe mode: every model serves the device's pinned fallback version (held on the
     * device, never collected), whatever `models` names; absent when off. `models` is left as it
     * was, so leaving safe mode restores exactly the state from before.
     */
    safeMode: z.literal(true).optional(),
  })
  .strict();
export type DesiredDoc = z.infer<typeof DesiredDoc>;

export function defaultDesiredDoc(): DesiredDoc {
  return DesiredDoc.parse({});
}

/** RFC 6902 operations. Paths are JSON Pointers (RFC 6901). */
const Pointer = z.string().refine((p) => p === '' || p.startsWith('/'), 'a JSON Pointer starts with "/"');
export const PatchOperation = z.discriminatedUnion('op', [
  z.object({ op: z.literal('add'), path: Pointer, value: z.unknown() }).strict(),
  z.object({ op: z.literal('remove'), path: Pointer }).strict(),
  z.object({ op: z.literal('replace'), path: Pointer, value: z.unknown() }).strict(),
  z.object({ op: z.literal('move'), path: Pointer, from: Pointer }).strict(),
  z.object({ op: z.literal('copy'), path: Pointer, from: Pointer }).strict(),
  z.object({ op: z.literal('test'), path: Pointer, value: z.unknown() }).strict(),
]);
export type PatchOperation = z.infer<typeof PatchOperation>;
export const JsonPatch = z.array(PatchOperation).max(1000);
export type JsonPatch = z.infer<typeof JsonPatch>;

const Version = z.number().int().min(1).max(Number.MAX_SAFE_INTEGER);
const Digest = z.string().regex(/^[0-9a-f]{64}$/);

/**
 * `down/desired`, retained, QoS 1. Either the whole document at `version`, or the RFC 6902 patch
 * that takes version `from` to `to` (= from + 1). `digest` is the sha256 of the canonical JSON of
 * the resulting document, so the agent can prove it holds exactly what the fleet holds.
 */
export const DesiredMessage = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('full'), version: Version, digest: Digest, doc: DesiredDoc }).strict(),
  z
    .object({ kind: z.literal('patch'), from: Version, to: Version, digest: Digest, patch: JsonPatch })
    .strict()
    .refine((m) => m.to === m.from + 1, 'a patch goes from n to n + 1'),
]);
export type DesiredMessage = z.infer<typeof DesiredMessage>;

export function desiredDigest(doc: DesiredDoc): string {
  return createHash('sha256').update(canonicalJson(doc)).digest('hex');
}
