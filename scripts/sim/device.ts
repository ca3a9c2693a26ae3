import type { EventEmitter } from 'node:events';
import {
  DesiredMessage,
  MAX_PAYLOAD_BYTES,
  decodeJson,
  encodeJson,
  parseTopic,
  topics,
  type ModelSlotReport,
  type ReportedMessage,
  type ResyncMessage,
  type StatusMessage,
} from '../../proto/index.js';
import { applyDesiredMessage, initialDesiredState, type DesiredState } from '../../agent/state/desired.js';
import type { Behaviour, DeviceProfile, SimTiming } from './scenario.js';
import { SimLink, type RawEcho } from './link.js';
import { SimSlot, type SlotHost } from './slot.js';
import type { FlActivity, SimLearner, SimLearning } from './learner.js';

/**
 * One simulated device: a real MQTT connection speaking the device protocol as agent/agent.ts
 * does (retained `online` status and an `offline` will carrying the session number, `down/+`
 * subscription, `up/reported` after every change and periodically, `up/resync` when a desired
 * message does not apply), with model slots that move as scripted instead of running models.
 * Desired messages apply through the agent's own rules (applyDesiredMessage). With federated
 * learning on, `down/fl` and `down/candidate` go to the agent's own Participant (learner.ts).
 */

export const SIM_AGENT_VERSION = 'sim-0.1.0';

export type DisconnectCause = 'crash' | 'flap' | 'offline' | 'lost' | 'stop';

export interface SimEvents {
  connected: [id: string, session: number];
  disconnected: [id: string, cause: DisconnectCause];
  /** The broker refused the device (credentials, or a subscription its ACL denies). */
  refused: [id: string, message: string];
  applied: [id: string, desiredVersion: number];
  resync: [id: string, request: ResyncMessage];
  reported: [id: string, report: ReportedMessage];
  verdict: [id: string, model: string, version: number, ok: boolean];
  /** Federated learning: what the device sent (join, decline, failed, evaluation, update), or a failed fetch of a base's files. */
  fl: [id: string, activity: FlActivity, detail: string | null];
}

export interface SimDeviceOptions {
  id: string;
  url: string;
  username: string;
  password?: string | undefined;
  protocolVersion: 4 | 5;
  keepaliveSec: number;
  timing: SimTiming;
  profile: DeviceProfile;
  initial: Readonly<Record<string, number>>;
  raw: RawEcho | null;
  /** Seeded: timings (apply delays, flaps, reconnects). */
  random: () => number;
  /** Seeded apart from `random`, so how often figures are read changes no timing. */
  noise: () => number;
  events: EventEmitter<SimEvents>;
  /** Federated learning for the fleet's simulated devices; null: off. */
  learning: SimLearning | null;
}

export interface SimDeviceSnapshot {
  id: string;
  behaviours: Behaviour[];
  /** Meant to be online (false: `offline` until set online, or set offline). */
  online: boolean;
  connected: boolean;
  /** Down after a crash, restarting. */
  restarting: boolean;
  session: number;
  crashes: number;
  desiredVersion: number;
  safeMode: boolean;
  models: Record<string, ModelSlotReport>;
}

export class SimDevice {
  private readonly link: SimLink;
  private desired: DesiredState = initialDesiredState();
  private readonly slots = new Map<string, SimSlot>();
  private crashes = 0;
  private wantOnline: boolean;
  private down = false;
  private stopped = false;
  private reportTimer: NodeJS.Timeout | null = null;
  private flapTimer: NodeJS.Timeout | null = null;
  private restartTimer: NodeJS.Timeout | null = null;
  private reportSoon: NodeJS.Immediate | null = null;
  private readonly learner: SimLearner | null;

  constructor(private readonly opts: SimDeviceOptions) {
    this.wantOnline = !opts.profile.offline;
    this.learner =
      opts.learning?.learner({
        id: opts.id,
        auth: { username: opts.username, password: opts.password ?? '' },
        serving: (model) => {
          const slot = this.slots.get(model);
          return slot && slot.active !== null ? { version: slot.active, sha256: slot.activeSha256 } : null;
        },
        // The Participant wants to know when nothing could be sent; a simulated device keeps no outbox.
        publish: (kind, payload) => {
          if (!this.link.connected || this.down) return Promise.reject(new Error(`${opts.id} has no link`));
          this.link.publish(topics.up(opts.id, kind), payload);
          return Promise.resolve();
        },
        activity: (what, detail) => opts.events.emit('fl', opts.id, what, detail),
      }) ?? null;
    for (const [name, version] of Object.entries(opts.initial)) this.slots.set(name, new SimSlot(name, this.slotHost(name), version));
    const { id, raw } = opts;
    const filters: string[] = [];
    if (!raw?.only) filters.push(topics.deviceDownFilter(id));
    // `down/+` already covers an echo topic under the device's own downstream.
    if (raw && (raw.only || parseTopic(raw.request) === null)) filters.push(raw.request);
    this.link = new SimLink(
      {
        clientId: id,
        url: opts.url,
        username: opts.username,
        password: opts.password,
        protocolVersion: opts.protocolVersion,
        keepaliveSec: opts.keepaliveSec,
        reconnectMs: opts.timing.reconnectMs,
        random: opts.random,
        filters,
        will: (session) => (raw?.only ? null : { topic: topics.up(id, 'status'), payload: this.status('offline', session) }),
        raw,
      },
      {
        wanted: () => !this.stopped && this.wantOnline && !this.down,
        up: (session) => this.onUp(session),
        message: (topic, payload) => this.onMessage(topic, payload),
        lost: () => {
          this.linkDown();
          opts.events.emit('disconnected', id, 'lost');
          this.link.retryLater();
        },
        refused: (message) => opts.events.emit('refused', id, message),
      },
    );
  }

