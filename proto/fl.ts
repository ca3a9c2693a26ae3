import { z } from 'zod';
import { ModelName, ModelVersion } from './model.js';
import { RolloutPlan, Selector } from './rollout.js';
import { BINARY_FRAME_MAGIC } from './codec.js';
import { EdgefleetError } from './errors.js';
import { decodeBundle, peekBundleMeta, type Bundle, type BundleLimits } from './bundle.js';

/**
 * Federated learning: what a round asks of a device (TrainSpec), what the device sends back (a
 * tensor bundle, proto/bundle.ts, whose `meta` is an UpdateMeta), and how the fleet folds updates
 * into a candidate (StrategySpec, ServerOptimizerSpec).
 *
 * An update is always a *difference*: the device's weights after training minus the round's base
 * weights, tensor by tensor, under the base model's weight names. The fleet adds the aggregate of
 * the differences back onto the base, through the server optimizer.
 */

/** How a device trains for a round. */
export const TrainSpec = z
  .object({
    epochs: z.number().int().min(1).max(100).default(1),
    batchSize: z.number().int().min(1).max(4096).default(32),
    learningRate: z.number().positive().max(10).default(0.05),
    optimizer: z.enum(['sgd', 'adam']).default('sgd'),
    /**
     * FedProx's proximal term μ (Li et al., 2020, "Federated Optimization in Heterogeneous
     * Networks"): adds μ/2·‖w − w_base‖² to the local loss, which keeps a client with skewed data
     * from drifting far from the global model. 0 is plain local SGD (FedAvg).
     */
    proximalMu: z.number().min(0).max(100).default(0),
    /**
     * L2 norm bound of the whole update (every tensor that leaves the device, together). A larger
     * update is scaled down to it. The fleet rejects updates above it (with a little slack for
     * quantization), so a device cannot outvote the others by sending a huge one.
     */
    clipNorm: z.number().positive().max(1e6).default(10),
    /**
     * Local differential privacy: Gaussian noise of standard deviation `localNoiseMultiplier ×
     * clipNorm` added to every coordinate after clipping. 0 (the default) adds none; central DP on
     * the fleet (StrategySpec `dp-fedavg`) protects the aggregate at far lower cost in accuracy.
     */
    localNoiseMultiplier: z.number().min(0).max(100).default(0),
    /** `float32` is lossless. `q8` sends one byte per weight (stochastic rounding, unbiased), about a quarter of the size. */
    encoding: z.enum(['float32', 'q8']).default('float32'),
    /** Share of a device's samples held out for evaluation, never trained on. */
    holdoutShare: z.number().min(0.05).max(0.5).default(0.2),
  })
  .strict();
export type TrainSpec = z.infer<typeof TrainSpec>;
export type TrainSpecInput = z.input<typeof TrainSpec>;

/** Local figures a device reports with its update. Accuracy is on its local holdout; loss on its training split. */
export const LocalMetrics = z
  .object({
    lossBefore: z.number().nonnegative(),
    lossAfter: z.number().nonnegative(),
    /** null for a squared-error model. */
    accuracyBefore: z.number().min(0).max(1).nullable(),
    accuracyAfter: z.number().min(0).max(1).nullable(),
    holdoutCount: z.number().int().nonnegative(),
  })
  .strict();
export type LocalMetrics = z.infer<typeof LocalMetrics>;

