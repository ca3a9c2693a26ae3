import {
  FactsMessage,
  MAX_PAYLOAD_BYTES,
  ReportedMessage,
  ResyncMessage,
  StatusMessage,
  decodeJson,
  decodeTelemetryBatch,
  parseTopic,
  toRanges,
  type TelemetryAck,
  type TelemetryBatch,
  type UpKind,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { RejectCounter } from '../../common/reject-counter.js';
import type { DesiredStateService } from '../sync/desired.js';
import type { FleetStore } from '../store/types.js';
import { WriteBatcher } from '../store/batch.js';

const SCHEMAS = { status: StatusMessage, facts: FactsMessage, reported: ReportedMessage, resync: ResyncMessage } as const;

export interface InboundHooks {
  /** Told of every report once it is stored (rollouts and safe mode judge from them). */
  reported?: (deviceId: string, msg: ReportedMessage) => void;
  /** Told of every presence change once it is stored (rollouts enlist online devices first). */
  presence?: (deviceId: string, online: boolean) => void;
  /** Federated-learning traffic (`up/fl`, `up/update`): parsed by the round service, which alone knows what a round expects. */
  federated?: (deviceId: string, kind: 'fl' | 'update', payload: Buffer) => Promise<void>;
}

/**
 * Everything devices send upstream. Each payload is parsed against its schema before anything
 * else sees it; a message that fails is counted against its device and dropped, never stored.
 */
export class DeviceInbound {
  /** Reports are the bulk of what devices send: their writes are committed together. */
  private readonly writes: WriteBatcher;

  constructor(
    private readonly store: FleetStore,
    private readonly desired: DesiredStateService,
    private readonly log: Logger,
    private readonly rejects: RejectCounter,
    /** Sends a telemetry acknowledgement to a device (`down/ack`). */
    private readonly ack: (deviceId: string, ack: TelemetryAck) => Promise<void>,
    private readonly now: () => number = Date.now,
    private readonly hooks: InboundHooks = {},
  ) {
    this.writes = new WriteBatcher(store);
  }

  async handle(topic: string, payload: Buffer): Promise<void> {
    const t = parseTopic(topic);
    if (!t || t.dir !== 'up') {
      this.rejects.reject('EF_BAD_PAYLOAD', topic.slice(0, 128), { reason: 'unknown topic' });
      return;
    }
    const { deviceId, kind } = t;
    // An empty retained payload is how a retained message is cleared; it carries nothing to store.
    if (payload.length === 0) return;
    if (kind === 'reported') return this.reported(deviceId, payload);
    const device = this.store.devices.get(deviceId);
    if (!device) {
      this.rejects.reject('EF_UNKNOWN_DEVICE', deviceId, { kind });
      return;
    }
    if (kind === 'fl' || kind === 'update') {
      if (payload.length > MAX_PAYLOAD_BYTES[kind]) {
        this.rejects.reject('EF_PAYLOAD_TOO_LARGE', deviceId, { kind, bytes: payload.length });
        this.store.devices.addRejected(deviceId, 1);
        return;
      }
      return this.hooks.federated?.(deviceId, kind, payload);
    }
    const decoded = kind === 'telemetry' ? decodeTelemetryBatch(payload, MAX_PAYLOAD_BYTES.telemetry) : decodeJson(SCHEMAS[kind], payload, MAX_PAYLOAD_BYTES[kind]);
    if (!decoded.ok) {
      this.rejects.reject(decoded.error.code, deviceId, { kind, message: decoded.error.message.slice(0, 200) });
      this.store.devices.addRejected(deviceId, 1);
      return;
    }
    const at = this.now();
    await this.dispatch(deviceId, kind, decoded.value, at);
  }

  /**
   * A report: parsed here, stored with the other reports of this turn of the event loop in one
   * transaction (the device check inside it), then handed to the rollouts.
   */
  private async reported(deviceId: string, payload: Buffer): Promise<void> {
    const decoded = decodeJson(ReportedMessage, payload, MAX_PAYLOAD_BYTES.reported);
    const at = this.now();
    const outcome = await this.writes.run(() => {
      if (!this.store.devices.get(deviceId)) return 'unknown' as const;
      if (!decoded.ok) {
        this.store.devices.addRejected(deviceId, 1);
        return 'invalid' as const;
      }
      this.store.devices.touch(deviceId, at);
      return this.desired.recordReported(deviceId, decoded.value);
    });
    if (outcome === 'unknown') {
      this.rejects.reject('EF_UNKNOWN_DEVICE', deviceId, { kind: 'reported' });
      return;
    }
    if (!decoded.ok || outcome === 'invalid') {
      if (!decoded.ok) this.rejects.reject(decoded.error.code, deviceId, { kind: 'reported', message: decoded.error.message.slice(0, 200) });
      return;
    }
    this.hooks.reported?.(deviceId, decoded.value);
    await this.desired.resyncIfBehind(deviceId, decoded.value.desiredVersion, outcome.desiredVersion);
  }

  private async dispatch(deviceId: string, kind: UpKind, value: unknown, at: number): Promise<void> {
    switch (kind) {
      case 'status': {
        const msg = value as StatusMessage;
        const applied = this.store.transaction(() => {
          const session = this.store.devices.session(deviceId);
          // A will from an older session arrives after the device came back: ignore it.
          if (msg.session < session) return false;
          this.store.devices.setPresence(deviceId, msg.state, msg.session, at);
          return true;
        });
        if (applied) {
          this.log.info({ deviceId, state: msg.state, session: msg.session }, 'device presence');
          this.hooks.presence?.(deviceId, msg.state === 'online');
        }
        return;
      }
      case 'facts':
        this.store.devices.setFacts(deviceId, value as FactsMessage, at);
        return;
      case 'reported':
        return; // handled by reported(), before dispatch
      case 'telemetry': {
        const batch = value as TelemetryBatch;
        // Stored (or found already stored) before the ack goes out: an ack is a promise that the
        // records are safe here, and only then may the device delete them.
        const { inserted, duplicates } = this.store.transaction(() => {
          this.store.devices.touch(deviceId, at);
          return this.store.telemetry.ingest(deviceId, batch.records, batch.backlog, at);
        });
        if (duplicates > 0) this.log.debug({ deviceId, batch: batch.batch, inserted, duplicates }, 'telemetry duplicates dropped');
        await this.ack(deviceId, { batch: batch.batch, ranges: toRanges(batch.records.map((r) => r.seq)) });
        return;
      }
      case 'fl':
      case 'update':
        return; // handled by the round service, before dispatch
      case 'resync':
        this.store.devices.touch(deviceId, at);
        this.log.info({ deviceId, ...(value as ResyncMessage) }, 'device asked for its full desired state');
        await this.desired.resync(deviceId);
        return;
    }
  }
}
