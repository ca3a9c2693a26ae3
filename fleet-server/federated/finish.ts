import { existsSync, readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import { join } from 'node:path';
import {
  FRAME_FL_CANDIDATE,
  encodeBundle,
  encodeFlFrame,
  modelRef,
  tensorsL2Norm,
  topics,
  type CandidateMeta,
  type ModelDraftInput,
  type RoundView,
} from '../../proto/index.js';
import { sha256Hex, writeFileAtomic } from '../../common/files.js';
import type { FlRoundRow } from '../store/types.js';
import { foldFilesInWorker } from './fold-files.js';
import { serverStep, fromBytes as decodeServerState, toBytes as encodeServerState } from './server-opt.js';
import { epsilon } from './privacy.js';
import { candidateGolden } from './golden.js';
import { writeModelWeights } from './weights.js';
import { judgeEvaluation, localMeans, quorumReason } from './rounds.js';
import type { RoundBase, RoundServiceDeps } from './service.js';

/**
 * The end of a round: fold the accepted updates in a worker thread (fold-files.ts: read back one at
 * a time from their files, so memory holds one update and the strategy's state), step the server
 * optimizer, send the candidate to devices for federated evaluation, then register it, quarantined
 * when it failed, and start its rollout when the round asks for one. One at a time per round;
 * every step is resumable from what the round row and its directory hold.
 */
export class RoundFinisher {
  private readonly running = new Map<number, Promise<void>>();

  constructor(
    private readonly deps: RoundServiceDeps,
    private readonly base: (id: number) => RoundBase,
    /** A round ended (succeeded or failed here): its files can go. */
    private readonly ended: (id: number) => void,
  ) {}

  /** Aggregating or registering this round now: updates arriving meanwhile are too late for it. */
  busy(id: number): boolean {
    return this.running.has(id);
  }

  async idle(): Promise<void> {
    await Promise.all(this.running.values());
  }

  collect(id: number): void {
    this.once(id, () => this.aggregate(id));
  }

  evaluate(id: number): void {
    this.once(id, () => this.register(id));
  }

  private once(id: number, work: () => Promise<void>): void {
    if (this.running.has(id)) return;
    const p = work()
      .catch((err: unknown) => this.fail(id, `internal error: ${(err as Error).message}`, err))
      .finally(() => {
        this.running.delete(id);
        const state = this.deps.store.fl.getRound(id)?.state;
        if (state === 'succeeded' || state === 'failed') this.ended(id);
      });
    this.running.set(id, p);
  }

  private dir(id: number): string {
    return join(this.deps.dataDir, 'fl', `round-${id}`);
  }

  private fail(id: number, reason: string, err?: unknown): void {
    const { store, now, log } = this.deps;
    const row = store.fl.getRound(id);
    if (!row || row.state === 'succeeded' || row.state === 'failed' || row.state === 'aborted') return;
    const t = now();
    store.transaction(() => {
      store.fl.updateRound(id, { ...row, state: 'failed', reason, updatedAt: t });
      store.audit.append({ ts: t, actor: 'fleet', action: 'fl.round.failed', target: `round-${id}`, ok: false, detail: { reason } });
    });
    log.warn({ round: id, reason, err }, 'federated round failed');
  }

  private async aggregate(id: number): Promise<void> {
    const { store, now, log } = this.deps;
    const row = store.fl.getRound(id);
    if (!row || row.state !== 'collecting') return;
    const cfg = row.config;
    const parts = store.fl.participants(id, 'train');
    const updated = parts.filter((p) => p.state === 'updated' && existsSync(join(this.dir(id), `${p.deviceId}.eftb`)));
    row.status.counts.updates = updated.length;
    row.status.local = localMeans(parts);
    if (updated.length < cfg.selection.minParticipants) {
      store.transaction(() => store.fl.updateRound(id, { ...row, updatedAt: now() }));
      return this.fail(id, quorumReason(row.status, cfg.selection.minParticipants, 'deadline'));
    }
    const base = this.base(id);
    const { specs, offsets } = base.shared;
    const shared = specs.reduce((a, s) => a + s.size, 0);
    const result = await foldFilesInWorker({ strategy: cfg.strategy, shared, updates: updated.map((p) => ({ file: join(this.dir(id), `${p.deviceId}.eftb`), samples: p.samples ?? 1 })) });
    // Read again: the round may have been aborted while the worker folded, and refusals meanwhile were counted on it.
    const folded = store.fl.getRound(id);
    if (!folded || folded.state !== 'collecting') return;
    folded.status.counts.updates = row.status.counts.updates;
    folded.status.local = row.status.local;
    // The shared difference placed into the whole model; personal layers' coordinates stay 0.
    const full = new Float32Array(base.weights.flat.length);
    let at = 0;
    specs.forEach((s, i) => {
      full.set(result.delta.subarray(at, at + s.size), offsets[i]);
      at += s.size;
    });
    const previous = store.fl.serverState(folded.model);
    const step = serverStep(cfg.serverOptimizer, base.weights.flat, full, previous ? decodeServerState(previous) : null);
    if (step.restarted) log.warn({ round: id, model: folded.model, why: step.restarted }, 'server optimizer state did not fit; its moments start again from zero');
    writeFileAtomic(join(this.dir(id), 'candidate.f32'), new Uint8Array(step.weights.buffer, step.weights.byteOffset, step.weights.byteLength));
    writeFileAtomic(join(this.dir(id), 'server-state.bin'), encodeServerState(step.state));
    // What goes to evaluating devices: candidate − base over the shared weights.
    const tensors = specs.map((s, i) => {
      const o = offsets[i]!;
      const d = new Float32Array(s.size);
      for (let j = 0; j < s.size; j++) d[j] = step.weights[o + j]! - base.weights.flat[o + j]!;
      return { name: s.name, shape: s.shape, data: d };
    });
    const norm = tensorsL2Norm(tensors);
    const t = now();
    const e = cfg.evaluation;
    const evalDeadlineAt = t + e.deadlineSec * 1000;
    const meta: CandidateMeta = { kind: 'fl-candidate', roundId: id, model: folded.model, baseVersion: folded.baseVersion, baseManifestSha256: folded.baseManifestSha256, holdoutShare: cfg.train.holdoutShare, deadlineAt: evalDeadlineAt };
    const frame = encodeFlFrame(FRAME_FL_CANDIDATE, encodeBundle({ tensors, meta }));
    writeFileAtomic(join(this.dir(id), 'candidate.frame'), frame);
    // Participants first (they hold the base and a holdout), then other eligible devices.
    const declined = new Set(parts.filter((p) => p.state === 'declined').map((p) => p.deviceId));
    const evalIds = [...updated.map((p) => p.deviceId), ...folded.eligible.filter((d) => !declined.has(d) && !updated.some((p) => p.deviceId === d))].slice(0, e.maxDevices);
    const info: Record<string, number> = { ...result.info, clients: result.clients };
    if (cfg.strategy.name === 'dp-fedavg') {
      info.noiseMultiplier = cfg.strategy.noiseMultiplier;
      info.samplingRate = Math.min(1, folded.status.counts.invited / Math.max(1, folded.status.counts.eligible));
    }
    folded.status.aggregate = { updateNorm: norm, info };
    folded.status.privacy = this.privacy(folded);
    store.transaction(() => {
      for (const d of evalIds) store.fl.putParticipant({ roundId: id, role: 'eval', deviceId: d, state: 'invited', detail: null, samples: null, metrics: null, at: t });
      store.fl.updateRound(id, { ...folded, state: 'evaluating', evalDeadlineAt, updatedAt: t });
    });
    log.info({ round: id, updates: updated.length, norm: norm, evaluators: evalIds.length }, 'federated round aggregated; evaluating');
    await Promise.all(evalIds.map((d) => this.deps.publish(topics.down(d, 'candidate'), frame, { qos: 1, retain: false }).catch(() => undefined)));
  }

  /** ε of every DP round of the model that aggregated, this one included, at this round's δ. */
  private privacy(row: FlRoundRow): RoundView['privacy'] {
    if (row.config.strategy.name !== 'dp-fedavg') return null;
    const delta = row.config.strategy.delta;
    const rounds = this.deps.store.fl
      .listRounds({ model: row.model, limit: 100_000 })
      .filter((r) => r.id !== row.id && r.status.aggregate?.info.noiseMultiplier !== undefined)
      .map((r) => ({ noiseMultiplier: r.status.aggregate!.info.noiseMultiplier!, samplingRate: r.status.aggregate!.info.samplingRate ?? 1 }));
    const info = row.status.aggregate!.info;
    rounds.push({ noiseMultiplier: info.noiseMultiplier!, samplingRate: info.samplingRate ?? 1 });
    return { epsilon: epsilon(rounds, delta).epsilon, delta, rounds: rounds.length };
  }

  private async register(id: number): Promise<void> {
    const { store, registry, blobs, now, log } = this.deps;
    const row = store.fl.getRound(id);
    if (!row || row.state !== 'evaluating') return;
    const cfg = row.config;
    const { evaluation, reason } = judgeEvaluation(store.fl.participants(id, 'eval'), cfg);
    row.status.evaluation = evaluation;
    const base = this.base(id);
    const bytes = readFileSync(join(this.dir(id), 'candidate.f32'));
    const weights = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const manifest = base.signed.manifest;
    const { modelJson, weightsBin } = writeModelWeights(base.weights, weights);
    const files = [];
    for (const [path, data] of [['model.json', modelJson], ['weights.bin', weightsBin]] as const) {
      const sha256 = sha256Hex(data);
      await blobs.ingest(Readable.from([data]), sha256, data.length);
      files.push({ path, sha256, size: data.length });
    }
    const agg = row.status.aggregate;
    const draft: ModelDraftInput = {
      schema: 1,
      name: row.model,
      runtime: manifest.runtime,
      entry: 'model.json',
      files,
      inputs: manifest.inputs,
      outputs: manifest.outputs,
      golden: { tolerance: manifest.golden.tolerance, vectors: await candidateGolden(manifest, base.weights, weights) },
      health: manifest.health,
      // The inputs' histograms still describe the inputs; the outputs' were the base's, and would misjudge the candidate's drift.
      baseline: { inputs: manifest.baseline.inputs, outputs: {} },
      training: manifest.training,
      lineage: {
        parent: row.baseVersion,
        method: 'federated',
        federatedRound: id,
        dataSnapshot: `round ${id}: ${row.status.counts.updates} devices, ${row.status.counts.samples} samples, never uploaded`,
        hyperparameters: { train: cfg.train, strategy: cfg.strategy, serverOptimizer: cfg.serverOptimizer, ...(row.status.privacy ? { privacy: row.status.privacy } : {}) },
        metrics: {
          participants: row.status.counts.updates,
          samples: row.status.counts.samples,
          updateNorm: agg?.updateNorm ?? 0,
          evalDevices: evaluation.devices,
          evalHoldoutRows: evaluation.holdoutCount,
          evalLoss: evaluation.candidateLoss,
          evalBaseLoss: evaluation.baseLoss,
          ...(evaluation.candidateAccuracy !== null ? { evalAccuracy: evaluation.candidateAccuracy, evalBaseAccuracy: evaluation.baseAccuracy! } : {}),
          ...(row.status.privacy ? { epsilon: row.status.privacy.epsilon, delta: row.status.privacy.delta } : {}),
        },
      },
      expiresAt: null,
    };
    const actor = `fl-round-${id}`;
    const published = await registry.publish(draft, actor);
    if (reason) registry.setStatus(row.model, published.version, 'quarantined', actor, reason);
    else store.fl.putServerState(row.model, readFileSync(join(this.dir(id), 'server-state.bin')), now());
    let rolloutId: number | null = null;
    if (!reason && cfg.rollout) {
      try {
        const started = await this.deps.startRollout({ name: row.model, version: published.version, selector: cfg.rollout.selector, plan: cfg.rollout.plan }, actor);
        rolloutId = started.rollout?.id ?? null;
      } catch (err) {
        log.warn({ err, round: id }, 'the candidate passed but its rollout did not start');
      }
    }
    const t = now();
    row.status.candidate = { version: published.version, status: reason ? 'quarantined' : 'candidate', rolloutId };
    // Refusals counted on the round while the candidate was built and published.
    row.status.rejected = store.fl.getRound(id)?.status.rejected ?? row.status.rejected;
    store.transaction(() => {
      store.fl.updateRound(id, { ...row, state: reason ? 'failed' : 'succeeded', reason, updatedAt: t });
      store.audit.append({ ts: t, actor, action: 'fl.round.finished', target: modelRef(row.model, published.version), ok: !reason, detail: { round: id, reason, evaluation } });
    });
    log.info({ round: id, version: published.version, passed: !reason, reason }, 'federated round registered its candidate');
  }
}