/** The `meta` of an update bundle. */
export const UpdateMeta = z
  .object({
    kind: z.literal('fl-update'),
    roundId: z.number().int().positive(),
    /** The sha256 of the base version's manifest the device trained from: an update against another base is stale. */
    baseManifestSha256: z.string().regex(/^[0-9a-f]{64}$/),
    /** Training samples used (the holdout excluded): FedAvg's weight. */
    sampleCount: z.number().int().positive(),
    /** L2 norm of the update before clipping, and whether clipping scaled it down. */
    normBeforeClip: z.number().nonnegative(),
    clipped: z.boolean(),
    /** Standard deviation of the local noise added per coordinate; 0 when none. */
    localNoiseStd: z.number().nonnegative(),
    metrics: LocalMetrics,
    /** Training steps taken and why training ended: `done`, or stopped early by the deadline or a resource gate. */
    steps: z.number().int().nonnegative(),
    stoppedBy: z.enum(['done', 'deadline', 'cpu', 'temperature', 'battery']),
    trainMs: z.number().nonnegative(),
    /** For `q8` updates: the relative L2 error quantization added (‖q − x‖ / ‖x‖), measured on the device. */
    quantizationError: z.number().nonnegative().optional(),
  })
  .strict();
export type UpdateMeta = z.infer<typeof UpdateMeta>;

/**
 * How the fleet combines the updates of a round. All are pure functions of the updates (and, for
 * `dp-fedavg`, of the noise drawn), in fleet-server/federated/.
 */
/** Updates per group before a robust rule (see `median`); 1 is no grouping. */
const BucketSize = z.number().int().min(1).max(64);

export const StrategySpec = z.discriminatedUnion('name', [
  /** FedAvg (McMahan et al., 2017): the mean of the updates weighted by sample count. Streams: memory does not grow with clients. */
  z.object({ name: z.literal('fedavg') }).strict(),
  /** FedAvg of updates scaled down to `normBound` first (Sun et al., 2019, "Can You Really Backdoor Federated Learning?"). Streams. */
  z.object({ name: z.literal('fedavg-clipped'), normBound: z.number().positive() }).strict(),
  /**
   * Coordinate-wise median (Yin et al., 2018): robust to a minority of arbitrary updates; ignores
   * sample counts. `bucketSize` s ≥ 2: the updates are shuffled into groups of s and the median is
   * taken over the groups' means (Karimireddy, He and Jaggi, 2022, "Byzantine-Robust Learning on
   * Heterogeneous Datasets via Bucketing"): with label-skewed devices the honest updates disagree,
   * and a median of single updates lands far from their mean; group means disagree less. An
   * attacker then spoils at most its own number of groups, so keep s × attackers under half the updates.
   */
  z.object({ name: z.literal('median'), bucketSize: BucketSize.optional() }).strict(),
  /** Coordinate-wise trimmed mean: drops the `trimShare` largest and smallest values of each coordinate, averages the rest. `bucketSize` as for the median. */
  z.object({ name: z.literal('trimmed-mean'), trimShare: z.number().min(0).max(0.49).default(0.2), bucketSize: BucketSize.optional() }).strict(),
  /**
   * Central DP, DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
   * Models"): every update clipped to `clipNorm`, summed unweighted, Gaussian noise of standard
   * deviation `noiseMultiplier × clipNorm` added to the sum, divided by the number of updates.
   * The fleet's privacy accountant reports ε for `delta` across the model's rounds. Streams.
   */
  z.object({ name: z.literal('dp-fedavg'), clipNorm: z.number().positive(), noiseMultiplier: z.number().min(0), delta: z.number().gt(0).lt(1).default(1e-5) }).strict(),
]);
export type StrategySpec = z.infer<typeof StrategySpec>;
export type StrategyName = StrategySpec['name'];

/**
 * What the fleet does with the aggregated difference Δ. `sgd` with learningRate 1 is plain FedAvg
 * (base + Δ). `adam` and `yogi` treat −Δ as a pseudo-gradient (Reddi et al., 2021, "Adaptive
 * Federated Optimization"); their moment estimates carry from round to round of the same model.
 */
