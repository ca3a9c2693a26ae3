import type {
  Backlog,
  DesiredDoc,
  FactsMessage,
  JsonPatch,
  ModelRuntime,
  ModelSlot,
  ModelStatus,
  RolloutPlan,
  RolloutStatus,
  SafeModeRecord,
  Selector,
  RecordClass,
  ReportedMessage,
  Role,
  TelemetryRecord,
  RoundConfig,
  RoundState,
  RoundView,
} from '../../proto/index.js';

/**
 * Repository ports of the fleet's state. SQLite implements them today; they are kept narrow and
 * synchronous-free of SQL so that a PostgreSQL implementation can slot in for a scaled-out fleet.
 */
export type PrincipalKind = 'device' | 'operator' | 'fleet';

export interface Principal {
  name: string;
  kind: PrincipalKind;
  role: Role | null;
  secretHash: string;
  createdAt: number;
}

export type Presence = 'never' | 'online' | 'offline';

export interface DeviceRow {
  id: string;
  createdAt: number;
  presence: Presence;
  lastSeen: number | null;
  session: number;
  facts: FactsMessage | null;
  rejected: number;
  tags: string[];
}

export interface DesiredRow {
  deviceId: string;
  version: number;
  doc: DesiredDoc;
  digest: string;
  publishedVersion: number;
  updatedAt: number;
}

export interface ReportedRow {
  deviceId: string;
  desiredVersion: number;
  doc: ReportedMessage;
  drift: JsonPatch;
  receivedAt: number;
}

export interface AuditRow {
  seq: number;
  ts: number;
  actor: string;
  action: string;
  target: string | null;
  ok: boolean;
  detail: unknown;
}

export interface TelemetryRow {
  seq: number;
  cls: RecordClass;
  type: string;
  ts: number;
  body: unknown;
  receivedAt: number;
}

export interface TelemetryStats {
  /** Highest sequence number received. */
  lastSeq: number;
  /** Records stored, and records received again and dropped by deduplication. */
  received: number;
  duplicates: number;
  /** The agent's own account, as of its last batch. */
  backlog: Backlog;
  reportedAt: number;
}

/** One registry version without its manifest text (what listings read). */
export interface ModelVersionSummaryRow {
  name: string;
  version: number;
  status: ModelStatus;
  manifestSha256: string;
  runtime: ModelRuntime;
  parent: number | null;
  expiresAt: number | null;
  /** Sum of the sizes of its files. */
  sizeBytes: number;
  createdAt: number;
  /** When the status last changed (the creation time until then). */
  statusAt: number;
}

export interface ModelVersionRow extends ModelVersionSummaryRow {
  /** The canonical JSON of the SignedManifest, exactly as served. */
  manifestJson: string;
}

export interface ModelFileRow {
  path: string;
  sha256: string;
  size: number;
}

/** One device's download of one model version, as its agent reported it. */
export interface ModelTransferRow {
  deviceId: string;
  name: string;
  version: number;
  downloadedBytes: number;
  savedBytes: number;
  reusedBytes: number;
  patchedFiles: number;
  fullFiles: number;
  fallbacks: number;
  at: number;
}

/** Sums over the devices that reported installing one version. */
export type ModelTransferTotals = Omit<ModelTransferRow, 'deviceId' | 'name' | 'version' | 'at'> & { devices: number };

/** Where an artifact is named: a model version and the path it has there. */
export interface ArtifactUse {
  name: string;
  version: number;
  path: string;
  runtime: ModelRuntime;
  manifestJson: string;
}

export interface RolloutRow {
  id: number;
  name: string;
  version: number;
  manifestSha256: string;
  selector: Selector;
  plan: RolloutPlan;
  status: RolloutStatus;
  createdBy: string;
  createdAt: number;
}

export interface RolloutMemberRow {
  rolloutId: number;
  deviceId: string;
  wave: number;
  previous: ModelSlot | null;
  /** The device's desired-state version once enlisted. */
  enlistedAt: number;
  assignedAt: number;
}

export type FlRole = 'train' | 'eval';
/** invited → joined → updated (train) or evaluated (eval); declined and failed end a participation. */
export type FlParticipantState = 'invited' | 'joined' | 'declined' | 'updated' | 'failed' | 'evaluated';

/** What a round row holds beyond its identity: the parts of RoundView that change as it runs. */
export type FlRoundStatus = Pick<RoundView, 'counts' | 'rejected' | 'declines' | 'local' | 'aggregate' | 'evaluation' | 'privacy' | 'candidate'>;

export interface FlRoundRow {
  id: number;
  model: string;
  baseVersion: number;
  baseManifestSha256: string;
  config: RoundConfig;
  state: RoundState;
  reason: string | null;
  status: FlRoundStatus;
  /** The eligible devices in invitation order; replacements for decliners come from here. */
  eligible: string[];
  scheduleId: number | null;
  createdBy: string;
  createdAt: number;
  deadlineAt: number;
  evalDeadlineAt: number | null;
  updatedAt: number;
}

export interface FlParticipantRow {
  roundId: number;
  role: FlRole;
  deviceId: string;
  state: FlParticipantState;
  detail: string | null;
  samples: number | null;
  metrics: unknown;
  at: number;
}

