import { EventEmitter } from 'node:events';
import mqtt, { type IClientOptions, type IClientPublishOptions, type MqttClient } from 'mqtt';
import type { Logger } from './log.js';
import { Backoff } from './backoff.js';

export interface WillSpec {
  topic: string;
  payload: Buffer;
  qos: 0 | 1;
  retain: boolean;
}

export interface MqttSessionOptions {
  url: string;
  clientId: string;
  username: string;
  password: string;
  /** 4 = MQTT 3.1.1, 5 = MQTT 5. The protocol needs nothing beyond 3.1.1. */
  protocolVersion: 4 | 5;
  keepaliveSec: number;
  /** false: a persistent session, so QoS 1 messages queued while offline are delivered on return. */
  clean: boolean;
  reconnectBaseMs: number;
  reconnectCapMs: number;
  connectTimeoutMs?: number;
  /** The Last Will, asked for before every connect (MQTT fixes the will per connection). */
  will?: (() => WillSpec) | undefined;
  /** The first `subscribe` filters, renewed on every connect. */
  subscriptions: { filter: string; qos: 0 | 1 }[];
}

export interface SessionEvents {
  connect: [info: { sessionPresent: boolean }];
  message: [topic: string, payload: Buffer, retained: boolean];
  disconnect: [reason: string];
  refused: [reason: string];
}

/**
 * One MQTT connection that stays up: mqtt.js for the protocol, our own reconnect loop for the
 * timing (exponential backoff with full jitter, reset after a connection has held for a while),
 * because mqtt.js only retries at a fixed period, and a fleet that reconnects in lockstep hurts
 * its broker.
 */
/**
 * Turns Nagle's algorithm off for the client's current connection. mqtt.js writes a PUBLISH in
 * several pieces; with Nagle on, the second piece waits for the peer's delayed ACK, and every
 * request/reply round trip costs ~40 ms twice. Call on every 'connect': a reconnect is a new socket.
 */
export function disableNagle(client: MqttClient): void {
  const stream = (client as unknown as { stream?: { setNoDelay?: (on: boolean) => void } }).stream;
  stream?.setNoDelay?.(true);
}

/** Longest a graceful disconnect waits for outstanding acknowledgements. */
const GRACEFUL_END_MS = 3000;

export class MqttSession extends EventEmitter<SessionEvents> {
  private client: MqttClient | null = null;
  private readonly backoff: Backoff;
  private retryTimer: NodeJS.Timeout | null = null;
  private stableTimer: NodeJS.Timeout | null = null;
  private stopped = false;

  constructor(
    private readonly opts: MqttSessionOptions,
    private readonly log: Logger,
  ) {
    super();
    this.backoff = new Backoff(opts.reconnectBaseMs, opts.reconnectCapMs);
  }

  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  start(): void {
    this.stopped = false;
    this.connect();
  }

  private connect(): void {
    const options: IClientOptions = {
      clientId: this.opts.clientId,
      username: this.opts.username,
      password: this.opts.password,
      protocolVersion: this.opts.protocolVersion,
      keepalive: this.opts.keepaliveSec,
      clean: this.opts.clean,
      reconnectPeriod: 0,
      connectTimeout: this.opts.connectTimeoutMs ?? 10_000,
      resubscribe: false,
      ...(this.opts.protocolVersion === 5 && !this.opts.clean ? { properties: { sessionExpiryInterval: 0xffffffff } } : {}),
      ...(this.opts.will ? { will: this.opts.will() } : {}),
    };
    const client = mqtt.connect(this.opts.url, options);
    this.client = client;
    client.on('connect', (connack) => {
      disableNagle(client);
      this.log.info({ url: this.opts.url, sessionPresent: connack.sessionPresent }, 'connected to broker');
      if (this.stableTimer) clearTimeout(this.stableTimer);
      // Only a connection that holds for a minute resets the backoff; a flapping link keeps backing off.
      this.stableTimer = setTimeout(() => this.backoff.reset(), 60_000);
      this.stableTimer.unref();
      const subs = Object.fromEntries(this.opts.subscriptions.map((s) => [s.filter, { qos: s.qos }]));
      if (this.opts.subscriptions.length === 0) {
        this.emit('connect', { sessionPresent: connack.sessionPresent });
        return;
      }
      client.subscribe(subs, (err, granted) => {
        if (err) {
          this.log.error({ err }, 'subscribe failed');
          return;
        }
        const refused = (granted ?? []).filter((g) => g.qos === 128);
        if (refused.length > 0) this.log.error({ refused: refused.map((g) => g.topic) }, 'broker refused subscriptions');
        this.emit('connect', { sessionPresent: connack.sessionPresent });
      });
    });
    client.on('message', (topic, payload, packet) => this.emit('message', topic, payload, packet.retain));
    client.on('error', (err) => {
      const code = (err as { code?: number }).code;
      // CONNACK return codes 4/5 (3.1.1) and 0x86/0x87/0x85 (5): credentials or identity refused.
      if (code === 4 || code === 5 || code === 2 || code === 0x86 || code === 0x87 || code === 0x85) {
        this.emit('refused', err.message);
      }
      this.log.debug({ err: err.message, code }, 'mqtt client error');
    });
    client.on('close', () => {
      if (this.stableTimer) clearTimeout(this.stableTimer);
      this.emit('disconnect', 'closed');
      if (!this.stopped) this.scheduleReconnect();
    });
  }

  private scheduleReconnect(): void {
    if (this.retryTimer) return;
    const delay = this.backoff.next();
    this.log.info({ delayMs: delay, attempt: this.backoff.attempts }, 'reconnecting to broker');
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      const client = this.client;
      if (this.stopped || !client) return;
      // The same client object reconnects, so QoS 1 messages in flight are resent from its store.
      if (this.opts.will) client.options.will = this.opts.will();
      client.reconnect();
    }, delay);
  }

  async publish(topic: string, payload: Buffer | string, opts: IClientPublishOptions = { qos: 1 }): Promise<void> {
    const client = this.client;
    if (!client) throw new Error('session not started');
    await client.publishAsync(topic, payload, opts);
  }

  async subscribe(filter: string, qos: 0 | 1 = 1): Promise<void> {
    const client = this.client;
    if (!client) throw new Error('session not started');
    await client.subscribeAsync(filter, { qos });
  }

  /** Closes the connection; with `graceful`, waits for in-flight messages first. */
  async stop(graceful = true): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.stableTimer) clearTimeout(this.stableTimer);
    this.retryTimer = null;
    const client = this.client;
    this.client = null;
    if (!client) return;
    if (!graceful || !client.connected) {
      await client.endAsync(true);
      return;
    }
    // A graceful end waits for every PUBACK; one the broker will never send must not hold the stop.
    let timer: NodeJS.Timeout | undefined;
    const gaveUp = await Promise.race([
      client.endAsync(false).then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), GRACEFUL_END_MS))),
    ]);
    clearTimeout(timer);
    if (gaveUp) await client.endAsync(true);
  }
}
