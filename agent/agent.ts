import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import {
  DesiredMessage,
  MAX_PAYLOAD_BYTES,
  TelemetryAck,
  type RecordClass,
  decodeJson,
  encodeJson,
  parseTopic,
  topics,
  type AgentSettings,
  type ReportedMessage,
  type ResyncMessage,
  type StatusMessage,
  type ErrorCode,
} from '../proto/index.js';
import type { Logger } from '../common/log.js';
import { MqttSession } from '../common/mqtt-session.js';
import { RejectCounter } from '../common/reject-counter.js';
import { VERSION } from '../common/version.js';
import { settleWithin } from '../common/settle.js';
import type { AgentConfig } from './config.js';
import { collectFacts } from './facts/collect.js';
import { probeRuntimes, type RuntimeInfo } from './runtime/backends.js';
import { DesiredStore } from './state/desired.js';
import { SessionCounter } from './state/session-counter.js';
import { OutboxStore } from './outbox/store.js';
import { DEFAULT_REPLAY, Replayer } from './outbox/replay.js';
import { ModelManager } from './models/manager.js';
import { createParticipant, type Participant } from './learner/participant.js';
import type { LoadSamplesOptions } from './learner/sample-store.js';
import { outboxHousekeeping } from './outbox/housekeeping.js';
import { FeedbackStore } from './api/feedback.js';
import { startInferenceServer, type InferenceServer } from './api/http.js';

/**
 * The device daemon. `start` brings up state, then runtimes, then the models (verified before they
 * serve) and the inference API, then the link, then the loops; `stop`
 * says goodbye (retained `offline`), drains the link and returns.
 */
export class Agent {
  private desired: DesiredStore | null = null;
  private sessionCounter: SessionCounter | null = null;
  private session: MqttSession | null = null;
  private runtimes: RuntimeInfo = { onnxruntime: null, tfjsBackend: null };
  private reportTimer: NodeJS.Timeout | null = null;
  private factsTimer: NodeJS.Timeout | null = null;
  private housekeepingTimer: NodeJS.Timeout | null = null;
  private metricsTimer: NodeJS.Timeout | null = null;
  private outboxStore: OutboxStore | null = null;
  private replayer: Replayer | null = null;
  private droppedReported: Record<RecordClass, number> | null = null;
  private applied: AgentSettings | null = null;
  private modelManager: ModelManager | null = null;
  private feedbackStore: FeedbackStore | null = null;
  private participant: Participant | null = null;
  private api: InferenceServer | null = null;
  private reportSoon: NodeJS.Timeout | null = null;
  private readonly rejects: RejectCounter;
  private readonly inflight = new Set<Promise<unknown>>();
  private readonly listeners = new Set<(version: number) => void>();

  constructor(
    private readonly config: AgentConfig,
    private readonly log: Logger,
  ) {
    this.rejects = new RejectCounter(log.child({ component: 'ingress' }));
  }

  get desiredVersion(): number {
    return this.desired?.version ?? 0;
  }

  get settings(): AgentSettings | null {
    return this.applied;
  }

  get connected(): boolean {
    return this.session?.connected ?? false;
  }

  get rejectedCounts(): Record<string, number> {
    return this.rejects.snapshot();
  }

  /** The outbox, once started. */
  get outbox(): OutboxStore {
    if (!this.outboxStore) throw new Error('agent not started');
    return this.outboxStore;
  }

  /** The model manager: the in-process inference API (a ModelHost) and the slots' state. */
  get models(): ModelManager {
    if (!this.modelManager) throw new Error('agent not started');
    return this.modelManager;
  }

  /** Where the inference API listens, once started. */
  get apiAddress(): { url?: string; socketPath?: string } | null {
    return this.api ? { url: this.api.url, socketPath: this.api.socketPath } : null;
  }

  get replayStats(): Replayer['stats'] | null {
    return this.replayer?.stats ?? null;
  }

  /**
   * Reports something upstream through the outbox: committed locally first, sent when the link
   * allows, deleted once the fleet has it. Resolves with the record's sequence number.
   */
  report(cls: RecordClass, type: string, body: unknown): Promise<number> {
    return this.outbox.enqueue(cls, type, body);
  }

