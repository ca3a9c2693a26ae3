import mqtt, { type MqttClient } from 'mqtt';
import { EdgefleetError } from '../../proto/index.js';
import { disableNagle } from '../../common/mqtt-session.js';

/**
 * The MQTT connection of one simulated device: mqtt.js for the protocol with its own reconnect
 * turned off, and the timing here, because the device decides when it is away (offline, crashed,
 * flapping) and a lost link comes back after a jittered pause, as an agent's does.
 */

/** Topics of the bare echo the benchmark floor measures, for one device. */
export interface RawEcho {
  request: string;
  reply: string;
  /** Only the echo: no will, no status, no desired state, no reports. */
  only: boolean;
}

export interface LinkMessage {
  topic: string;
  payload: Buffer;
}

export interface SimLinkOptions {
  clientId: string;
  url: string;
  username: string;
  password?: string | undefined;
  protocolVersion: 4 | 5;
  keepaliveSec: number;
  reconnectMs: readonly [number, number];
  random: () => number;
  /** Subscribed at QoS 1 on every connect. */
  filters: readonly string[];
  /** The retained QoS 1 will of one connection, built with its session number; null: none. */
  will: (session: number) => LinkMessage | null;
  raw: RawEcho | null;
}

export interface SimLinkHooks {
  /** Whether the device means to be connected now: online, running, not stopped. */
  wanted(): boolean;
  /** Connected and subscribed. */
  up(session: number): void;
  message(topic: string, payload: Buffer): void;
  /** The connection went away without the device ending it. */
  lost(): void;
  refused(message: string): void;
}

/** MQTT 3.1.1 CONNACK return codes 4 and 5, MQTT 5 reason codes 0x86 and 0x87: credentials refused. */
const REFUSED = new Set<unknown>([4, 5, 0x86, 0x87]);
const RAW_REPLY = Buffer.from('1');

export class SimLink {
  /**
   * Raised on every connect. The agent persists its counter; a simulated device has nothing to
   * persist, so it counts on from the clock in milliseconds, which keeps the sessions of a second
   * run above those of the first (the fleet ignores a status from a session older than the last).
   */
  session = Date.now();
  private client: MqttClient | null = null;
  private connecting: Promise<void> | null = null;
  private retryTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly opts: SimLinkOptions,
    private readonly hooks: SimLinkHooks,
  ) {}

  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /**
   * Connects, trying again after a pause when an attempt fails; resolves once connected and
   * subscribed, or when the device no longer wants the link; rejects when the broker refuses.
   */
  connect(): Promise<void> {
    this.connecting ??= this.connectLoop().finally(() => (this.connecting = null));
    return this.connecting;
  }

  /** Connects after `ms` (default: the reconnect pause), unless the device no longer wants the link by then. */
  retryLater(ms = this.pause()): void {
    this.cancelRetry();
    if (!this.hooks.wanted()) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.connect().catch(() => undefined); // a refusal went to hooks.refused
    }, ms);
    this.retryTimer.unref();
  }

  cancelRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  /** QoS 1, when connected; a simulated device keeps no outbox. */
  publish(topic: string, payload: Buffer, retain = false): void {
    if (this.client?.connected) this.client.publish(topic, payload, { qos: 1, retain }, () => undefined);
  }

  /** Ends the connection abruptly, without DISCONNECT, so the broker publishes the will. False: there was none. */
  drop(): boolean {
    const client = this.client;
    this.client = null;
    client?.end(true);
    return client !== null;
  }

  /** A clean end: `lastWords` (retained), then DISCONNECT, so the broker discards the will (MQTT-3.1.2-10). */
  async close(lastWords: LinkMessage | null): Promise<boolean> {
    this.cancelRetry();
    const client = this.client;
    this.client = null;
    if (!client) return false;
    if (!client.connected) {
      client.end(true);
      return false;
    }
    if (lastWords) client.publish(lastWords.topic, lastWords.payload, { qos: 1, retain: true }, () => undefined);
    await client.endAsync();
    return true;
  }

  private async connectLoop(): Promise<void> {
    while (this.hooks.wanted() && !this.connected) {
      try {
        await this.open();
      } catch (err) {
        if (err instanceof EdgefleetError && err.code === 'EF_BROKER_REFUSED') {
          this.hooks.refused(err.message);
          throw err;
        }
        await new Promise((r) => setTimeout(r, this.pause()).unref());
      }
    }
  }

  /** One attempt, with the will of its own session (MQTT fixes the will per connection). */
  private open(): Promise<void> {
    const { opts, hooks } = this;
    const session = ++this.session;
    const will = opts.will(session);
    const client = mqtt.connect(opts.url, {
      clientId: opts.clientId,
      username: opts.username,
      password: opts.password,
      protocolVersion: opts.protocolVersion,
      // Retained desired state brings a device up to date on every connect; a persistent session per
      // simulated device would only leave thousands of sessions behind on a shared broker.
      clean: true,
      keepalive: opts.keepaliveSec,
      reconnectPeriod: 0,
      connectTimeout: 30_000,
      resubscribe: false,
      will: will ? { ...will, qos: 1, retain: true } : undefined,
    });
    this.client = client;
    client.on('message', (topic, payload) => {
      if (opts.raw && topic === opts.raw.request) {
        // The benchmark floor: a reply and nothing else.
        client.publish(opts.raw.reply, RAW_REPLY, { qos: 1 }, () => undefined);
      } else if (client === this.client) hooks.message(topic, payload);
    });
    return new Promise<void>((resolve, reject) => {
      let up = false;
      const fail = (err: Error): void => {
        if (this.client === client) this.client = null;
        client.end(true);
        reject(err);
      };
      client.on('error', (err) => {
        if (up) return; // 'close' follows
        const code = (err as { code?: unknown }).code;
        fail(REFUSED.has(code) ? new EdgefleetError('EF_BROKER_REFUSED', `the broker refused ${opts.username}: ${err.message}`) : err);
      });
      client.on('close', () => {
        if (!up) fail(new EdgefleetError('EF_BROKER_UNREACHABLE', `connection to ${opts.url} closed before CONNACK`));
        else if (this.client === client) {
          this.client = null;
          hooks.lost();
        }
      });
      client.once('connect', () => {
        up = true;
        disableNagle(client);
        const filters = Object.fromEntries(opts.filters.map((f) => [f, { qos: 1 as const }]));
        client.subscribeAsync(filters).then((granted) => {
          if (granted.some((g) => g.qos === 128)) throw new EdgefleetError('EF_BROKER_REFUSED', `the broker does not let ${opts.username} subscribe to ${opts.filters.join(', ')}`);
          if (this.client !== client || !hooks.wanted()) throw new Error('ended while connecting');
          hooks.up(session);
          resolve();
        }).catch(fail);
      });
    });
  }

  private pause(): number {
    const [min, max] = this.opts.reconnectMs;
    return min + (max - min) * this.opts.random();
  }
}
