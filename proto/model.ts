import { createHash, createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { z } from 'zod';
import { canonicalJson } from './codec.js';
import { EdgefleetError } from './errors.js';
import { ID_PATTERN } from './topics.js';

/**
 * Model versions: the manifest the fleet signs, the envelope that carries the signature, and the
 * key chain that lets a device provisioned with an old fleet key trust a rotated one.
 */

export const MODEL_RUNTIMES = ['onnx', 'tfjs-graph', 'tfjs-layers'] as const;
export type ModelRuntime = (typeof MODEL_RUNTIMES)[number];

/** Tensor element types, named as ONNX names them. `bool` travels as uint8. */
export const DTYPES = ['float32', 'float64', 'int8', 'uint8', 'int16', 'int32', 'int64', 'bool'] as const;
export type Dtype = (typeof DTYPES)[number];

export const MODEL_STATUSES = ['candidate', 'approved', 'production', 'quarantined', 'deprecated'] as const;
export type ModelStatus = (typeof MODEL_STATUSES)[number];

/** Status changes the registry allows; anything else is refused. Quarantine and deprecation are terminal for serving. */
export const STATUS_TRANSITIONS: Record<ModelStatus, readonly ModelStatus[]> = {
  candidate: ['approved', 'quarantined', 'deprecated'],
  approved: ['production', 'quarantined', 'deprecated'],
  production: ['quarantined', 'deprecated'],
  quarantined: ['deprecated'],
  deprecated: [],
};

export const Sha256 = z.string().regex(/^[0-9a-f]{64}$/, 'a lower-case hex sha256');
export const ModelName = z.string().regex(ID_PATTERN, 'letters, digits, ".", "_" or "-", at most 64, starting with a letter or digit');
export const ModelVersion = z.number().int().min(1).max(2 ** 31 - 1);

/** Largest single artifact file the registry accepts and a device downloads (per-file cap, also enforced by the artifact server). */
export const MAX_ARTIFACT_FILE_BYTES = 2 * 1024 * 1024 * 1024;
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

/** A relative path inside a model directory: no `..`, no absolute paths, no backslashes. */
const FilePath = z
  .string()
  .min(1)
  .max(255)
  .regex(/^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/, 'a relative path of letters, digits, ".", "_", "-" and "/"')
  .refine((p) => !p.split('/').some((s) => s === '.' || s === '..'), 'no "." or ".." segments');

export const ModelFile = z.object({ path: FilePath, sha256: Sha256, size: z.number().int().min(0).max(MAX_ARTIFACT_FILE_BYTES) }).strict();
export type ModelFile = z.infer<typeof ModelFile>;

/** -1 is a dimension of any size (a batch axis, say). */
const Dim = z.number().int().min(-1).max(2 ** 31 - 1);

export const TensorSpec = z
  .object({
    name: z.string().min(1).max(256),
    dtype: z.enum(DTYPES),
    shape: z.array(Dim).max(8),
    /** Valid values, inclusive, where known: an input outside is refused with a 400 naming it. */
    range: z.object({ min: z.number(), max: z.number() }).strict().optional(),
  })
  .strict();
export type TensorSpec = z.infer<typeof TensorSpec>;

/** A tensor in JSON: row-major data. int64 values travel as numbers and must be safe integers. */
export const TensorValue = z
  .object({ shape: z.array(z.number().int().min(0)).max(8), data: z.array(z.number()).max(1 << 20) })
  .strict()
  .refine((t) => t.data.length === t.shape.reduce((a, b) => a * b, 1), 'data length must equal the product of the shape');
export type TensorValue = z.infer<typeof TensorValue>;

export const GoldenVector = z
  .object({ inputs: z.record(z.string(), TensorValue), outputs: z.record(z.string(), TensorValue) })
  .strict();
export type GoldenVector = z.infer<typeof GoldenVector>;

export const Golden = z
  .object({
    /** |actual - expected| <= abs + rel * |expected|, element by element. */
    tolerance: z.object({ abs: z.number().min(0).default(1e-4), rel: z.number().min(0).default(1e-3) }).strict().prefault({}),
    vectors: z.array(GoldenVector).max(64).default([]),
  })
  .strict();
export type Golden = z.infer<typeof Golden>;

/** A histogram over fixed bin edges: `edges.length === probs.length + 1`; values outside go to the end bins. */
export const Histogram = z
  .object({ edges: z.array(z.number()).min(2).max(101), probs: z.array(z.number().min(0).max(1)).min(1).max(100) })
  .strict()
  .refine((h) => h.edges.length === h.probs.length + 1, 'edges must be one longer than probs');
export type Histogram = z.infer<typeof Histogram>;

export const Baseline = z
  .object({
    outputs: z.record(z.string(), Histogram).default({}),
    inputs: z.record(z.string(), Histogram).default({}),
  })
  .strict();
export type Baseline = z.infer<typeof Baseline>;

/**
 * What the device checks while a version is on probation, and how it watches after commit.
 * Defaults are deliberately lenient: a check with no figure set only compares against the
 * previous version or is skipped.
 */
export const HealthPolicy = z
  .object({
    /** Probation ends after this many requests and this many seconds, whichever is later. */
    probationRequests: z.number().int().min(0).max(1_000_000).default(50),
    probationSec: z.number().min(0).max(7 * 86_400).default(60),
    latencyP95Ms: z.number().positive().optional(),
    /** Largest allowed p95 over the previous version's p95 on this device (the p50 must have moved as much too). */
    latencyRatioMax: z.number().min(1).default(2),
    /** A p95 within this many ms of the previous version's never counts against it: scheduling noise on a busy device. */
    latencySlackMs: z.number().min(0).default(2),
    errorRateMax: z.number().min(0).max(1).default(0.01),
    nanRateMax: z.number().min(0).max(1).default(0),
    memoryGrowthMb: z.number().positive().default(64),
    /** Population stability index of live outputs against the baseline; 0.25 is the usual "significant shift". */
    psiMax: z.number().positive().default(0.25),
    /** Name of an output holding per-class probabilities (or one probability); its mean max is the confidence. */
    confidenceOutput: z.string().optional(),
    minMeanConfidence: z.number().min(0).max(1).optional(),
    /** After commit: checks run over each window of this many requests; a failure is reported, or rolls back. */
    watchWindowRequests: z.number().int().min(10).default(500),
    afterCommit: z.enum(['report', 'rollback']).default('report'),
  })
  .strict();
export type HealthPolicy = z.infer<typeof HealthPolicy>;

export const Lineage = z
  .object({
    parent: ModelVersion.nullable().default(null),
    dataSnapshot: z.string().max(512).optional(),
    hyperparameters: z.record(z.string(), z.unknown()).optional(),
    federatedRound: z.number().int().min(0).optional(),
    metrics: z.record(z.string(), z.number()).optional(),
    /** How this version was made: "upload", "fine-tune", "federated", ... */
    method: z.string().max(64).default('upload'),
  })
  .strict();
export type Lineage = z.infer<typeof Lineage>;

/**
 * How a device may train the model for a federated round (tfjs-layers models only). Absent: the
 * model is not trainable on devices.
 */
export const TrainingSpec = z
  .object({
    /** The input training feeds and the output the loss reads; default the first of each. */
    input: z.string().min(1).max(256).optional(),
    output: z.string().min(1).max(256).optional(),
    /**
     * `sparse-categorical-crossentropy`: a label is a class index, the output per-class
     * probabilities (`outputKind` probabilities, after softmax) or logits. `mean-squared-error`: a
     * label is a vector of the output's width.
     */
    loss: z.enum(['sparse-categorical-crossentropy', 'mean-squared-error']),
    outputKind: z.enum(['probabilities', 'logits']).default('probabilities'),
    /**
     * Layers whose weights never leave the device (personalization, as in FedPer, Arivazhagan et
     * al. 2019). They train locally, are left out of every update, and are carried over onto the
     * next global version when its shapes match.
     */
    personalLayers: z.array(z.string().min(1).max(256)).max(256).default([]),
  })
  .strict();
export type TrainingSpec = z.infer<typeof TrainingSpec>;

export const Manifest = z
  .object({
    schema: z.literal(1),
    name: ModelName,
    version: ModelVersion,
    runtime: z.enum(MODEL_RUNTIMES),
    /** The file the runtime opens: the .onnx file, or the TF.js model.json. */
    entry: FilePath,
    files: z.array(ModelFile).min(1).max(256),
    inputs: z.array(TensorSpec).min(1).max(64),
    outputs: z.array(TensorSpec).min(1).max(64),
    golden: Golden.prefault({}),
    health: HealthPolicy.prefault({}),
    baseline: Baseline.prefault({}),
    lineage: Lineage.prefault({}),
    training: TrainingSpec.optional(),
    createdAt: z.number().int().min(0),
    /** After this instant (ms since the epoch) no device activates the version; null: never expires. */
    expiresAt: z.number().int().min(0).nullable(),
  })
  .strict()
  .superRefine((m, ctx) => {
    const paths = new Set(m.files.map((f) => f.path));
    if (paths.size !== m.files.length) ctx.addIssue({ code: 'custom', path: ['files'], message: 'file paths must be unique' });
    if (!paths.has(m.entry)) ctx.addIssue({ code: 'custom', path: ['entry'], message: 'entry must be one of the files' });
    for (const [side, specs] of [['inputs', m.inputs], ['outputs', m.outputs]] as const) {
      if (new Set(specs.map((s) => s.name)).size !== specs.length) ctx.addIssue({ code: 'custom', path: [side], message: 'tensor names must be unique' });
    }
    if (m.training) {
      if (m.runtime !== 'tfjs-layers') ctx.addIssue({ code: 'custom', path: ['training'], message: 'only tfjs-layers models train on devices' });
      const { input, output } = m.training;
      if (input !== undefined && !m.inputs.some((s) => s.name === input)) ctx.addIssue({ code: 'custom', path: ['training', 'input'], message: `no input named ${input}` });
      if (output !== undefined && !m.outputs.some((s) => s.name === output)) ctx.addIssue({ code: 'custom', path: ['training', 'output'], message: `no output named ${output}` });
    }
  });
export type Manifest = z.infer<typeof Manifest>;
export type ManifestInput = z.input<typeof Manifest>;

/** A public key the fleet trusts, endorsed by the key before it (absent for the first key). */
export const KeyEndorsement = z
  .object({
    keyId: z.string().regex(/^[0-9a-f]{16}$/),
    /** Raw 32-byte Ed25519 public key, base64. */
    publicKey: z.string().regex(/^[A-Za-z0-9+/]{43}=$/),
    createdAt: z.number().int().min(0),
    /** The key that vouches for this one, and its signature over canonicalJson({keyId, publicKey, createdAt}). */
    endorsedBy: z.string().regex(/^[0-9a-f]{16}$/),
    signature: z.string().max(200),
  })
  .strict();
export type KeyEndorsement = z.infer<typeof KeyEndorsement>;

/** A signed manifest as stored, served and kept on the device. */
export const SignedManifest = z
  .object({
    manifest: Manifest,
    signature: z.object({ alg: z.literal('ed25519'), keyId: z.string().regex(/^[0-9a-f]{16}$/), value: z.string().max(200) }).strict(),
    /** Endorsements from the oldest key a device may hold to the signing key (rotation). */
    keyChain: z.array(KeyEndorsement).max(32).default([]),
  })
  .strict();
export type SignedManifest = z.infer<typeof SignedManifest>;

/** A model slot in desired state: which version of this model the device should run. */
export const ModelSlot = z
  .object({
    version: ModelVersion,
    /** sha256 of the canonical signed manifest, so a device can tell a re-signed manifest from the one it holds. */
    manifestSha256: Sha256.optional(),
    /** Run the candidate in shadow on live requests before it answers them. */
    shadow: z.object({ requests: z.number().int().min(1).max(100_000) }).strict().optional(),
  })
  .strict();
export type ModelSlot = z.infer<typeof ModelSlot>;

/** What a device reports per model: `up/reported` `models[name]`. */
/** What installing one version cost in bytes on the link, and what delta patches saved. */
export const ModelTransfer = z
  .object({
    version: ModelVersion,
    /** Bytes received: patches, images and whole files. */
    downloadedBytes: z.number().int().min(0),
    /** Bytes of the files that came as patches or images, less what was downloaded for them. */
    savedBytes: z.number().int().min(0),
    /** Bytes of files already held (another version or model had them) and not downloaded. */
    reusedBytes: z.number().int().min(0),
    patchedFiles: z.number().int().min(0),
    fullFiles: z.number().int().min(0),
    /** Patches refused or failed, each followed by the whole file. */
    fallbacks: z.number().int().min(0),
  })
  .strict();
export type ModelTransfer = z.infer<typeof ModelTransfer>;

/** What the serving version did since it began serving in this agent run: the figures rollout gates compare. */
export const ServingMetrics = z
  .object({
    version: ModelVersion,
    requests: z.number().int().min(0),
    errors: z.number().int().min(0),
    nonFinite: z.number().int().min(0),
    p95Ms: z.number().min(0).nullable(),
    meanConfidence: z.number().min(0).max(1).nullable(),
  })
  .strict();
export type ServingMetrics = z.infer<typeof ServingMetrics>;

export const ModelSlotReport = z
  .object({
    state: z.string().max(32),
    active: ModelVersion.nullable(),
    activeSha256: Sha256.nullable(),
    desired: ModelVersion.nullable(),
    history: z.array(ModelVersion).max(64),
    failed: z.array(ModelVersion).max(256),
    fallback: ModelVersion.nullable(),
    lastVerdict: z.record(z.string(), z.unknown()).nullable(),
    /** The last version this device downloaded for the slot. */
    transfer: ModelTransfer.nullable().optional(),
    /** Figures of the version serving now. */
    metrics: ServingMetrics.nullable().optional(),
    /** Labelled samples the device holds for federated learning (the count only: samples never leave it). */
    samples: z.number().int().nonnegative().optional(),
    /**
     * The device's personalized variant of the serving version (its own personal layers over the
     * global weights), while it beats the global version on the device's holdout: the figures of
     * that check. Absent: the global version serves as published.
     */
    personalized: z
      .object({
        version: ModelVersion,
        layers: z.array(z.string().max(256)).max(256),
        holdoutCount: z.number().int().min(0),
        accuracy: z.number().min(0).max(1).nullable(),
        globalAccuracy: z.number().min(0).max(1).nullable(),
        loss: z.number().nonnegative(),
        globalLoss: z.number().nonnegative(),
      })
      .strict()
      .optional(),
  })
  .strict();
export type ModelSlotReport = z.infer<typeof ModelSlotReport>;

// ---------------------------------------------------------------------------------------------
// Keys and signatures

const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

export function rawPublicKey(key: KeyObject): Buffer {
  const der = key.export({ format: 'der', type: 'spki' });
  return der.subarray(der.length - 32);
}

export function publicKeyFromRaw(raw: Buffer | string): KeyObject {
  const bytes = typeof raw === 'string' ? Buffer.from(raw, 'base64') : raw;
  if (bytes.length !== 32) throw new EdgefleetError('EF_SIGNATURE_INVALID', 'an Ed25519 public key is 32 bytes');
  return createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, bytes]), format: 'der', type: 'spki' });
}

