import { readFileSync } from 'node:fs';
import {
  EdgefleetError,
  MAX_MANIFEST_BYTES,
  Manifest,
  ModelDraft,
  STATUS_TRANSITIONS,
  canonicalJson,
  decodeJson,
  manifestSha256,
  modelRef,
  summarizeIssues,
  type ModelDraftInput,
  type ModelStatus,
  type SignedManifest,
} from '../../proto/index.js';
import type { FleetStore, ModelVersionRow, ModelVersionSummaryRow } from '../store/types.js';
import type { ArtifactStore } from './blobs.js';
import type { FleetKeyring } from './keys.js';

/** Whether the artifact server hands an artifact to a device. */
export type Servability = 'servable' | 'unknown' | 'quarantined';

export interface PublishResult {
  name: string;
  version: number;
  status: ModelStatus;
  manifestSha256: string;
}

/**
 * The model registry: immutable, signed versions with a status each.
 *
 * - Versions are monotonic per name: the default is the highest + 1; an explicit version at or
 *   below the highest is refused (EF_MODEL_EXISTS), so a number never comes back with other bytes.
 * - Statuses move only along STATUS_TRANSITIONS; every move, and every publication, is written to
 *   the audit log with the target `name@version`, in the same transaction as the change.
 * - Several versions of a name may be `production` at once (a fleet mid-rollout runs two);
 *   promoting one demotes nothing. Which version a device runs is its desired state, not a status.
 */
export class Registry {
  constructor(
    private readonly store: FleetStore,
    private readonly blobs: ArtifactStore,
    private readonly keys: FleetKeyring,
    private readonly now: () => number = Date.now,
  ) {}