  get id(): string {
    return this.opts.id;
  }

  get connected(): boolean {
    return this.link.connected;
  }

  get online(): boolean {
    return this.wantOnline;
  }

  get restarting(): boolean {
    return this.down;
  }

  get desiredVersion(): number {
    return this.desired.version;
  }

  /** The version a model serves here now; null when the slot is missing or empty. */
  serving(model: string): number | null {
    return this.slots.get(model)?.active ?? null;
  }

  /** The real sha256 of a version's signed manifest, learned from the fleet (see SimSlot.learnSha256). */
  learnSha256(model: string, version: number, manifestSha256: string): void {
    this.slots.get(model)?.learnSha256(version, manifestSha256);
  }

  /** Per model: what serves and in which state, without building a report. */
  slotSummary(): { model: string; active: number | null; state: string }[] {
    return [...this.slots.values()].map((s) => ({ model: s.model, active: s.active, state: s.state }));
  }

  snapshot(): SimDeviceSnapshot {
    return {
      id: this.id,
      behaviours: this.opts.profile.behaviours,
      online: this.wantOnline,
      connected: this.connected,
      restarting: this.down,
      session: this.link.session,
      crashes: this.crashes,
      desiredVersion: this.desired.version,
      safeMode: this.desired.doc.safeMode === true,
      models: this.reportModels(Date.now()),
    };
  }

  /** Resolves once connected and subscribed (at once when the device is meant to be away); rejects when refused. */
  connect(): Promise<void> {
    return this.link.connect();
  }

  async setOnline(online: boolean): Promise<void> {
    this.wantOnline = online;
    if (online) {
      if (!this.down) await this.link.connect();
      return;
    }
    this.link.cancelRetry();
    this.drop('offline');
  }

  /** Ends the device: `offline` (or, with clearRetained, nothing) left retained, then a clean DISCONNECT. */
  async stop(clearRetained = false): Promise<void> {
    this.stopped = true;
    this.linkDown();
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = null;
    if (this.reportSoon) clearImmediate(this.reportSoon);
    this.reportSoon = null;
    for (const slot of this.slots.values()) slot.dispose();
    await this.learner?.stop();
    const goodbye = this.opts.raw?.only ? null : { topic: topics.up(this.id, 'status'), payload: clearRetained ? Buffer.alloc(0) : this.status('offline') };
    if (await this.link.close(goodbye)) this.opts.events.emit('disconnected', this.id, 'stop');
  }

  private onUp(session: number): void {
    const { id, raw, timing, profile } = this.opts;
    this.opts.events.emit('connected', id, session);
    if (raw?.only) return;
    this.link.publish(topics.up(id, 'status'), this.status('online', session), true);
    this.publishReported();
    this.schedulePeriodicReport(timing.reportIntervalMs * this.opts.random());
    if (profile.flapping) {
      this.flapTimer = setTimeout(() => {
        this.flapTimer = null;
        this.drop('flap');
        this.link.retryLater(timing.flapDownMs);
      }, this.between(timing.flapUpMs));
      this.flapTimer.unref();
    }
  }

  /** The link is gone: what runs only while connected stops. */
  private linkDown(): void {
    if (this.reportTimer) clearTimeout(this.reportTimer);
    if (this.flapTimer) clearTimeout(this.flapTimer);
    this.reportTimer = this.flapTimer = null;
  }

  /** Ends the connection abruptly (no DISCONNECT): the broker publishes the will. */
  private drop(cause: DisconnectCause): void {
    this.linkDown();
    if (this.link.drop()) this.opts.events.emit('disconnected', this.id, cause);
  }

  /** The agent process dies: the link drops without goodbye, and every slot's work stops with it. */
  private crash(): void {
    this.crashes += 1;
    this.down = true;
    for (const slot of this.slots.values()) slot.dispose();
    this.learner?.abort();
    this.link.cancelRetry();
    this.drop('crash');
    this.restartTimer = setTimeout(() => this.restart(), this.opts.timing.crashRestartMs);
    this.restartTimer.unref();
  }

