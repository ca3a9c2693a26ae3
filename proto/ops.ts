import { z } from 'zod';
import { ERROR_CODES } from './errors.js';
import { DesiredDoc, JsonPatch } from './desired.js';
import { FactsMessage, ReportedMessage } from './device.js';
import { ID_PATTERN } from './topics.js';
import { Backlog, RECORD_CLASSES } from './telemetry.js';
import { RolloutPlan, RolloutView, SafeModeRecord, Selector, Tag, MAX_TAGS_PER_DEVICE } from './rollout.js';
import { KeyEndorsement, MODEL_RUNTIMES, MODEL_STATUSES, Manifest, ModelName, ModelSlot, ModelVersion, Sha256, SignedManifest } from './model.js';
import { RoundConfig, RoundView } from './fl.js';

/** Operator roles, least to most privileged. A method names the least role that may call it. */
export const ROLES = ['viewer', 'operator', 'admin'] as const;
export type Role = (typeof ROLES)[number];
export function roleAllows(have: Role, need: Role): boolean {
  return ROLES.indexOf(have) >= ROLES.indexOf(need);
}

const Id = z.string().regex(ID_PATTERN, 'letters, digits, ".", "_" or "-", at most 64, starting with a letter or digit');
const CorrelationId = z.string().min(1).max(64);

/** `ops/{operator}/req`. */
export const OpsRequest = z
  .object({ id: CorrelationId, method: z.string().max(64), params: z.unknown().optional() })
  .strict();
export type OpsRequest = z.infer<typeof OpsRequest>;

export const ErrorBody = z.object({
  code: z.enum(ERROR_CODES as [string, ...string[]]),
  message: z.string(),
  details: z.unknown().optional(),
});
export type ErrorBody = z.infer<typeof ErrorBody>;

/** `ops/{operator}/res`. `id` echoes the request's; null when the request could not be read at all. */
export const OpsReply = z.discriminatedUnion('ok', [
  z.object({ id: CorrelationId.nullable(), ok: z.literal(true), data: z.unknown() }).strict(),
  z.object({ id: CorrelationId.nullable(), ok: z.literal(false), error: ErrorBody }).strict(),
]);
export type OpsReply = z.infer<typeof OpsReply>;

const Presence = z.enum(['online', 'offline', 'never']);

export const DeviceSummary = z.object({
  deviceId: z.string(),
  presence: Presence,
  lastSeen: z.number().nullable(),
  desiredVersion: z.number(),
  reportedVersion: z.number().nullable(),
  inSync: z.boolean(),
  createdAt: z.number(),
  tags: z.array(z.string()),
  /** Desired state puts the device in safe mode. */
  safeMode: z.boolean(),
});
export type DeviceSummary = z.infer<typeof DeviceSummary>;

/** The fleet's view of a device's telemetry: what arrived, and the agent's own account of what it still holds. */
export const TelemetrySummary = z.object({
  lastSeq: z.number(),
  received: z.number(),
  /** Records that arrived again (a redelivery or a replay) and were dropped by deduplication. */
  duplicates: z.number(),
  backlog: Backlog,
  reportedAt: z.number(),
});
export type TelemetrySummary = z.infer<typeof TelemetrySummary>;

export const TelemetryEntry = z.object({
  seq: z.number(),
  cls: z.enum(RECORD_CLASSES),
  type: z.string(),
  ts: z.number(),
  receivedAt: z.number(),
  body: z.unknown(),
});
export type TelemetryEntry = z.infer<typeof TelemetryEntry>;

export const DeviceDetail = DeviceSummary.extend({
  facts: FactsMessage.nullable(),
  desired: DesiredDoc,
  reported: ReportedMessage.nullable(),
  /** RFC 6902 patch that would take the reported state to the desired one; empty when in sync. */
  drift: JsonPatch,
  rejectedMessages: z.number(),
  telemetry: TelemetrySummary.nullable(),
});
export type DeviceDetail = z.infer<typeof DeviceDetail>;

export const AuditEntry = z.object({
  seq: z.number(),
  ts: z.number(),
  actor: z.string(),
  action: z.string(),
  target: z.string().nullable(),
  ok: z.boolean(),
  detail: z.unknown(),
});
export type AuditEntry = z.infer<typeof AuditEntry>;