export interface FlScheduleRow {
  id: number;
  config: RoundConfig;
  everySec: number;
  nextAt: number;
  createdBy: string;
  createdAt: number;
}

export interface FleetStore {
  /** Runs `fn` atomically: every write inside commits together or not at all. */
  transaction<T>(fn: () => T): T;
  /** Runs `fn` once the outermost transaction commits, at once outside one; never if it rolls back. */
  afterCommit(fn: () => void): void;

  principals: {
    get(name: string): Principal | null;
    list(kind?: PrincipalKind): Principal[];
    insert(p: Principal): void;
    remove(name: string): boolean;
    setSecret(name: string, secretHash: string): void;
  };
  devices: {
    get(id: string): DeviceRow | null;
    list(): DeviceRow[];
    insert(id: string, createdAt: number): void;
    /** Sets presence as of an agent session; `session` is the agent's connection counter. */
    setPresence(id: string, presence: Presence, session: number, at: number): void;
    session(id: string): number;
    touch(id: string, at: number): void;
    setFacts(id: string, facts: FactsMessage, at: number): void;
    addRejected(id: string, n: number): void;
    setTags(id: string, tags: readonly string[]): void;
  };
  desired: {
    get(deviceId: string): DesiredRow | null;
    put(row: Omit<DesiredRow, 'publishedVersion'>): void;
    markPublished(deviceId: string, version: number): void;
    unpublished(limit: number): DesiredRow[];
  };
  reported: {
    get(deviceId: string): ReportedRow | null;
    put(row: ReportedRow): void;
  };
  telemetry: {
    /** Stores what is new, by (device, seq); returns how many were new and how many already stored. */
    ingest(deviceId: string, records: readonly TelemetryRecord[], backlog: Backlog, at: number): { inserted: number; duplicates: number };
    list(deviceId: string, opts: { limit: number; cls?: RecordClass | undefined; beforeSeq?: number | undefined }): TelemetryRow[];
    stats(deviceId: string): TelemetryStats | null;
    /**
     * Retention: drops records received before `receivedBefore`, and per device all but the newest
     * `keepPerDevice` (checked for the devices that received telemetry since the last call).
     */
    prune(receivedBefore: number, keepPerDevice: number): number;
  };
  models: {
    get(name: string, version: number): ModelVersionRow | null;
    /** The highest version of `name`, or null when it has none. */
    latest(name: string): ModelVersionRow | null;
    /** Newest first within each name; names in order. */
    list(opts: { name?: string | undefined; limit: number }): ModelVersionSummaryRow[];
    /** Adds a version and its files; fails (SQLITE_CONSTRAINT_PRIMARYKEY) when (name, version) exists. */
    insert(row: ModelVersionRow, files: readonly ModelFileRow[]): void;
    setStatus(name: string, version: number, status: ModelStatus, at: number): void;
    /** The statuses of every version that names this artifact (empty when none does). */
    artifactStatuses(sha256: string): ModelStatus[];
    /** The newest version naming this artifact, with its path there; null when none does. */
    artifactUse(sha256: string): ArtifactUse | null;
  };
  transfers: {
    /** Keeps the latest report per (device, model version). */
    put(row: ModelTransferRow): void;
    totals(name: string, version: number): ModelTransferTotals;
  };
  rollouts: {
    /** Returns the new rollout's id. */
    insert(row: Omit<RolloutRow, 'id'>): number;
    get(id: number): RolloutRow | null;
    /** Newest first. `active`: not yet succeeded, halted or aborted (a finished revert still counts as done). */
    list(opts: { name?: string | undefined; active?: boolean | undefined; limit: number }): RolloutRow[];
    setStatus(id: number, status: RolloutStatus, at: number): void;
    members(id: number): RolloutMemberRow[];
    addMember(row: RolloutMemberRow): void;
  };
  safeMode: {
    insert(r: Omit<SafeModeRecord, 'id'>): number;
    list(): SafeModeRecord[];
    remove(id: number): void;
  };
  fl: {
    insertRound(row: Omit<FlRoundRow, 'id'>): number;
    getRound(id: number): FlRoundRow | null;
    /** Newest first; `active`: collecting or evaluating. */
    listRounds(opts: { model?: string | undefined; active?: boolean | undefined; limit: number }): FlRoundRow[];
    updateRound(id: number, u: Pick<FlRoundRow, 'state' | 'reason' | 'status' | 'evalDeadlineAt' | 'updatedAt'>): void;
    participants(roundId: number, role: FlRole): FlParticipantRow[];
    participant(roundId: number, role: FlRole, deviceId: string): FlParticipantRow | null;
    /** Inserts or replaces the (round, role, device) row. */
    putParticipant(row: FlParticipantRow): void;
    serverState(model: string): Uint8Array | null;
    putServerState(model: string, state: Uint8Array, at: number): void;
    insertSchedule(row: Omit<FlScheduleRow, 'id'>): number;
    listSchedules(): FlScheduleRow[];
    setScheduleNext(id: number, nextAt: number): void;
    removeSchedule(id: number): boolean;
  };
  audit: {
    append(e: Omit<AuditRow, 'seq'>): number;
    list(opts: { limit: number; target?: string | undefined }): AuditRow[];
  };
  close(): void;
}
