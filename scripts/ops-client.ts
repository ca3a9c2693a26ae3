import { randomBytes } from 'node:crypto';
import mqtt, { type MqttClient } from 'mqtt';
import { disableNagle } from '../common/mqtt-session.js';
import {
  EdgefleetError,
  MAX_PAYLOAD_BYTES,
  METHODS,
  OpsReply,
  decodeJson,
  encodeJson,
  summarizeIssues,
  topics,
  type ErrorCode,
  type Method,
  type MethodParams,
  type MethodResult,
} from '../proto/index.js';

export interface OpsClientOptions {
  url: string;
  username: string;
  password: string;
  timeoutMs?: number;
  protocolVersion?: 4 | 5;
}

/**
 * The operator channel from the caller's side: one MQTT connection, requests with correlation ids,
 * replies matched by id. Used by the `edgefleet` CLI and by tests.
 */
export class OpsClient {
  private closed = false;
  private readonly pending = new Map<string, { resolve: (r: OpsReply) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();

  private constructor(
    private readonly client: MqttClient,
    private readonly username: string,
    private readonly timeoutMs: number,
  ) {
    client.on('message', (_topic, payload) => {
      const decoded = decodeJson(OpsReply, payload, MAX_PAYLOAD_BYTES.opsReply);
      // A reply we cannot match (malformed, or to a request that could not be read) settles nothing.
      if (!decoded.ok || decoded.value.id === null) return;
      const entry = this.pending.get(decoded.value.id);
      if (!entry) return;
      this.pending.delete(decoded.value.id);
      clearTimeout(entry.timer);
      entry.resolve(decoded.value);
    });
  }

  static async connect(opts: OpsClientOptions): Promise<OpsClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const client = mqtt.connect(opts.url, {
      clientId: `${opts.username}~${randomBytes(4).toString('hex')}`,
      username: opts.username,
      password: opts.password,
      protocolVersion: opts.protocolVersion ?? 4,
      clean: true,
      reconnectPeriod: 0,
      connectTimeout: timeoutMs,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => {
        disableNagle(client);
        resolve();
      });
      client.once('error', (err) => {
        const code = (err as { code?: number | string }).code;
        if (code === 4 || code === 5 || code === 2 || code === 0x86 || code === 0x87 || code === 0x85) {
          reject(new EdgefleetError('EF_BROKER_REFUSED', `the broker refused ${opts.username}: ${err.message}`));
        } else reject(new EdgefleetError('EF_BROKER_UNREACHABLE', `cannot reach ${opts.url}: ${err.message}`));
      });
      client.once('close', () => reject(new EdgefleetError('EF_BROKER_UNREACHABLE', `cannot reach ${opts.url}`)));
    }).catch((e: unknown) => {
      client.end(true);
      throw e;
    });
    const granted = await client.subscribeAsync(topics.opsReply(opts.username), { qos: 1 });
    if (granted.some((g) => g.qos === 128)) {
      client.end(true);
      throw new EdgefleetError('EF_FORBIDDEN', `the broker does not let ${opts.username} read its replies`);
    }
    return new OpsClient(client, opts.username, timeoutMs);
  }

  /** Sends a raw request and returns the raw reply (tests use it to send what the CLI would not). */
  async request(method: string, params: unknown): Promise<OpsReply> {
    const id = randomBytes(8).toString('hex');
    const reply = new Promise<OpsReply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new EdgefleetError('EF_TIMEOUT', `no reply to ${method} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
    });
    await this.client.publishAsync(topics.opsRequest(this.username), encodeJson({ id, method, params }), { qos: 1 });
    return reply;
  }

  /** Calls a method; resolves with its validated result or throws the fleet's coded error. */
  async call<M extends Method>(method: M, params: MethodParams<M>): Promise<MethodResult<M>> {
    const reply = await this.request(method, params);
    if (!reply.ok) throw new EdgefleetError(reply.error.code as ErrorCode, reply.error.message, { details: reply.error.details });
    const parsed = METHODS[method].result.safeParse(reply.data);
    if (!parsed.success) throw new EdgefleetError('EF_BAD_PAYLOAD', `malformed reply to ${method}: ${summarizeIssues(parsed.error.issues)}`);
    return parsed.data as MethodResult<M>;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const { timer, reject } of this.pending.values()) {
      clearTimeout(timer);
      reject(new Error('client closed'));
    }
    this.pending.clear();
    // force: a link that is already down has nothing to flush, and must not keep the caller waiting.
    await this.client.endAsync(!this.client.connected);
  }
}