export const ServerOptimizerSpec = z.discriminatedUnion('name', [
  z.object({ name: z.literal('sgd'), learningRate: z.number().positive().default(1), momentum: z.number().min(0).lt(1).default(0) }).strict(),
  z
    .object({
      name: z.enum(['adam', 'yogi']),
      learningRate: z.number().positive().default(0.01),
      beta1: z.number().min(0).lt(1).default(0.9),
      beta2: z.number().min(0).lt(1).default(0.99),
      /** Adaptivity τ: the ε of Adam, large here (1e-3) as the paper recommends for federated use. */
      tau: z.number().positive().default(1e-3),
    })
    .strict(),
]);
export type ServerOptimizerSpec = z.infer<typeof ServerOptimizerSpec>;

// ---------------------------------------------------------------------------------------------
// Rounds

/** Which devices take part: those selected, serving the base version, holding at least `minSamples`. */
export const RoundSelection = z
  .object({
    selector: Selector.default({ kind: 'all' }),
    /** Labelled samples a device must hold for the model (it reports the count, never the samples). */
    minSamples: z.number().int().min(1).default(10),
    /** Share of the eligible devices invited, then clamped to [minParticipants, maxParticipants]. */
    fraction: z.number().gt(0).max(1).default(1),
    /** Updates needed for the round to aggregate (its quorum). */
    minParticipants: z.number().int().min(1).default(2),
    maxParticipants: z.number().int().min(1).max(100_000).default(100),
  })
  .strict()
  .refine((s) => s.minParticipants <= s.maxParticipants, { message: 'minParticipants is above maxParticipants', path: ['minParticipants'] });
export type RoundSelection = z.infer<typeof RoundSelection>;

/**
 * Federated evaluation: the candidate (base + the round's result) is sent to devices, which
 * measure it and the base on their local holdouts. It passes when the candidate's accuracy (over
 * every holdout row reported) is no more than `maxAccuracyDrop` below the base's.
 */
export const EvaluationSpec = z
  .object({
    /** Devices asked: the round's participants first, then other eligible devices; at most this many. */
    maxDevices: z.number().int().min(1).max(100_000).default(20),
    /** Reports needed; fewer by the deadline fails the round's evaluation (the candidate is quarantined). */
    minDevices: z.number().int().min(1).default(1),
    deadlineSec: z.number().min(1).max(86_400).default(120),
    maxAccuracyDrop: z.number().min(0).max(1).default(0.02),
  })
  .strict();
export type EvaluationSpec = z.infer<typeof EvaluationSpec>;

/** Everything that defines a round; what `fl.start` and `fl.schedule` take. */
export const RoundConfig = z
  .object({
    model: ModelName,
    /** The version devices train from; default the model's newest `production` version. */
    baseVersion: ModelVersion.optional(),
    selection: RoundSelection.prefault({}),
    train: TrainSpec.prefault({}),
    strategy: StrategySpec.default({ name: 'fedavg' }),
    serverOptimizer: ServerOptimizerSpec.default({ name: 'sgd', learningRate: 1, momentum: 0 }),
    /** Training and collection end at this many seconds after the invitations go out. */
    deadlineSec: z.number().min(5).max(7 * 86_400).default(600),
    evaluation: EvaluationSpec.prefault({}),
    /** A candidate that passes evaluation starts a rollout with this plan; null (the default): it waits for an operator. */
    rollout: z.object({ plan: RolloutPlan.optional(), selector: Selector.optional() }).strict().nullable().default(null),
  })
  .strict();
export type RoundConfig = z.infer<typeof RoundConfig>;
export type RoundConfigInput = z.input<typeof RoundConfig>;

export const ROUND_STATES = [
  /** Invitations out, updates coming in. */
  'collecting',
  /** The candidate is with the evaluating devices. */
  'evaluating',
  /** Registered as a candidate (and, if configured, its rollout started). */
  'succeeded',
  /** Quorum not met, evaluation failed, or an error; `reason` says which. A failed evaluation still registers the version, quarantined. */
  'failed',
  'aborted',
] as const;
export type RoundState = (typeof ROUND_STATES)[number];
export const FINAL_ROUND_STATES: readonly RoundState[] = ['succeeded', 'failed', 'aborted'];