/** First 16 hex digits of the sha256 of the raw public key. */
export function keyIdOf(raw: Buffer | string): string {
  const bytes = typeof raw === 'string' ? Buffer.from(raw, 'base64') : raw;
  return createHash('sha256').update(bytes).digest('hex').slice(0, 16);
}

export function privateKeyFromPem(pem: string): KeyObject {
  const key = createPrivateKey(pem);
  if (key.asymmetricKeyType !== 'ed25519') throw new EdgefleetError('EF_SIGNATURE_INVALID', 'the fleet key must be Ed25519');
  return key;
}

/** The bytes a manifest signature covers: the canonical JSON of the parsed (defaults filled) manifest. */
export function manifestSigningBytes(m: Manifest): Buffer {
  return Buffer.from(canonicalJson(m), 'utf8');
}

export function manifestSha256(s: SignedManifest): string {
  return createHash('sha256').update(canonicalJson(s)).digest('hex');
}

export function signManifest(m: Manifest, privateKey: KeyObject, keyChain: KeyEndorsement[] = []): SignedManifest {
  const pub = rawPublicKey(createPublicKey(privateKey));
  const value = sign(null, manifestSigningBytes(m), privateKey).toString('base64');
  return { manifest: m, signature: { alg: 'ed25519', keyId: keyIdOf(pub), value }, keyChain };
}