export const Credential = z.object({ username: z.string(), password: z.string(), brokerUrl: z.string() });

/**
 * What an operator publishes: a manifest without the parts the registry fills in. `version`
 * defaults to the next one of the name; `createdAt` is the registry's clock; `expiresAt` (ms since
 * the epoch) defaults to never. The registry signs the result.
 */
export const ModelDraft = z
  .object({ ...Manifest.shape, version: ModelVersion.optional(), expiresAt: Manifest.shape.expiresAt.default(null) })
  .omit({ createdAt: true })
  .strict();
export type ModelDraft = z.infer<typeof ModelDraft>;
export type ModelDraftInput = z.input<typeof ModelDraft>;

/**
 * `models.publish` takes the draft inline, or, when it is too large for an operator request (golden
 * vectors of images), the sha256 of the draft's JSON uploaded to the artifact server beforehand.
 */
export const ModelPublishParams = z.union([ModelDraft, z.object({ draftSha256: Sha256 }).strict()]);

export const ModelVersionSummary = z.object({
  name: z.string(),
  version: z.number(),
  status: z.enum(MODEL_STATUSES),
  manifestSha256: z.string(),
  runtime: z.enum(MODEL_RUNTIMES),
  parent: z.number().nullable(),
  expiresAt: z.number().nullable(),
  sizeBytes: z.number(),
  createdAt: z.number(),
  statusAt: z.number(),
});
export type ModelVersionSummary = z.infer<typeof ModelVersionSummary>;

const RolloutCommandParams = z.object({ id: z.number().int().min(1), reason: z.string().max(500).optional() }).strict();

/** A plan as an operator writes it, before the fleet validates it (EF_PLAN_INVALID lists every error). */
export const RolloutPlanParam = RolloutPlan;

const FleetPublicKey = z.object({ keyId: z.string(), publicKey: z.string(), createdAt: z.number() });

/**
 * Every operator method: its parameters, its result, and the least role allowed to call it.
 * The fleet validates params with these schemas; the CLI validates results with them.
 */
export const FlSchedule = z
  .object({ id: z.number().int(), config: RoundConfig, everySec: z.number().int(), nextAt: z.number(), createdBy: z.string(), createdAt: z.number() })
  .strict();
export type FlSchedule = z.infer<typeof FlSchedule>;