  /**
   * Checks every file against the artifact store (present, same size, same sha256: hashed again
   * now, since a signature vouches for these bytes), then signs and stores the version as a candidate.
   */
  async publish(input: ModelDraftInput | { draftSha256: string }, actor: string): Promise<PublishResult> {
    const draft = 'draftSha256' in input ? this.readDraft(input.draftSha256) : parseDraft(input);
    const now = this.now();
    if (draft.expiresAt !== null && draft.expiresAt <= now) {
      throw new EdgefleetError('EF_MODEL_EXPIRED', `${draft.name}: expiresAt ${new Date(draft.expiresAt).toISOString()} is already past`);
    }
    for (const f of draft.files) {
      const onDisk = await this.blobs.rehash(f.sha256);
      if (!onDisk) throw new EdgefleetError('EF_ARTIFACT_MISSING', `${f.path} (${f.sha256}) has not been uploaded`, { details: { path: f.path } });
      if (onDisk.sha256 !== f.sha256 || onDisk.size !== f.size) {
        throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${f.path}: stored ${onDisk.size} bytes hashing to ${onDisk.sha256}; the manifest says ${f.size} bytes, ${f.sha256}`, {
          details: { path: f.path },
        });
      }
    }
    // Synchronous from here: version assignment, signing and insert cannot interleave with another publish.
    return this.store.transaction(() => {
      const highest = this.store.models.latest(draft.name)?.version ?? 0;
      const version = draft.version ?? highest + 1;
      if (version <= highest) {
        throw new EdgefleetError('EF_MODEL_EXISTS', `${draft.name} is already at version ${highest}; versions only go up (next: ${highest + 1})`);
      }
      const parent = draft.lineage.parent;
      if (parent !== null && (parent >= version || !this.store.models.get(draft.name, parent))) {
        throw new EdgefleetError('EF_UNKNOWN_MODEL', `parent ${modelRef(draft.name, parent)} is not an earlier version in the registry`);
      }
      const parsed = Manifest.safeParse({ ...draft, version, createdAt: now });
      if (!parsed.success) throw new EdgefleetError('EF_MODEL_INVALID', summarizeIssues(parsed.error.issues));
      const signed = this.keys.sign(parsed.data);
      const sha = manifestSha256(signed);
      const row: ModelVersionRow = {
        name: draft.name,
        version,
        status: 'candidate',
        manifestJson: canonicalJson(signed),
        manifestSha256: sha,
        runtime: parsed.data.runtime,
        parent,
        expiresAt: parsed.data.expiresAt,
        sizeBytes: parsed.data.files.reduce((n, f) => n + f.size, 0),
        createdAt: now,
        statusAt: now,
      };
      this.store.models.insert(row, parsed.data.files);
      this.store.audit.append({
        ts: now,
        actor,
        action: 'model.published',
        target: modelRef(draft.name, version),
        ok: true,
        detail: { status: 'candidate', manifestSha256: sha, keyId: signed.signature.keyId, parent },
      });
      return { name: draft.name, version, status: 'candidate' as const, manifestSha256: sha };
    });
  }

  private readDraft(sha256: string): ModelDraft {
    const size = this.blobs.sizeOf(sha256);
    if (size === null) throw new EdgefleetError('EF_ARTIFACT_MISSING', `draft ${sha256} has not been uploaded`);
    if (size > MAX_MANIFEST_BYTES) throw new EdgefleetError('EF_MODEL_INVALID', `draft of ${size} bytes exceeds ${MAX_MANIFEST_BYTES}`);
    const decoded = decodeJson(ModelDraft, readFileSync(this.blobs.pathOf(sha256)), MAX_MANIFEST_BYTES);
    if (!decoded.ok) throw new EdgefleetError('EF_MODEL_INVALID', `draft ${sha256}: ${decoded.error.message}`);
    return decoded.value;
  }

  list(name?: string, limit = 1000): ModelVersionSummaryRow[] {
    return this.store.models.list({ name, limit });
  }

  /** A version, or the newest of the name when `version` is omitted. Throws EF_UNKNOWN_MODEL. */
  get(name: string, version?: number): ModelVersionRow {
    const row = version === undefined ? this.store.models.latest(name) : this.store.models.get(name, version);
    if (!row) throw new EdgefleetError('EF_UNKNOWN_MODEL', version === undefined ? `no model ${name}` : `no ${modelRef(name, version)}`);
    return row;
  }

  signed(row: ModelVersionRow): SignedManifest {
    return JSON.parse(row.manifestJson) as SignedManifest;
  }

  setStatus(name: string, version: number, status: ModelStatus, actor: string, reason?: string): { previous: ModelStatus; status: ModelStatus } {
    return this.store.transaction(() => {
      const row = this.get(name, version);
      if (!STATUS_TRANSITIONS[row.status].includes(status)) {
        const allowed = STATUS_TRANSITIONS[row.status];
        throw new EdgefleetError(
          'EF_STATUS_TRANSITION',
          `${modelRef(name, version)} is ${row.status}; it can move to ${allowed.length > 0 ? allowed.join(', ') : 'nothing'}, not ${status}`,
        );
      }
      const at = this.now();
      this.store.models.setStatus(name, version, status, at);
      this.store.audit.append({
        ts: at,
        actor,
        action: 'model.status',
        target: modelRef(name, version),
        ok: true,
        detail: { from: row.status, to: status, ...(reason === undefined ? {} : { reason }) },
      });
      return { previous: row.status, status };
    });
  }

  /** A version devices may be told to run: not quarantined, not deprecated, not expired. */
  assignable(name: string, version: number): ModelVersionRow {
    const row = this.get(name, version);
    if (row.status === 'quarantined') throw new EdgefleetError('EF_ARTIFACT_REFUSED', `${modelRef(name, version)} is quarantined; it cannot be assigned`);
    if (row.status === 'deprecated') throw new EdgefleetError('EF_MODEL_INVALID', `${modelRef(name, version)} is deprecated; it cannot be assigned`);
    if (row.expiresAt !== null && row.expiresAt <= this.now()) {
      throw new EdgefleetError('EF_MODEL_EXPIRED', `${modelRef(name, version)} expired at ${new Date(row.expiresAt).toISOString()}`);
    }
    return row;
  }

  /**
   * An artifact is served to devices while at least one version that names it is not quarantined.
   * Deprecated versions still serve: a device may need one to fall back to.
   */
  servability(sha256: string): Servability {
    const statuses = this.store.models.artifactStatuses(sha256);
    if (statuses.length === 0) return 'unknown';
    return statuses.every((s) => s === 'quarantined') ? 'quarantined' : 'servable';
  }
}

function parseDraft(input: unknown): ModelDraft {
  const parsed = ModelDraft.safeParse(input);
  if (!parsed.success) throw new EdgefleetError('EF_MODEL_INVALID', summarizeIssues(parsed.error.issues));
  return parsed.data;
}