function endorsementBytes(e: Pick<KeyEndorsement, 'keyId' | 'publicKey' | 'createdAt'>): Buffer {
  return Buffer.from(canonicalJson({ keyId: e.keyId, publicKey: e.publicKey, createdAt: e.createdAt }), 'utf8');
}

/** The old key vouches for the new one: the record that travels in every later manifest's key chain. */
export function endorseKey(oldPrivate: KeyObject, newPublicRaw: Buffer, createdAt: number): KeyEndorsement {
  const oldPub = rawPublicKey(createPublicKey(oldPrivate));
  const body = { keyId: keyIdOf(newPublicRaw), publicKey: newPublicRaw.toString('base64'), createdAt };
  return { ...body, endorsedBy: keyIdOf(oldPub), signature: sign(null, endorsementBytes(body), oldPrivate).toString('base64') };
}

/**
 * Checks a signed manifest against the keys a device trusts (raw public keys, base64). Endorsements
 * in the key chain extend the trusted set only when a trusted key signed them. Returns the key ids
 * that became trusted through the chain, so the device can remember them. Throws EF_SIGNATURE_INVALID.
 */
export function verifySignedManifest(s: SignedManifest, trusted: readonly string[]): { learnedKeys: string[] } {
  const keys = new Map<string, string>();
  for (const k of trusted) keys.set(keyIdOf(k), k);
  const learned: string[] = [];
  for (const e of s.keyChain) {
    if (keys.has(e.keyId)) continue;
    const signer = keys.get(e.endorsedBy);
    if (!signer) continue;
    if (keyIdOf(e.publicKey) !== e.keyId) throw new EdgefleetError('EF_SIGNATURE_INVALID', `endorsement for ${e.keyId} names a different key`);
    if (!safeVerify(endorsementBytes(e), signer, e.signature)) throw new EdgefleetError('EF_SIGNATURE_INVALID', `endorsement of key ${e.keyId} by ${e.endorsedBy} does not verify`);
    keys.set(e.keyId, e.publicKey);
    learned.push(e.publicKey);
  }
  const signer = keys.get(s.signature.keyId);
  if (!signer) throw new EdgefleetError('EF_SIGNATURE_INVALID', `signed by key ${s.signature.keyId}, which this device does not trust`);
  if (!safeVerify(manifestSigningBytes(s.manifest), signer, s.signature.value)) {
    throw new EdgefleetError('EF_SIGNATURE_INVALID', `signature of ${s.manifest.name}@${s.manifest.version} does not verify`);
  }
  return { learnedKeys: learned };
}

function safeVerify(data: Buffer, publicKeyB64: string, signatureB64: string): boolean {
  try {
    return verify(null, data, publicKeyFromRaw(publicKeyB64), Buffer.from(signatureB64, 'base64'));
  } catch {
    return false;
  }
}

export function modelRef(name: string, version: number): string {
  return `${name}@${version}`;
}