export const METHODS = {
  'devices.list': { role: 'viewer', params: z.object({}).strict(), result: z.object({ devices: z.array(DeviceSummary) }) },
  'devices.show': { role: 'viewer', params: z.object({ deviceId: Id }).strict(), result: DeviceDetail },
  'devices.add': {
    role: 'admin',
    params: z.object({ deviceId: Id, tags: z.array(Tag).max(MAX_TAGS_PER_DEVICE).optional() }).strict(),
    result: z.object({ deviceId: z.string(), credential: Credential }),
  },
  'devices.tag': {
    role: 'operator',
    /** Adds and removes tags of each device (all or none); rollouts and safe mode select by them. */
    params: z
      .object({ deviceIds: z.array(Id).min(1).max(100_000), add: z.array(Tag).max(MAX_TAGS_PER_DEVICE).default([]), remove: z.array(Tag).max(MAX_TAGS_PER_DEVICE).default([]) })
      .strict(),
    result: z.object({ devices: z.array(z.object({ deviceId: z.string(), tags: z.array(z.string()) })) }),
  },
  'devices.remove': { role: 'admin', params: z.object({ deviceId: Id }).strict(), result: z.object({ deviceId: z.string() }) },
  'desired.get': {
    role: 'viewer',
    params: z.object({ deviceId: Id }).strict(),
    result: z.object({ deviceId: z.string(), version: z.number(), doc: DesiredDoc }),
  },
  'desired.set': {
    role: 'operator',
    params: z
      .object({
        deviceId: Id,
        patch: JsonPatch.optional(),
        doc: z.unknown().optional(),
        /** Optimistic concurrency: refuse if the document is no longer at this version. */
        baseVersion: z.number().int().min(1).optional(),
      })
      .strict()
      .refine((p) => (p.patch === undefined) !== (p.doc === undefined), 'give exactly one of patch or doc'),
    result: z.object({ deviceId: z.string(), version: z.number(), doc: DesiredDoc, changed: z.boolean() }),
  },
  'audit.list': {
    role: 'viewer',
    params: z
      .object({ limit: z.number().int().min(1).max(10_000).default(100), target: z.string().max(128).optional() })
      .strict(),
    result: z.object({ entries: z.array(AuditEntry) }),
  },
  'operators.add': {
    role: 'admin',
    params: z.object({ name: Id, role: z.enum(ROLES) }).strict(),
    result: z.object({ name: z.string(), role: z.enum(ROLES), credential: Credential }),
  },
  'operators.list': {
    role: 'viewer',
    params: z.object({}).strict(),
    result: z.object({ operators: z.array(z.object({ name: z.string(), role: z.enum(ROLES), createdAt: z.number() })) }),
  },
  'operators.remove': { role: 'admin', params: z.object({ name: Id }).strict(), result: z.object({ name: z.string() }) },
  'telemetry.list': {
    role: 'viewer',
    params: z
      .object({
        deviceId: Id,
        limit: z.number().int().min(1).max(1000).default(50),
        cls: z.enum(RECORD_CLASSES).optional(),
        /** Paging: records below this sequence number. */
        beforeSeq: z.number().int().min(1).optional(),
      })
      .strict(),
    result: z.object({ deviceId: z.string(), records: z.array(TelemetryEntry) }),
  },
  'fleet.stats': {
    role: 'viewer',
    params: z.object({}).strict(),
    result: z.object({
      devices: z.number(),
      online: z.number(),
      inSync: z.number(),
      /** Inbound messages refused, by error code. */
      rejected: z.record(z.string(), z.number()),
    }),
  },
  'models.publish': {
    role: 'operator',
    params: ModelPublishParams,
    result: z.object({ name: z.string(), version: z.number(), status: z.enum(MODEL_STATUSES), manifestSha256: z.string() }),
  },
  'models.list': {
    role: 'viewer',
    params: z.object({ name: ModelName.optional(), limit: z.number().int().min(1).max(10_000).default(1000) }).strict(),
    result: z.object({ versions: z.array(ModelVersionSummary) }),
  },
  'models.show': {
    role: 'viewer',
    /** Without a version: the newest one. */
    params: z.object({ name: ModelName, version: ModelVersion.optional() }).strict(),
    result: ModelVersionSummary.extend({
      signed: SignedManifest,
      audit: z.array(AuditEntry),
      /** Summed over the devices that reported installing this version. */
      transfer: z.object({
        devices: z.number(),
        downloadedBytes: z.number(),
        savedBytes: z.number(),
        reusedBytes: z.number(),
        patchedFiles: z.number(),
        fullFiles: z.number(),
        fallbacks: z.number(),
      }),
    }),
  },
  'models.setStatus': {
    role: 'operator',
    params: z.object({ name: ModelName, version: ModelVersion, status: z.enum(MODEL_STATUSES), reason: z.string().max(500).optional() }).strict(),
    result: z.object({ name: z.string(), version: z.number(), status: z.enum(MODEL_STATUSES), previous: z.enum(MODEL_STATUSES) }),
  },
  'models.assign': {
    role: 'operator',
    /** Sets desired `models[name]` of each device (all or none); refuses quarantined, deprecated and expired versions. */
    params: z
      .object({ name: ModelName, version: ModelVersion, deviceIds: z.array(Id).min(1).max(1000), shadow: ModelSlot.shape.shadow })
      .strict(),
    result: z.object({
      name: z.string(),
      version: z.number(),
      manifestSha256: z.string(),
      devices: z.array(z.object({ deviceId: z.string(), desiredVersion: z.number(), changed: z.boolean() })),
    }),
  },
  'models.provisioning': {
    role: 'viewer',
    /** What a new agent's `models` settings need: where to download, and which fleet key to trust. */
    params: z.object({}).strict(),
    result: z.object({ artifactsUrl: z.string(), trustedKeys: z.array(z.string()) }),
  },
  'keys.show': {
    role: 'viewer',
    params: z.object({}).strict(),
    result: FleetPublicKey.extend({ root: FleetPublicKey, chain: z.array(KeyEndorsement) }),
  },
  'keys.rotate': {
    role: 'admin',
    params: z.object({}).strict(),
    result: z.object({ keyId: z.string(), previousKeyId: z.string(), publicKey: z.string(), chainLength: z.number() }),
  },
  'rollouts.start': {
    role: 'operator',
    /**
     * Starts a staged rollout of a version to the selected devices (default: all) with a plan
     * (default: defaultPlan()). An invalid plan is refused with EF_PLAN_INVALID and every error in
     * `details`. A version every selected device already has in desired state starts nothing and
     * says so in `noop`.
     */
    params: z.object({ name: ModelName, version: ModelVersion, selector: Selector.optional(), plan: z.unknown().optional() }).strict(),
    result: z.object({ rollout: RolloutView.nullable(), noop: z.string().nullable() }),
  },
  'rollouts.list': {
    role: 'viewer',
    params: z.object({ name: ModelName.optional(), active: z.boolean().optional(), limit: z.number().int().min(1).max(1000).default(50) }).strict(),
    result: z.object({ rollouts: z.array(RolloutView) }),
  },
  'rollouts.show': { role: 'viewer', params: z.object({ id: z.number().int().min(1) }).strict(), result: RolloutView },
  'rollouts.pause': { role: 'operator', params: RolloutCommandParams, result: RolloutView },
  'rollouts.resume': { role: 'operator', params: RolloutCommandParams, result: RolloutView },
  'rollouts.approve': { role: 'operator', params: RolloutCommandParams, result: RolloutView },
  'rollouts.abort': { role: 'operator', params: RolloutCommandParams, result: RolloutView },
  'safeMode.on': {
    role: 'operator',
    /** Puts the selected devices (default: all) on each one's pinned fallback model and holds rollouts that reach them. */
    params: z.object({ selector: Selector.optional(), reason: z.string().max(500).optional() }).strict(),
    result: z.object({ record: SafeModeRecord, devices: z.number() }),
  },
  'safeMode.off': {
    role: 'operator',
    /** Ends safe mode: every record (no selector), or the records with exactly this selector. Devices return to the desired state from before. */
    params: z.object({ selector: Selector.optional() }).strict(),
    result: z.object({ ended: z.array(SafeModeRecord), devices: z.number() }),
  },
  'safeMode.status': {
    role: 'viewer',
    params: z.object({}).strict(),
    result: z.object({
      records: z.array(SafeModeRecord),
      /** Devices in safe mode, and those whose latest report shows every model on its fallback under that desired state. */
      devices: z.number(),
      converged: z.number(),
    }),
  },
  'fl.start': {
    role: 'operator',
    /**
     * Starts a federated round now (RoundConfig; see Federated learning). A round that cannot reach
     * its quorum (too few eligible devices) is recorded as failed with the reason and returned; a
     * model with an unfinished round: EF_ROUND_CONFLICT.
     */
    params: z.object({ config: z.unknown() }).strict(),
    result: RoundView,
  },
  'fl.list': {
    role: 'viewer',
    params: z.object({ model: ModelName.optional(), active: z.boolean().optional(), limit: z.number().int().min(1).max(1000).default(50) }).strict(),
    result: z.object({ rounds: z.array(RoundView) }),
  },
  'fl.show': { role: 'viewer', params: z.object({ id: z.number().int().min(1) }).strict(), result: RoundView },
  'fl.abort': { role: 'operator', params: z.object({ id: z.number().int().min(1) }).strict(), result: RoundView },
  'fl.schedule': {
    role: 'operator',
    /** Starts a round with `config` every `everySec` seconds (at least 60), the first at once; a round still running skips its turn. */
    params: z.object({ config: z.unknown(), everySec: z.number().int().min(60) }).strict(),
    result: FlSchedule,
  },
  'fl.schedules': { role: 'viewer', params: z.object({}).strict(), result: z.object({ schedules: z.array(FlSchedule) }) },
  'fl.unschedule': { role: 'operator', params: z.object({ id: z.number().int().min(1) }).strict(), result: z.object({ removed: z.boolean() }) },
} as const satisfies Record<string, { role: Role; params: z.ZodType; result: z.ZodType }>;

export type Method = keyof typeof METHODS;
export type MethodParams<M extends Method> = z.input<(typeof METHODS)[M]['params']>;
export type MethodResult<M extends Method> = z.output<(typeof METHODS)[M]['result']>;

export function isMethod(m: string): m is Method {
  return Object.prototype.hasOwnProperty.call(METHODS, m);
}
