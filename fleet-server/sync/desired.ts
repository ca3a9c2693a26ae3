import jsonpatch from 'fast-json-patch';
import {
  DesiredDoc,
  EdgefleetError,
  desiredDigest,
  defaultDesiredDoc,
  encodeJson,
  summarizeIssues,
  topics,
  type DesiredMessage,
  type JsonPatch,
  type ReportedMessage,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { DesiredRow, FleetStore } from '../store/types.js';
import { WriteBatcher } from '../store/batch.js';

/** Shortest time between two unrequested full resyncs of one device. */
export const RESYNC_MIN_INTERVAL_MS = 60_000;

export interface Publisher {
  publish(topic: string, payload: Buffer, opts: { qos: 0 | 1; retain: boolean }): Promise<void>;
}

export type DesiredChange = { patch: JsonPatch; baseVersion?: number | undefined } | { doc: unknown; baseVersion?: number | undefined };

/**
 * The fleet's side of desired-state sync. The database is the truth; the broker's retained
 * `down/desired` message follows it. A change is stored first (version n+1), then published as the
 * patch n→n+1 when the retained message is known to hold n, else as the whole document. Whatever
 * did not reach the broker (a crash, a lost link) is found by `publishPending`, which runs on every
 * (re)connect and on a timer: level-triggered, so no change is ever lost between the two.
 */
export class DesiredStateService {
  /** When each device was last sent its whole document, to rate-limit repairs. */
  private readonly lastResync = new Map<string, number>();
  private readonly observers: ((row: DesiredRow) => void)[] = [];
  /** Publication marks, one per message, are committed together. */
  private readonly writes: WriteBatcher;

  constructor(
    private readonly store: FleetStore,
    private readonly publisher: Publisher,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
  ) {
    this.writes = new WriteBatcher(store);
  }

  /** Called with every new version of a device's document, once it is committed. */
  observe(fn: (row: DesiredRow) => void): void {
    this.observers.push(fn);
  }

  private changed(row: DesiredRow): void {
    if (this.observers.length === 0) return;
    this.store.afterCommit(() => {
      for (const fn of this.observers) fn(row);
    });
  }

  /** The initial document of a new device (version 1). Call inside the device's creating transaction. */
  initialize(deviceId: string, doc: DesiredDoc = defaultDesiredDoc()): DesiredRow {
    const row = { deviceId, version: 1, doc, digest: desiredDigest(doc), updatedAt: this.now() };
    this.store.desired.put(row);
    const out = { ...row, publishedVersion: 0 };
    this.changed(out);
    return out;
  }

  /**
   * The fleet's own changes to many devices at once (rollouts, reverts, safe mode): `edit` maps each
   * current document to the next, in one transaction. The documents are built from valid ones with
   * parts the caller validated, so the schema is not run again: at ten thousand devices that matters.
   */
  changeMany(deviceIds: readonly string[], edit: (doc: DesiredDoc, deviceId: string) => DesiredDoc): { row: DesiredRow; previous: DesiredRow }[] {
    return this.store.transaction(() => {
      const out: { row: DesiredRow; previous: DesiredRow }[] = [];
      for (const deviceId of deviceIds) {
        const current = this.store.desired.get(deviceId);
        if (!current) continue;
        const doc = edit(current.doc, deviceId);
        if (doc === current.doc) continue;
        const digest = desiredDigest(doc);
        if (digest === current.digest) continue;
        const next = { deviceId, version: current.version + 1, doc, digest, updatedAt: this.now() };
        this.store.desired.put(next);
        const row = { ...next, publishedVersion: current.publishedVersion };
        this.changed(row);
        out.push({ row, previous: current });
      }
      return out;
    });
  }

  get(deviceId: string): DesiredRow {
    const row = this.store.desired.get(deviceId);
    if (!row) throw new EdgefleetError('EF_UNKNOWN_DEVICE', `no device ${deviceId}`);
    return row;
  }

  /**
   * Applies an operator's change. A patch that does not apply, or a result that fails the schema,
   * changes nothing and says why. An unchanged result keeps the version.
   */
  change(deviceId: string, change: DesiredChange): { row: DesiredRow; changed: boolean; previous: DesiredRow } {
    return this.store.transaction(() => {
      const current = this.get(deviceId);
      if (change.baseVersion !== undefined && change.baseVersion !== current.version) {
        throw new EdgefleetError('EF_VERSION_CONFLICT', `desired state of ${deviceId} is at version ${current.version}, not ${change.baseVersion}`);
      }
      let candidate: unknown;
      if ('patch' in change) {
        try {
          // validate=true checks every operation; mutate=false leaves `current.doc` untouched.
          candidate = jsonpatch.applyPatch(structuredClone(current.doc), change.patch, true, false).newDocument;
        } catch (e) {
          throw new EdgefleetError('EF_PATCH_FAILED', `patch does not apply: ${(e as Error).message.split('\n')[0]}`);
        }
      } else {
        candidate = change.doc;
      }
      const parsed = DesiredDoc.safeParse(candidate);
      if (!parsed.success) throw new EdgefleetError('EF_DESIRED_INVALID', summarizeIssues(parsed.error.issues));
      const doc = parsed.data;
      const digest = desiredDigest(doc);
      if (digest === current.digest) return { row: current, changed: false, previous: current };
      const next = { deviceId, version: current.version + 1, doc, digest, updatedAt: this.now() };
      this.store.desired.put(next);
      const row = { ...next, publishedVersion: current.publishedVersion };
      this.changed(row);
      return { row, changed: true, previous: current };
    });
  }

  /** Publishes version `row` of a device, as a patch from `previous` when the retained message holds it. */
  async publish(row: DesiredRow, previous: DesiredRow | null): Promise<void> {
    let message: DesiredMessage;
    if (previous && previous.version === row.version - 1 && row.publishedVersion === previous.version) {
      const patch = jsonpatch.compare(previous.doc, row.doc) as JsonPatch;
      message = { kind: 'patch', from: previous.version, to: row.version, digest: row.digest, patch };
    } else {
      message = { kind: 'full', version: row.version, digest: row.digest, doc: row.doc };
    }
    await this.publisher.publish(topics.down(row.deviceId, 'desired'), encodeJson(message), { qos: 1, retain: true });
    await this.writes.run(() => this.store.desired.markPublished(row.deviceId, row.version));
  }

  /** The whole document, for an agent whose version did not line up. */
  async resync(deviceId: string): Promise<void> {
    const row = this.store.desired.get(deviceId);
    if (!row) return;
    this.lastResync.set(deviceId, this.now());
    await this.publish(row, null);
  }

  /**
   * Level-triggered repair: a device that reports an older version than the fleet holds is sent the
   * whole document again, whatever became of the retained message (a broker that lost it, a device
   * that missed it). At most once per `RESYNC_MIN_INTERVAL_MS` per device, so a device that reports
   * on connect, before it has read its retained message, costs one spare message at most.
   */
  async resyncIfBehind(deviceId: string, reportedVersion: number, desiredVersion?: number | null): Promise<boolean> {
    // The caller often read the version already (recordReported): most reports are not behind.
    if (desiredVersion !== undefined && (desiredVersion === null || reportedVersion >= desiredVersion)) return false;
    const row = this.store.desired.get(deviceId);
    if (!row || reportedVersion >= row.version) return false;
    // The document moved on since the report was stored: its new version is on its way to the
    // device, which asks for the whole document itself if it cannot apply it.
    if (desiredVersion !== undefined && row.version !== desiredVersion) return false;
    const last = this.lastResync.get(deviceId);
    if (last !== undefined && this.now() - last < RESYNC_MIN_INTERVAL_MS) return false;
    this.log.info({ deviceId, reportedVersion, desiredVersion: row.version }, 'device is behind; sending its whole desired state');
    await this.resync(deviceId);
    return true;
  }

  /** Publishes every document the broker may not hold yet. Returns how many were sent. */
  async publishPending(batch = 500): Promise<number> {
    let sent = 0;
    for (;;) {
      const rows = this.store.desired.unpublished(batch);
      if (rows.length === 0) return sent;
      await Promise.all(rows.map((r) => this.publish(r, null)));
      sent += rows.length;
    }
  }

  /** Stores what the agent reports and the patch that would take it to desired state (its drift). */
  recordReported(deviceId: string, msg: ReportedMessage): { inSync: boolean; desiredVersion: number | null } {
    const desired = this.store.desired.get(deviceId);
    if (!desired) return { inSync: false, desiredVersion: null };
    // Models compare by the version that serves: a device still on probation, or one that rolled
    // back a bad version, shows as drift until it serves what desired state names.
    const served = Object.fromEntries(Object.entries(msg.models).map(([name, r]) => [name, { version: r.active }]));
    const wanted = Object.fromEntries(Object.entries(desired.doc.models).map(([name, slot]) => [name, { version: slot.version }]));
    const drift = jsonpatch.compare({ agent: msg.agent, models: served }, { agent: desired.doc.agent, models: wanted }) as JsonPatch;
    this.store.reported.put({ deviceId, desiredVersion: msg.desiredVersion, doc: msg, drift, receivedAt: this.now() });
    for (const [name, r] of Object.entries(msg.models)) {
      if (r.transfer) this.store.transfers.put({ deviceId, name, ...r.transfer, at: this.now() });
    }
    const inSync = drift.length === 0 && msg.desiredVersion === desired.version;
    if (!inSync) this.log.debug({ deviceId, drift: drift.length, reportedVersion: msg.desiredVersion, desiredVersion: desired.version }, 'device not in sync');
    return { inSync, desiredVersion: desired.version };
  }

  /** Clears the retained document of a removed device so a new device of the same id starts clean. */
  async clear(deviceId: string): Promise<void> {
    this.lastResync.delete(deviceId);
    await this.publisher.publish(topics.down(deviceId, 'desired'), Buffer.alloc(0), { qos: 1, retain: true });
  }
}