/** Why an update was refused. Each is counted on the round. */
export const UPDATE_REJECTIONS = ['malformed', 'oversized', 'unknown-round', 'not-invited', 'late', 'duplicate', 'stale-base', 'wrong-tensors', 'non-finite', 'norm-above-bound'] as const;
export type UpdateRejection = (typeof UPDATE_REJECTIONS)[number];

/** Local holdout figures a device reports for federated evaluation: the base and the candidate on the same rows. */
export const EvalMetrics = z
  .object({
    holdoutCount: z.number().int().min(1),
    baseLoss: z.number().nonnegative(),
    baseAccuracy: z.number().min(0).max(1).nullable(),
    candidateLoss: z.number().nonnegative(),
    candidateAccuracy: z.number().min(0).max(1).nullable(),
  })
  .strict();
export type EvalMetrics = z.infer<typeof EvalMetrics>;

export const RoundView = z
  .object({
    id: z.number().int().positive(),
    model: ModelName,
    baseVersion: ModelVersion,
    state: z.enum(ROUND_STATES),
    reason: z.string().nullable(),
    config: RoundConfig,
    createdAt: z.number(),
    deadlineAt: z.number(),
    updatedAt: z.number(),
    /** From a schedule, or null when an operator started it. */
    scheduleId: z.number().int().nullable(),
    counts: z
      .object({
        eligible: z.number().int().min(0),
        invited: z.number().int().min(0),
        joined: z.number().int().min(0),
        declined: z.number().int().min(0),
        updates: z.number().int().min(0),
        failed: z.number().int().min(0),
        samples: z.number().int().min(0),
        evaluations: z.number().int().min(0),
      })
      .strict(),
    rejected: z.record(z.string(), z.number().int()),
    declines: z.record(z.string(), z.number().int()),
    /** Means over the updates received (weighted by samples). */
    local: z.object({ lossBefore: z.number(), lossAfter: z.number(), accuracyBefore: z.number().nullable(), accuracyAfter: z.number().nullable() }).nullable(),
    aggregate: z.object({ updateNorm: z.number(), info: z.record(z.string(), z.number()) }).nullable(),
    evaluation: z
      .object({ devices: z.number().int(), holdoutCount: z.number().int(), baseAccuracy: z.number().nullable(), candidateAccuracy: z.number().nullable(), baseLoss: z.number(), candidateLoss: z.number(), passed: z.boolean().nullable() })
      .nullable(),
    /** ε spent on this model by DP rounds so far (this one included), at the strategy's δ; null without DP. */
    privacy: z.object({ epsilon: z.number(), delta: z.number(), rounds: z.number().int() }).nullable(),
    candidate: z.object({ version: ModelVersion, status: z.string(), rolloutId: z.number().int().nullable() }).nullable(),
  })
  .strict();
export type RoundView = z.infer<typeof RoundView>;

// ---------------------------------------------------------------------------------------------
// Messages

/** `down/fl`: what the fleet asks of a device for a round. Not retained: an invitation past its deadline means nothing. */
export const FlDownMessage = z.discriminatedUnion('kind', [
  z
    .object({
      kind: z.literal('invite'),
      roundId: z.number().int().positive(),
      model: ModelName,
      baseVersion: ModelVersion,
      baseManifestSha256: z.string().regex(/^[0-9a-f]{64}$/),
      train: TrainSpec,
      minSamples: z.number().int().min(1),
      deadlineAt: z.number().int().nonnegative(),
    })
    .strict(),
  z.object({ kind: z.literal('cancel'), roundId: z.number().int().positive() }).strict(),
]);
export type FlDownMessage = z.infer<typeof FlDownMessage>;

/**
 * The `meta` of a `down/candidate` bundle: the round's candidate as a difference from the base
 * (candidate − base, every tensor that travels), for the device to measure on its local holdout.
 */
