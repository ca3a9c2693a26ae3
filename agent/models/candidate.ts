import { EdgefleetError, isEdgefleetError, modelRef, type ModelFile, type SignedManifest } from '../../proto/index.js';
import { checkInChild } from '../runtime/child-check.js';
import type { SlotContext } from './context.js';
import { fetchFile, fetchFileDelta, fetchManifest, newFetchStats } from './fetch.js';
import { activate } from './probation.js';
import { runShadow } from './shadow.js';
import type { Slot } from './slot.js';
import { abandon, fail, transition } from './steps.js';

const RETRY_BASE_MS = 1000;
const RETRY_CAP_MS = 5 * 60_000;

/**
 * Takes a new version from the artifact server to activation: download (whole files or deltas),
 * admission and verification, staging in a child process, shadow when desired state asks for it.
 * Desired state moving on (`signal`) abandons the candidate; a transient failure retries with
 * backoff; anything else fails the version here.
 */
export async function candidatePipeline(ctx: SlotContext, slot: Slot, want: number, signal: AbortSignal): Promise<void> {
  const { opts, store } = ctx;
  const name = slot.state.name;
  const attempts = slot.state.candidate === want ? slot.state.attempts : 0;
  transition(ctx, slot, 'downloading', { candidate: want, attempts });
  let signed: SignedManifest;
  try {
    if (!opts.fetch) throw new EdgefleetError('EF_ARTIFACT_MISSING', 'no artifact server configured (models.artifactsUrl)');
    const held = heldManifests(ctx, slot);
    signed = await fetchManifest(opts.fetch, name, want, signal, held[0]);
    const st = slot.state;
    ctx.trust.admit(signed, { name, version: want, manifestSha256: slot.desired?.manifestSha256, floor: st.floor, stable: st.stable, maxModelBytes: opts.maxModelBytes, now: Date.now() });
    store.saveManifest(signed);
    const stats = newFetchStats();
    for (const f of signed.manifest.files) {
      if (opts.delta) {
        const onFallback = (err: unknown): void => opts.log.warn({ model: name, version: want, file: f.path, err }, 'delta download failed; downloading the whole file');
        await fetchFileDelta(store, opts.fetch, f, stats, { base: deltaBase(ctx, held, f), offerTimeoutMs: opts.delta.offerTimeoutMs, onFallback }, signal);
      } else {
        await fetchFile(store, opts.fetch, f, stats, signal);
      }
    }
    if (signal.aborted) return abandon(ctx, slot);
    // Bytes resumed came over the link on an earlier attempt at this version: they count too.
    const transfer = { version: want, downloadedBytes: stats.bytesDownloaded + stats.bytesResumed, savedBytes: stats.savedBytes, reusedBytes: stats.reusedBytes, patchedFiles: stats.patchedFiles, fullFiles: stats.fullFiles, fallbacks: stats.fallbacks };
    transition(ctx, slot, 'verifying', { transfer });
    store.buildView(signed.manifest);
    store.verifyVersion(signed.manifest);
    transition(ctx, slot, 'staging');
    const check = await checkInChild(signed.manifest, store.viewDir(name, want), { timeoutMs: opts.childCheckTimeoutMs });
    if (!check.ok) throw new EdgefleetError(check.reason === 'golden' ? 'EF_GOLDEN_MISMATCH' : 'EF_RUNTIME_FAILED', `staging ${modelRef(name, want)} in a child process: ${check.reason}${check.detail ? ` (${String(check.detail).slice(0, 300)})` : ''}`);
    if (signal.aborted) return abandon(ctx, slot);
  } catch (err) {
    if (signal.aborted) return abandon(ctx, slot);
    const code = isEdgefleetError(err) ? err.code : 'EF_INTERNAL';
    // A network failure (or a server error) is not the version's fault: on a flaky link it can
    // last for days, so it is retried with backoff for as long as desired state names the
    // version, and never marks it failed. Partial downloads resume where they stopped.
    const transient = !isEdgefleetError(err) || (code === 'EF_ARTIFACT_MISSING' && opts.fetch !== null);
    if (transient) {
      slot.retries++;
      const delay = Math.min(RETRY_CAP_MS, RETRY_BASE_MS * 2 ** Math.min(slot.retries, 20)) * (0.5 + Math.random() / 2);
      opts.log.warn({ model: name, version: want, err, retryInSec: Math.round(delay / 1000) }, 'model download failed; will retry');
      transition(ctx, slot, 'idle', {}, { reason: 'retry', code, message: (err as Error).message.slice(0, 300) });
      const t = setTimeout(() => ctx.kick(slot), delay);
      t.unref();
      return;
    }
    return fail(ctx, slot, want, code, (err as Error).message);
  }
  if (slot.desired?.shadow) {
    transition(ctx, slot, 'shadow');
    const verdict = await runShadow(ctx, slot, signed, slot.desired.shadow.requests, signal);
    if (signal.aborted) return abandon(ctx, slot);
    if (verdict && !verdict.ok) return fail(ctx, slot, want, 'EF_HEALTH_FAILED', 'shadow', verdict);
  }
  if (signal.aborted) return abandon(ctx, slot);
  slot.retries = 0;
  await activate(ctx, slot, signed);
}

/** The manifests of versions of this model held here, newest served first: what patches start from. */
function heldManifests(ctx: SlotContext, slot: Slot): SignedManifest[] {
  const versions = [slot.serving?.version, ...slot.state.stable].filter((v): v is number => v !== undefined);
  const out: SignedManifest[] = [];
  for (const v of new Set(versions)) {
    const m = ctx.store.loadManifest(slot.state.name, v);
    if (m) out.push(m);
  }
  return out;
}

/** The blob to patch `file` from: the file at the same path in the newest held version that has it. */
function deltaBase(ctx: SlotContext, held: readonly SignedManifest[], file: ModelFile): string | null {
  for (const m of held) {
    const f = m.manifest.files.find((x) => x.path === file.path);
    if (f && f.sha256 !== file.sha256 && ctx.store.hasBlob(f.sha256, f.size)) return f.sha256;
  }
  return null;
}