  /** Called with the new version after every applied desired-state change. */
  onApplied(fn: (version: number) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  async start(): Promise<void> {
    const cfg = this.config;
    mkdirSync(cfg.stateDir, { recursive: true, mode: 0o700 });
    const desired = new DesiredStore(cfg.stateDir);
    this.desired = desired;
    this.sessionCounter = new SessionCounter(cfg.stateDir);
    // Until the fleet has spoken (version 0), the local config's log level stands.
    this.applySettings(desired.version === 0 ? { ...desired.doc.agent, logLevel: cfg.logLevel } : desired.doc.agent);
    const ob = cfg.outbox;
    const { store: outbox, movedAside } = OutboxStore.open(cfg.stateDir, { maxBytes: ob.maxBytes, perClass: ob.classes, synchronous: ob.synchronous });
    this.outboxStore = outbox;
    this.droppedReported = outbox.droppedCounts();
    if (movedAside) {
      this.log.error({ movedTo: movedAside }, 'outbox database failed its integrity check; moved aside, started a fresh one');
      this.track(outbox.enqueue('event', 'outbox.corrupt', { movedTo: movedAside }));
    }
    this.track(outbox.enqueue('event', 'agent.started', { agentVersion: VERSION, desiredVersion: desired.version }));
    if (cfg.runtimes.probe) this.runtimes = await probeRuntimes(this.log.child({ component: 'runtime' }));

    const password = cfg.broker.password ?? readFileSync(cfg.broker.passwordFile as string, 'utf8').trim();
    const id = cfg.deviceId;
    await this.startModels(password);
    const counter = this.sessionCounter;
    const session = new MqttSession(
      {
        url: cfg.broker.url,
        clientId: id,
        username: cfg.broker.username ?? id,
        password,
        protocolVersion: cfg.broker.protocolVersion,
        keepaliveSec: cfg.broker.keepaliveSec,
        clean: false,
        reconnectBaseMs: cfg.broker.reconnectBaseMs,
        reconnectCapMs: cfg.broker.reconnectCapMs,
        subscriptions: [{ filter: topics.deviceDownFilter(id), qos: 1 }],
        will: () => ({ topic: topics.up(id, 'status'), payload: this.status('offline', counter.next()), qos: 1, retain: true }),
      },
      this.log.child({ component: 'link' }),
    );
    this.session = session;
    const replayer = new Replayer(
      outbox,
      (payload) => session.publish(topics.up(id, 'telemetry'), payload, { qos: 1 }),
      this.log.child({ component: 'outbox' }),
      { ...DEFAULT_REPLAY, bytesPerSec: ob.bytesPerSec, batchMaxRecords: ob.batchMaxRecords },
    );
    this.replayer = replayer;
    session.on('message', (topic, payload) => this.onMessage(topic, payload));
    session.on('connect', () => {
      this.track(this.announce());
      replayer.start();
    });
    session.on('disconnect', () => replayer.pause());
    this.housekeepingTimer = setInterval(() => this.housekeeping(), ob.dropReportIntervalSec * 1000);
    this.housekeepingTimer.unref();
    this.metricsTimer = setInterval(() => this.track(this.reportResources()), ob.metricsIntervalSec * 1000);
    this.metricsTimer.unref();
    session.on('refused', (reason) => this.log.error({ reason }, 'broker refused this device’s credentials; retrying with backoff'));
    session.start();
    this.log.info({ deviceId: id, broker: cfg.broker.url, desiredVersion: desired.version }, 'agent started');
  }

  async stop(): Promise<void> {
    for (const t of [this.reportTimer, this.factsTimer, this.housekeepingTimer, this.metricsTimer]) if (t) clearInterval(t);
    if (this.reportSoon) clearTimeout(this.reportSoon);
    this.reportTimer = this.factsTimer = this.housekeepingTimer = this.metricsTimer = this.reportSoon = null;
    try {
      await this.api?.close();
    } catch (err) {
      this.log.warn({ err }, 'error while closing the inference API');
    }
    this.api = null;
    await this.participant?.stop();
    this.participant = null;
    await this.modelManager?.stop();
    this.modelManager = null;
    this.feedbackStore?.close();
    this.feedbackStore = null;
    if (!(await settleWithin(this.inflight, 2000))) this.log.warn({ tasks: this.inflight.size }, 'stopping with tasks still waiting on the broker');
    this.replayer?.close();
    this.replayer = null;
    try {
      this.outboxStore?.close();
    } catch (err) {
      this.log.error({ err }, 'error while closing the outbox');
    }
    this.outboxStore = null;
    const session = this.session;
    this.session = null;
    if (!session) return;
    try {
      if (session.connected && this.sessionCounter) {
        // A clean goodbye: the will is discarded on DISCONNECT, so say `offline` ourselves.
        await session.publish(topics.up(this.config.deviceId, 'status'), this.status('offline', this.sessionCounter.current), { qos: 1, retain: true });
      }
    } catch (err) {
      this.log.warn({ err }, 'could not publish offline status');
    }
    try {
      await session.stop(true);
    } catch (err) {
      this.log.warn({ err }, 'error while closing the link');
    }
  }

  private status(state: StatusMessage['state'], session: number): Buffer {
    const msg: StatusMessage = { state, session, ts: Date.now(), agentVersion: VERSION };
    return encodeJson(msg);
  }

  /** On every connect: presence, facts and reported state, so the fleet's view is fresh. */
  private async announce(): Promise<void> {
    const id = this.config.deviceId;
    const session = this.session;
    if (!session || !this.sessionCounter) return;
    await session.publish(topics.up(id, 'status'), this.status('online', this.sessionCounter.current), { qos: 1, retain: true });
    await this.publishReported();
    await this.publishFacts();
  }

  private async publishReported(): Promise<void> {
    const session = this.session;
    if (!session?.connected || !this.desired || !this.applied) return;
    const msg: ReportedMessage = { ts: Date.now(), desiredVersion: this.desired.version, agent: this.applied, models: this.modelManager?.report() ?? {} };
    await session.publish(topics.up(this.config.deviceId, 'reported'), encodeJson(msg), { qos: 1 });
  }

  private async publishFacts(): Promise<void> {
    const session = this.session;
    if (!session?.connected) return;
    const facts = await collectFacts(VERSION, this.runtimes);
    await session.publish(topics.up(this.config.deviceId, 'facts'), encodeJson(facts), { qos: 1 });
  }

  private async requestResync(reason: ResyncMessage['reason']): Promise<void> {
    const session = this.session;
    if (!session || !this.desired) return;
    this.log.info({ reason, have: this.desired.version }, 'asking the fleet for the full desired state');
    const msg: ResyncMessage = { have: this.desired.version, reason };
    await session.publish(topics.up(this.config.deviceId, 'resync'), encodeJson(msg), { qos: 1 });
  }

  /** Expires records past their age, and says what was dropped since the last report. */
  private housekeeping(): void {
    if (!this.outboxStore) return;
    this.droppedReported = outboxHousekeeping(this.outboxStore, this.droppedReported, this.log, (p) => this.track(p));
  }

  private async reportResources(): Promise<void> {
    const m = process.memoryUsage();
    const [load1, load5] = loadavg();
    await this.report('metric', 'resources', { rssBytes: m.rss, heapUsedBytes: m.heapUsed, load1, load5, outbox: this.outboxStore?.backlog() });
  }

  private onAck(payload: Buffer): void {
    const decoded = decodeJson(TelemetryAck, payload, MAX_PAYLOAD_BYTES.ack);
    if (!decoded.ok) {
      this.rejects.reject(decoded.error.code, 'ack', { message: decoded.error.message.slice(0, 200) });
      return;
    }
    // An ack for no batch in flight (late, or forged) deletes nothing.
    if (this.replayer && !this.replayer.acknowledge(decoded.value)) this.rejects.reject('EF_BAD_PAYLOAD', 'ack', { reason: 'no such batch in flight' });
  }

  private onMessage(topic: string, payload: Buffer): void {
    const t = parseTopic(topic);
    if (!t || t.dir !== 'down' || t.deviceId !== this.config.deviceId) {
      this.rejects.reject('EF_BAD_PAYLOAD', topic.slice(0, 128), { reason: 'unexpected topic' });
      return;
    }
    if (t.kind === 'ack') return this.onAck(payload);
    if (t.kind === 'fl' || t.kind === 'candidate') return this.participant?.handle(t.kind, payload);
    // An empty retained message means the fleet cleared it; there is nothing to apply.
    if (payload.length === 0) return;
    const decoded = decodeJson(DesiredMessage, payload, MAX_PAYLOAD_BYTES.desired);
    if (!decoded.ok || !this.desired) {
      if (!decoded.ok) this.rejects.reject(decoded.error.code, 'desired', { message: decoded.error.message.slice(0, 200) });
      this.track(this.requestResync('invalid-message'));
      return;
    }
    const result = this.desired.apply(decoded.value);
    switch (result.outcome) {
      case 'stale':
        return;
      case 'resync':
        this.rejects.reject('EF_PATCH_FAILED', 'desired', { reason: result.reason });
        this.track(this.requestResync(result.reason));
        return;
      case 'applied':
        this.log.info({ version: result.version }, 'desired state applied');
        this.applySettings(this.desired.doc.agent);
        this.modelManager?.reconcile(this.desired.doc.models, { safeMode: this.desired.doc.safeMode === true });
        this.track(this.report('event', 'desired.applied', { version: result.version }));
        for (const fn of this.listeners) fn(result.version);
        this.track(this.publishReported());
    }
  }

  /**
   * Models come up before the link: every stored version is verified before anything serves, then
   * the inference API opens and the slots move toward the desired state already on disk.
   */
  private async startModels(password: string): Promise<void> {
    const cfg = this.config;
    const m = cfg.models;
    const keys = [...m.trustedKeys];
    if (m.trustedKeysFile) keys.push(...readFileSync(m.trustedKeysFile, 'utf8').split(/\s+/).filter((k) => k.length > 0));
    const { recentRequests, ...bounds } = cfg.feedback;
    const feedback = FeedbackStore.open(cfg.stateDir, { recentPerModel: recentRequests, ...bounds });
    this.feedbackStore = feedback;
    const manager = new ModelManager({
      stateDir: cfg.stateDir,
      trustedKeys: keys,
      fetch: m.artifactsUrl ? { baseUrl: m.artifactsUrl.replace(/\/+$/, ''), username: cfg.broker.username ?? cfg.deviceId, password } : null,
      keepStable: m.keepStable,
      maxModelBytes: m.maxModelBytes,
      maxAttempts: m.maxAttempts,
      childCheckTimeoutMs: m.childCheckTimeoutSec * 1000,
      checkIntervalMs: m.checkIntervalMs,
      delta: m.delta ? { offerTimeoutMs: m.deltaOfferTimeoutSec * 1000 } : null,
      report: (cls, type, body) => this.track(this.report(cls, type, body)),
      onChange: () => {
        this.reportedSoon();
        this.participant?.refreshPersonal();
      },
      log: this.log.child({ component: 'models' }),
      feedback,
      reportSamples: cfg.learner.enabled,
    });
    this.modelManager = manager;
    await manager.start();
    if (cfg.learner.enabled) {
      const publish = async (kind: 'fl' | 'update', payload: Buffer): Promise<void> => {
        if (!this.session) throw new Error('no link');
        await this.session.publish(topics.up(cfg.deviceId, kind), payload, { qos: 1 });
      };
      const samples = { count: (m: string) => feedback.sampleCount(m), load: (m: string, o: LoadSamplesOptions) => feedback.loadSamples(m, o) };
      const reject = (code: ErrorCode, kind: string, detail: Record<string, unknown>): void => this.rejects.reject(code, kind, detail);
      this.participant = createParticipant({ manager, samples, dir: join(cfg.stateDir, 'learner'), config: cfg.learner, publish, reject, log: this.log.child({ component: 'learner' }) });
      this.participant.refreshPersonal();
    }
    if (cfg.api.enabled) {
      this.api = await startInferenceServer(manager, { host: cfg.api.host, port: cfg.api.port, socketPath: cfg.api.socketPath, maxBodyBytes: cfg.api.maxBodyBytes, log: this.log.child({ component: 'api' }) });
    }
    // Version 0: the fleet has not spoken yet, so there is nothing to reconcile toward (and an empty
    // set of models must not be read as "remove every model").
    // In safe mode start-up has served the verified version; reconcile moves each slot to its fallback.
    if (this.desired && this.desired.version > 0) manager.reconcile(this.desired.doc.models, { safeMode: this.desired.doc.safeMode === true });
  }

  /** Model state changes come in bursts (a transition, then the next): one report after them. */
  private reportedSoon(): void {
    if (this.reportSoon) return;
    this.reportSoon = setTimeout(() => {
      this.reportSoon = null;
      this.track(this.publishReported());
    }, 100);
    this.reportSoon.unref();
  }

  /** Applies the remotely tunable settings in place: log level and the report and facts timers. */
  private applySettings(s: AgentSettings): void {
    const prev = this.applied;
    this.applied = s;
    if (prev?.logLevel !== s.logLevel) this.log.level = s.logLevel;
    if (prev?.reportIntervalSec !== s.reportIntervalSec) {
      if (this.reportTimer) clearInterval(this.reportTimer);
      this.reportTimer = setInterval(() => this.track(this.publishReported()), s.reportIntervalSec * 1000);
      this.reportTimer.unref();
    }
    if (prev?.factsIntervalSec !== s.factsIntervalSec) {
      if (this.factsTimer) clearInterval(this.factsTimer);
      this.factsTimer = setInterval(() => this.track(this.publishFacts()), s.factsIntervalSec * 1000);
      this.factsTimer.unref();
    }
  }

  private track(p: Promise<unknown>): void {
    const tracked = p.catch((err: unknown) => this.log.warn({ err }, 'agent task failed'));
    this.inflight.add(tracked);
    void tracked.finally(() => this.inflight.delete(tracked));
  }
}