export const CandidateMeta = z
  .object({
    kind: z.literal('fl-candidate'),
    roundId: z.number().int().positive(),
    model: ModelName,
    baseVersion: ModelVersion,
    baseManifestSha256: z.string().regex(/^[0-9a-f]{64}$/),
    /** The round's holdout share: the device measures on the same rows it held out from training. */
    holdoutShare: z.number().min(0.05).max(0.5),
    deadlineAt: z.number().int().nonnegative(),
  })
  .strict();
export type CandidateMeta = z.infer<typeof CandidateMeta>;

export const DECLINE_REASONS = ['not-serving-base', 'not-trainable', 'too-few-samples', 'resource-gates', 'busy', 'past-deadline'] as const;
export type DeclineReason = (typeof DECLINE_REASONS)[number];

/** `up/fl`: a device's answers. The update itself travels on `up/update`. */
export const FlUpMessage = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('join'), roundId: z.number().int().positive(), sampleCount: z.number().int().nonnegative() }).strict(),
  z.object({ kind: z.literal('decline'), roundId: z.number().int().positive(), reason: z.enum(DECLINE_REASONS), detail: z.string().max(500).optional() }).strict(),
  z.object({ kind: z.literal('failed'), roundId: z.number().int().positive(), code: z.string().max(64), message: z.string().max(500) }).strict(),
  z.object({ kind: z.literal('evaluation'), roundId: z.number().int().positive(), metrics: EvalMetrics }).strict(),
]);
export type FlUpMessage = z.infer<typeof FlUpMessage>;

// ---------------------------------------------------------------------------------------------
// Frames

/** Binary frame types of federated learning (the second byte after BINARY_FRAME_MAGIC; telemetry is 0x01). */
export const FRAME_FL_UPDATE = 0x02;
export const FRAME_FL_CANDIDATE = 0x03;
const FL_FRAME_VERSION = 0x01;

/** `[0xEF, type, 0x01, ...tensor bundle]`: `up/update` carries an update, `down/candidate` a candidate. */
export function encodeFlFrame(type: typeof FRAME_FL_UPDATE | typeof FRAME_FL_CANDIDATE, bundle: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(3 + bundle.length);
  out[0] = BINARY_FRAME_MAGIC;
  out[1] = type;
  out[2] = FL_FRAME_VERSION;
  out.set(bundle, 3);
  return out;
}

/** The bundle meta of a frame of `type`, from its header alone (see peekBundleMeta); null when unreadable. */
export function peekFlFrameMeta(type: typeof FRAME_FL_UPDATE | typeof FRAME_FL_CANDIDATE, payload: Uint8Array): Record<string, unknown> | null {
  if (payload.length < 3 || payload[0] !== BINARY_FRAME_MAGIC || payload[1] !== type || payload[2] !== FL_FRAME_VERSION) return null;
  return peekBundleMeta(payload.subarray(3));
}

/**
 * Unwraps and decodes a frame of `type`. Throws EdgefleetError: EF_BAD_PAYLOAD for a frame of
 * another type or version, EF_BUNDLE_INVALID / EF_BUNDLE_TOO_LARGE from the bundle.
 */
export function decodeFlFrame(type: typeof FRAME_FL_UPDATE | typeof FRAME_FL_CANDIDATE, payload: Uint8Array, limits?: Partial<BundleLimits>): Bundle {
  if (payload.length < 3 || payload[0] !== BINARY_FRAME_MAGIC || payload[1] !== type) throw new EdgefleetError('EF_BAD_PAYLOAD', `not a federated ${type === FRAME_FL_UPDATE ? 'update' : 'candidate'} frame`);
  if (payload[2] !== FL_FRAME_VERSION) throw new EdgefleetError('EF_BAD_PAYLOAD', `unknown federated frame version ${payload[2]}`);
  return decodeBundle(payload.subarray(3), limits);
}