  /**
   * As the agent starts: slots resume conservatively (back to stable), then the link, then the
   * slots move toward the desired state kept from before. The agent starts models before its link;
   * here the link comes first, so a crash on activation never races a connection being set up, and
   * every session says `online` before its will can say `offline`.
   */
  private restart(): void {
    this.restartTimer = null;
    this.down = false;
    if (this.stopped) return;
    for (const slot of this.slots.values()) slot.restart();
    if (!this.wantOnline) {
      this.reconcile();
      return;
    }
    this.connect().then(
      () => this.reconcile(),
      () => undefined, // a refusal was reported as 'refused'
    );
  }

  private onMessage(topic: string, payload: Buffer): void {
    if (this.down) return;
    const t = parseTopic(topic);
    if (!t || t.dir !== 'down' || t.deviceId !== this.id) return;
    if (t.kind === 'fl' || t.kind === 'candidate') return this.learner?.handle(t.kind, payload);
    // Acks belong to the outbox, which a simulated device does not have.
    if (t.kind !== 'desired') return;
    // An empty retained message means the fleet cleared it; there is nothing to apply.
    if (payload.length === 0) return;
    const decoded = decodeJson(DesiredMessage, payload, MAX_PAYLOAD_BYTES.desired);
    if (!decoded.ok) {
      this.requestResync('invalid-message');
      return;
    }
    const result = applyDesiredMessage(this.desired, decoded.value);
    switch (result.outcome) {
      case 'stale':
        return;
      case 'resync':
        this.requestResync(result.reason);
        return;
      case 'applied':
        this.desired = result.next;
        this.reconcile();
        this.opts.events.emit('applied', this.id, result.next.version);
        this.changed();
    }
  }

  /** Moves every slot toward desired state; version 0 (the fleet has not spoken) is no instruction. */
  private reconcile(): void {
    if (this.desired.version === 0) return;
    const { models, safeMode } = this.desired.doc;
    for (const [name, slot] of this.slots) {
      if (name in models) continue;
      slot.dispose();
      this.slots.delete(name);
      this.changed();
    }
    for (const [name, m] of Object.entries(models)) {
      let slot = this.slots.get(name);
      if (!slot) {
        slot = new SimSlot(name, this.slotHost(name));
        this.slots.set(name, slot);
      }
      slot.setDesired(m.version, m.manifestSha256, safeMode === true);
    }
  }

  private slotHost(model: string): SlotHost {
    return {
      timing: this.opts.timing,
      behaviour: (version) => this.opts.profile.forVersion(model, version),
      random: this.opts.random,
      noise: this.opts.noise,
      changed: () => this.changed(),
      crash: () => this.crash(),
      verdict: (version, ok) => this.opts.events.emit('verdict', this.id, model, version, ok),
    };
  }

  /** Changes come in bursts (a desired state, then the slot steps it starts): one report after them. */
  private changed(): void {
    this.reportSoon ??= setImmediate(() => {
      this.reportSoon = null;
      this.publishReported();
    });
  }

  private publishReported(): void {
    if (!this.link.connected || this.down || this.opts.raw?.only) return;
    const now = Date.now();
    const msg: ReportedMessage = { ts: now, desiredVersion: this.desired.version, agent: this.desired.doc.agent, models: this.reportModels(now) };
    this.link.publish(topics.up(this.id, 'reported'), encodeJson(msg));
    this.opts.events.emit('reported', this.id, msg);
  }

  private reportModels(now: number): Record<string, ModelSlotReport> {
    const models: Record<string, ModelSlotReport> = {};
    for (const [name, slot] of this.slots) {
      const samples = this.opts.learning?.samples(this.id, name) ?? 0;
      models[name] = samples > 0 ? { ...slot.report(now), samples } : slot.report(now);
    }
    return models;
  }

  private schedulePeriodicReport(ms: number): void {
    if (this.reportTimer) clearTimeout(this.reportTimer);
    this.reportTimer = setTimeout(() => {
      this.publishReported();
      this.schedulePeriodicReport(this.opts.timing.reportIntervalMs);
    }, ms);
    this.reportTimer.unref();
  }

  private requestResync(reason: ResyncMessage['reason']): void {
    const msg: ResyncMessage = { have: this.desired.version, reason };
    this.link.publish(topics.up(this.id, 'resync'), encodeJson(msg));
    this.opts.events.emit('resync', this.id, msg);
  }

  private status(state: StatusMessage['state'], session = this.link.session): Buffer {
    const msg: StatusMessage = { state, session, ts: Date.now(), agentVersion: SIM_AGENT_VERSION };
    return encodeJson(msg);
  }

  private between([min, max]: readonly [number, number]): number {
    return min + (max - min) * this.opts.random();
  }
}
