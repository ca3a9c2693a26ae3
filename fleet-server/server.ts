import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { exec } from 'node:child_process';
import { promisify } from 'node:util';
import { encodeJson, topics, parseTopic } from '../proto/index.js';
import type { Logger } from '../common/log.js';
import { MqttSession } from '../common/mqtt-session.js';
import { RejectCounter } from '../common/reject-counter.js';
import { settleWithin } from '../common/settle.js';
import { EmbeddedBroker } from './broker/embedded.js';
import { writeMosquitto } from './broker/mosquitto.js';
import { CLI_PROFILE_FILE, ensureBootstrapOperator, ensureFleetIdentity } from './auth/bootstrap.js';
import type { ServerConfig } from './config.js';
import { DeviceInbound } from './link/inbound.js';
import { OpsDispatcher } from './ops/dispatcher.js';
import { createHandlers } from './ops/handlers.js';
import { openSqliteStore } from './store/sqlite.js';
import type { FleetStore } from './store/types.js';
import { DesiredStateService } from './sync/desired.js';
import { ArtifactStore } from './registry/blobs.js';
import { ArtifactServer } from './registry/http.js';
import { DeltaService } from './registry/deltas.js';
import { FleetKeyring } from './registry/keys.js';
import { setProfileArtifactsUrl } from './registry/profile.js';
import { Registry } from './registry/registry.js';
import { RolloutService } from './rollouts/service.js';
import { RoundService } from './federated/service.js';

const execAsync = promisify(exec);

/**
 * The fleet daemon. The constructor wires nothing that does I/O; `start` brings up storage, then the
 * broker, then the link, then the loops; `stop` takes them down in reverse, each on its own.
 */
export class FleetServer {
  private store: FleetStore | null = null;
  private broker: EmbeddedBroker | null = null;
  private artifacts: ArtifactServer | null = null;
  private session: MqttSession | null = null;
  private rolloutService: RolloutService | null = null;
  private roundService: RoundService | null = null;
  private timer: NodeJS.Timeout | null = null;
  private pruneTimer: NodeJS.Timeout | null = null;
  private readonly rejects: RejectCounter;
  private readonly inflight = new Set<Promise<unknown>>();
  private brokerUrlValue = '';
  private artifactsUrlValue = '';

  constructor(
    private readonly config: ServerConfig,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
  ) {
    this.rejects = new RejectCounter(log.child({ component: 'ingress' }));
  }

  /** URL of the broker the fleet uses (for the embedded one, with the port actually bound). */
  get brokerUrl(): string {
    return this.brokerUrlValue;
  }

  /** URL of the artifact server (model files and manifests over HTTP), with the port actually bound. */
  get artifactsUrl(): string {
    return this.artifactsUrlValue;
  }

  get dataDir(): string {
    return this.config.dataDir;
  }

  get fleetStore(): FleetStore {
    if (!this.store) throw new Error('fleet server not started');
    return this.store;
  }

  /** Staged rollouts and safe mode (tests and the benchmark watch it). */
  get rollouts(): RolloutService {
    if (!this.rolloutService) throw new Error('fleet server not started');
    return this.rolloutService;
  }

  /** Federated rounds (tests watch them). */
  get rounds(): RoundService {
    if (!this.roundService) throw new Error('fleet server not started');
    return this.roundService;
  }

  get rejectedCounts(): Record<string, number> {
    return this.rejects.snapshot();
  }

