import { createHash } from 'node:crypto';
import { selects, type EvalMetrics, type LocalMetrics, type ReportedMessage, type RoundConfig, type RoundView } from '../../proto/index.js';
import type { FlParticipantRow, FlRoundRow, FlRoundStatus } from '../store/types.js';

/**
 * The pure parts of a round: who is eligible, how many are invited, why a round fails, and
 * whether a candidate passes its evaluation. The service (service.ts) does the I/O around them.
 */

export interface DeviceLook {
  id: string;
  tags: readonly string[];
  online: boolean;
  reported: ReportedMessage | null;
}

/** Devices a round may invite: selected, online, serving exactly the base, holding enough samples. In invitation order. */
export function eligibleDevices(devices: readonly DeviceLook[], cfg: RoundConfig, baseVersion: number, baseSha256: string, salt: string): string[] {
  const ids: string[] = [];
  for (const d of devices) {
    if (!d.online || !selects(cfg.selection.selector, d)) continue;
    const slot = d.reported?.models[cfg.model];
    if (!slot || slot.active !== baseVersion || slot.activeSha256 !== baseSha256) continue;
    if ((slot.samples ?? 0) < cfg.selection.minSamples) continue;
    ids.push(d.id);
  }
  // A hash order, not the database's: no device is always first, and the same round always picks the same devices.
  const key = (id: string): string => createHash('sha256').update(`${salt}:${id}`).digest('hex');
  return ids.map((id) => [key(id), id] as const).sort((a, b) => (a[0] < b[0] ? -1 : 1)).map(([, id]) => id);
}

/** How many to invite: the fraction of the eligible, clamped to [min, max] participants, never more than there are. */
export function inviteCount(eligible: number, sel: RoundConfig['selection']): number {
  const wanted = Math.min(sel.maxParticipants, Math.max(sel.minParticipants, Math.ceil(sel.fraction * eligible)));
  return Math.min(eligible, wanted);
}

export function emptyStatus(eligible: number, invited: number): FlRoundStatus {
  return {
    counts: { eligible, invited, joined: 0, declined: 0, updates: 0, failed: 0, samples: 0, evaluations: 0 },
    rejected: {},
    declines: {},
    local: null,
    aggregate: null,
    evaluation: null,
    privacy: null,
    candidate: null,
  };
}

/** The sentence a round that missed its quorum fails with. */
export function quorumReason(status: FlRoundStatus, needed: number, when: 'start' | 'deadline'): string {
  const c = status.counts;
  if (when === 'start') return `quorum not met: ${c.eligible} eligible device${c.eligible === 1 ? '' : 's'} (online, on the base version, with enough samples), ${needed} needed`;
  const declines = Object.entries(status.declines).map(([r, n]) => `${n} ${r}`).join(', ');
  const silent = Math.max(0, c.invited - c.updates - c.declined - c.failed);
  return `quorum not met: ${c.updates} update${c.updates === 1 ? '' : 's'} by the deadline, ${needed} needed (${c.invited} invited; ${c.declined} declined${declines ? ` (${declines})` : ''}; ${c.failed} failed; ${silent} silent)`;
}

/** Sample-weighted means of the participants' local figures. */
export function localMeans(parts: readonly FlParticipantRow[]): RoundView['local'] {
  let w = 0;
  let lb = 0;
  let la = 0;
  let ab = 0;
  let aa = 0;
  let withAcc = 0;
  for (const p of parts) {
    if (p.state !== 'updated' || !p.metrics) continue;
    const m = p.metrics as LocalMetrics;
    const n = p.samples ?? 0;
    w += n;
    lb += n * m.lossBefore;
    la += n * m.lossAfter;
    if (m.accuracyBefore !== null && m.accuracyAfter !== null) {
      withAcc += n;
      ab += n * m.accuracyBefore;
      aa += n * m.accuracyAfter;
    }
  }
  if (w === 0) return null;
  return { lossBefore: lb / w, lossAfter: la / w, accuracyBefore: withAcc ? ab / withAcc : null, accuracyAfter: withAcc ? aa / withAcc : null };
}

/**
 * Federated evaluation: every holdout row reported counts once. The candidate passes with enough
 * devices and an accuracy no more than `maxAccuracyDrop` below the base's on the same rows (for a
 * model without accuracy, a loss no more than that share above the base's).
 */
export function judgeEvaluation(parts: readonly FlParticipantRow[], cfg: RoundConfig): { evaluation: NonNullable<RoundView['evaluation']>; reason: string | null } {
  let rows = 0;
  let devices = 0;
  const sum = { bl: 0, cl: 0, ba: 0, ca: 0, accRows: 0 };
  for (const p of parts) {
    if (p.state !== 'evaluated' || !p.metrics) continue;
    const m = p.metrics as EvalMetrics;
    devices++;
    rows += m.holdoutCount;
    sum.bl += m.holdoutCount * m.baseLoss;
    sum.cl += m.holdoutCount * m.candidateLoss;
    if (m.baseAccuracy !== null && m.candidateAccuracy !== null) {
      sum.accRows += m.holdoutCount;
      sum.ba += m.holdoutCount * m.baseAccuracy;
      sum.ca += m.holdoutCount * m.candidateAccuracy;
    }
  }
  const e = cfg.evaluation;
  const evaluation = {
    devices,
    holdoutCount: rows,
    baseLoss: rows ? sum.bl / rows : 0,
    candidateLoss: rows ? sum.cl / rows : 0,
    baseAccuracy: sum.accRows ? sum.ba / sum.accRows : null,
    candidateAccuracy: sum.accRows ? sum.ca / sum.accRows : null,
    passed: null as boolean | null,
  };
  let reason: string | null = null;
  if (devices < e.minDevices) reason = `federated evaluation: ${devices} device${devices === 1 ? '' : 's'} reported by the deadline, ${e.minDevices} needed`;
  else if (evaluation.baseAccuracy !== null && evaluation.candidateAccuracy !== null) {
    const drop = evaluation.baseAccuracy - evaluation.candidateAccuracy;
    if (drop > e.maxAccuracyDrop) reason = `federated evaluation: accuracy ${pct(evaluation.candidateAccuracy)} against the base's ${pct(evaluation.baseAccuracy)} on ${rows} holdout rows (a drop of ${pct(drop)}, at most ${pct(e.maxAccuracyDrop)})`;
  } else if (evaluation.candidateLoss > evaluation.baseLoss * (1 + e.maxAccuracyDrop)) {
    reason = `federated evaluation: loss ${evaluation.candidateLoss.toFixed(4)} against the base's ${evaluation.baseLoss.toFixed(4)} on ${rows} holdout rows`;
  }
  evaluation.passed = reason === null;
  return { evaluation, reason };
}

const pct = (x: number): string => `${(x * 100).toFixed(2)} %`;

export function roundView(row: FlRoundRow, train: readonly FlParticipantRow[]): RoundView {
  return {
    id: row.id,
    model: row.model,
    baseVersion: row.baseVersion,
    state: row.state,
    reason: row.reason,
    config: row.config,
    createdAt: row.createdAt,
    deadlineAt: row.deadlineAt,
    updatedAt: row.updatedAt,
    scheduleId: row.scheduleId,
    ...row.status,
    local: row.status.local ?? localMeans(train),
  };
}