  async start(): Promise<void> {
    const cfg = this.config;
    mkdirSync(cfg.dataDir, { recursive: true, mode: 0o700 });
    const store = openSqliteStore(join(cfg.dataDir, 'fleet.db'));
    this.store = store;
    // The rest of the fleet's storage: the signing key (created on first start) and the artifact files.
    const keys = new FleetKeyring({ dataDir: cfg.dataDir, keyFile: cfg.signing.keyFile }, this.now);
    const blobs = new ArtifactStore(join(cfg.dataDir, 'artifacts'));
    const registry = new Registry(store, blobs, keys, this.now);
    const fleetPassword = cfg.broker.password ?? ensureFleetIdentity(store, cfg.dataDir, cfg.broker.username, this.now());

    if (cfg.broker.mode === 'embedded') {
      const broker = new EmbeddedBroker(
        { host: cfg.broker.host, port: cfg.broker.port, persistenceDir: join(cfg.dataDir, 'broker'), maxPayloadBytes: cfg.broker.maxPayloadBytes, maxUpdateBytes: cfg.broker.maxUpdateBytes },
        store,
        this.log.child({ component: 'broker' }),
        this.rejects,
      );
      await broker.start();
      this.broker = broker;
      const host = cfg.broker.host === '0.0.0.0' || cfg.broker.host === '::' ? '127.0.0.1' : cfg.broker.host;
      this.brokerUrlValue = `mqtt://${host}:${broker.port}`;
    } else {
      this.brokerUrlValue = cfg.broker.url as string;
    }
    const publicUrl = cfg.broker.publicUrl ?? this.brokerUrlValue;

    const artifacts = new ArtifactServer(
      { host: cfg.artifacts.host, port: cfg.artifacts.port, maxFileBytes: cfg.artifacts.maxFileBytes, authCacheSec: cfg.artifacts.authCacheSec },
      {
        store,
        registry,
        blobs,
        deltas: cfg.delta.enabled
          ? new DeltaService(
              { dir: join(cfg.dataDir, 'deltas'), minSavings: cfg.delta.minSavings, cacheMaxBytes: cfg.delta.cacheMaxBytes },
              { store, blobs, log: this.log.child({ component: 'deltas' }), now: this.now },
            )
          : null,
        log: this.log.child({ component: 'artifacts' }),
        now: this.now,
      },
    );
    await artifacts.start();
    this.artifacts = artifacts;
    const artifactsHost = cfg.artifacts.host === '0.0.0.0' || cfg.artifacts.host === '::' ? '127.0.0.1' : cfg.artifacts.host;
    this.artifactsUrlValue = cfg.artifacts.publicUrl ?? `http://${artifactsHost.includes(':') ? `[${artifactsHost}]` : artifactsHost}:${artifacts.port}`;

    try {
      if (ensureBootstrapOperator(store, cfg.dataDir, this.brokerUrlValue, this.now())) {
        this.log.info({ profile: join(cfg.dataDir, CLI_PROFILE_FILE) }, 'created operator "admin" and its CLI profile');
      }
      setProfileArtifactsUrl(cfg.dataDir, this.artifactsUrlValue);
    } catch (err) {
      this.log.warn({ err }, 'CLI profile unreadable; left alone');
    }
    await this.writeBrokerFiles();

    const desired = new DesiredStateService(store, { publish: (t, p, o) => this.publish(t, p, o) }, this.log.child({ component: 'desired' }), this.now);
    const rollouts = new RolloutService({ store, desired, registry, log: this.log.child({ component: 'rollouts' }), now: this.now, intervalMs: cfg.rollouts.intervalMs });
    this.rolloutService = rollouts;
    const rounds = new RoundService({
      store,
      registry,
      blobs,
      publish: (t, p, o) => this.publish(t, p, o),
      startRollout: (p, by) => rollouts.startRollout(p, by),
      reject: (code, deviceId, detail) => this.rejects.reject(code, deviceId, detail),
      log: this.log.child({ component: 'federated' }),
      now: this.now,
      dataDir: cfg.dataDir,
      intervalMs: cfg.rollouts.intervalMs,
    });
    this.roundService = rounds;
    const inbound = new DeviceInbound(
      store,
      desired,
      this.log.child({ component: 'devices' }),
      this.rejects,
      (deviceId, ack) => this.publish(topics.down(deviceId, 'ack'), encodeJson(ack), { qos: 1, retain: false }),
      this.now,
      {
        reported: (deviceId, msg) => rollouts.reported(deviceId, msg),
        presence: (deviceId, online) => rollouts.presence(deviceId, online),
        federated: (deviceId, kind, payload) => rounds.handle(deviceId, kind, payload),
      },
    );
    const ops = new OpsDispatcher(
      store,
      createHandlers({
        store,
        desired,
        brokerUrl: publicUrl,
        now: this.now,
        rejected: () => this.rejects.snapshot(),
        principalsChanged: async (removed) => {
          if (removed) this.broker?.disconnect(removed);
          await this.writeBrokerFiles();
        },
        registry,
        keys,
        artifactsUrl: () => this.artifactsUrlValue,
        rollouts,
        rounds,
      }),
      this.log.child({ component: 'ops' }),
      this.rejects,
      this.now,
    );

    const session = new MqttSession(
      {
        url: this.brokerUrlValue,
        clientId: cfg.broker.username,
        username: cfg.broker.username,
        password: fleetPassword,
        protocolVersion: cfg.broker.protocolVersion,
        keepaliveSec: 30,
        // A persistent session: device reports queued by the broker while the fleet restarts are delivered.
        clean: false,
        reconnectBaseMs: 500,
        reconnectCapMs: 15_000,
        subscriptions: [
          { filter: topics.fleetUpFilter, qos: 1 },
          { filter: topics.fleetOpsFilter, qos: 1 },
        ],
      },
      this.log.child({ component: 'link' }),
    );
    this.session = session;
    session.on('message', (topic, payload) => {
      const t = parseTopic(topic);
      if (t?.dir === 'ops-req') {
        this.track(
          ops.handle(t.operator, payload).then((reply) => this.publish(topics.opsReply(t.operator), encodeJson(reply), { qos: 1, retain: false })),
        );
      } else {
        this.track(inbound.handle(topic, payload));
      }
    });
    session.on('refused', (reason) => this.log.error({ reason }, 'broker refused the fleet credentials'));
    const connected = new Promise<void>((resolve) => session.once('connect', () => resolve()));
    session.on('connect', () => this.track(desired.publishPending()));
    session.start();
    const waitMs = cfg.broker.connectWaitSec * 1000;
    let waitTimer: NodeJS.Timeout | undefined;
    await Promise.race([connected, new Promise<void>((r) => (waitTimer = setTimeout(r, waitMs)))]);
    clearTimeout(waitTimer);
    if (!session.connected) this.log.warn({ url: this.brokerUrlValue }, 'broker not reachable yet; going on and retrying');

    // Rollouts resume after the link is up, so what they decide can be published at once.
    await rollouts.start();
    await rounds.start();

    this.timer = setInterval(() => {
      if (session.connected) this.track(desired.publishPending());
    }, cfg.publishPendingIntervalSec * 1000);
    this.timer.unref();
    const retention = cfg.telemetry;
    const prune = (): void => {
      try {
        const n = store.telemetry.prune(this.now() - retention.retentionDays * 86_400_000, retention.maxRecordsPerDevice);
        if (n > 0) this.log.info({ records: n }, 'telemetry past retention removed');
      } catch (err) {
        this.log.error({ err }, 'telemetry retention failed');
      }
    };
    prune();
    this.pruneTimer = setInterval(prune, retention.pruneIntervalSec * 1000);
    this.pruneTimer.unref();
    this.log.info({ brokerUrl: this.brokerUrlValue, artifactsUrl: this.artifactsUrlValue, fleetKey: keys.current.keyId, dataDir: cfg.dataDir }, 'fleet server started');
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.pruneTimer) clearInterval(this.pruneTimer);
    this.timer = this.pruneTimer = null;
    if (!(await settleWithin(this.inflight, 5000))) this.log.warn({ tasks: this.inflight.size }, 'stopping with handlers still waiting on the broker');
    const steps: [string, () => Promise<void> | void][] = [
      ['rounds', async () => this.roundService?.stop()],
      ['rollouts', async () => this.rolloutService?.stop()],
      ['link', async () => this.session?.stop()],
      ['artifacts', async () => this.artifacts?.stop()],
      ['broker', async () => this.broker?.stop()],
      ['store', () => this.store?.close()],
    ];
    for (const [name, step] of steps) {
      try {
        await step();
      } catch (err) {
        this.log.error({ err, component: name }, 'error while stopping');
      }
    }
    this.session = null;
    this.rolloutService = null;
    this.artifacts = null;
    this.broker = null;
    this.store = null;
  }

  private async publish(topic: string, payload: Buffer, opts: { qos: 0 | 1; retain: boolean }): Promise<void> {
    if (!this.session) throw new Error('fleet server not started');
    await this.session.publish(topic, payload, opts);
  }

  /** Keeps a handler's promise for an orderly stop and turns its failure into a log line, never an unhandled rejection. */
  private track(p: Promise<unknown>): void {
    const tracked = p.catch((err: unknown) => this.log.error({ err }, 'message handler failed'));
    this.inflight.add(tracked);
    void tracked.finally(() => this.inflight.delete(tracked));
  }

  private async writeBrokerFiles(): Promise<void> {
    const dir = this.config.broker.mosquittoConfigDir;
    if (!dir || !this.store) return;
    writeMosquitto(this.store, dir, 1883, { conf: false });
    const cmd = this.config.broker.mosquittoReloadCommand;
    if (cmd) {
      try {
        await execAsync(cmd, { timeout: 15_000 });
      } catch (err) {
        this.log.error({ err, cmd }, 'broker reload command failed');
      }
    }
  }
}
