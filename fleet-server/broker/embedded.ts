import { createServer, type Server } from 'node:net';
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { Aedes, type AuthenticateError, type Client, type PublishPacket, type Subscription } from 'aedes';
import { Level } from 'level';
import { installRetainedReads, type RetainedReads } from './retained.js';
import { EdgefleetError } from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { RejectCounter } from '../../common/reject-counter.js';
import { verifySecret } from '../auth/credentials.js';
import type { FleetStore, Principal } from '../store/types.js';
import { grantsFor, mayPublish, maySubscribe, type Grants } from './acl.js';

// aedes 1.x wants an async persistence; aedes-persistence-level ships one beside its callback wrapper.
const AsyncLevelPersistence = createRequire(import.meta.url)('aedes-persistence-level/asyncPersistence.js') as new (
  db: Level<string, Buffer>,
) => { destroy(): Promise<void> };

export interface EmbeddedBrokerOptions {
  host: string;
  port: number;
  /** Directory for retained messages, sessions and queued QoS 1 messages (LevelDB). */
  persistenceDir: string;
  /** Largest PUBLISH payload from a device or operator, in bytes. */
  maxPayloadBytes: number;
  /** Largest federated update (`up/update`): a model's worth of weights, far above any control message. */
  maxUpdateBytes: number;
}

interface Identity {
  principal: Principal;
  grants: Grants;
}

/**
 * aedes drops, per subscriber, any message whose broker sequence number is not above the highest
 * it has delivered to that subscriber (its `dedupe`, meant for packets seen twice across a
 * cluster). Numbers are taken when a PUBLISH arrives, but a retained message first waits for
 * LevelDB to store it, so a later message regularly overtakes it and the retained one (a device's
 * `online` status, say) is silently lost. A single broker has no cross-broker duplicates to drop;
 * the cost of switching it off is the ordinary QoS 1 redelivery every handler already tolerates.
 */
function disableReorderDedupe(client: Client): void {
  (client as unknown as { duplicates: Record<string, number> }).duplicates = new Proxy(Object.create(null) as Record<string, number>, {
    get: () => 0,
    set: () => true,
  });
}

const AUTH_ERRORS = { BAD_CREDENTIALS: 4, NOT_AUTHORIZED: 5, IDENTIFIER_REJECTED: 2 } as const;

function authError(code: number, message: string): AuthenticateError {
  const err = new Error(message) as AuthenticateError;
  err.returnCode = code;
  return err;
}

/**
 * The embedded MQTT broker (aedes): every client authenticates with a credential issued by the
 * fleet, and every PUBLISH and SUBSCRIBE is checked against the identity's grants (./acl.ts).
 * Retained messages, persistent sessions and queued QoS 1 messages live in LevelDB under the data
 * directory, so they survive a restart of the fleet server.
 */
export class EmbeddedBroker {
  private aedes: Aedes | null = null;
  private server: Server | null = null;
  private persistence: { destroy(): Promise<void> } | null = null;
  private retained: RetainedReads | null = null;
  private readonly identities = new WeakMap<Client, Identity>();
  private boundPort = 0;

  constructor(
    private readonly opts: EmbeddedBrokerOptions,
    private readonly store: FleetStore,
    private readonly log: Logger,
    private readonly rejects: RejectCounter,
  ) {}

  get port(): number {
    return this.boundPort;
  }

  async start(): Promise<void> {
    mkdirSync(this.opts.persistenceDir, { recursive: true });
    const db = new Level<string, Buffer>(this.opts.persistenceDir, { valueEncoding: 'buffer' });
    await db.open();
    this.persistence = new AsyncLevelPersistence(db);
    this.retained = installRetainedReads(this.persistence as unknown as Parameters<typeof installRetainedReads>[0], db, this.log);
    const aedes = await Aedes.createBroker({
      persistence: this.persistence,
      preConnect: (client, _packet, done) => {
        disableReorderDedupe(client);
        done(null, true);
      },
      authenticate: (client, username, password, done) => this.authenticate(client, username, password, done),
      authorizePublish: (client, packet, done) => this.authorizePublish(client, packet, done),
      authorizeSubscribe: (client, sub, done) => this.authorizeSubscribe(client, sub, done),
      // Keep the broker's heartbeat off the wire; nobody here listens to $SYS.
      heartbeatInterval: 3_600_000,
      // Publications matched in parallel. At the default (100) a burst from a thousand devices
      // (or a delivery that never calls back) fills every slot and the broker stops routing
      // anything, operator requests included, for good (moscajs/aedes#553, #666): seen here with
      // 1,000 simulated devices on a loaded machine. Memory per slot is one message.
      concurrency: 10_000,
    });
    this.aedes = aedes;
    aedes.on('clientError', (client, err) => this.log.debug({ clientId: client.id, err: err.message }, 'client error'));
    aedes.on('connectionError', (client, err) => this.log.debug({ clientId: client?.id, err: err.message }, 'connection error'));

    const server = createServer((socket) => {
      // aedes writes a packet in more than one piece; with Nagle's algorithm and delayed ACKs every
      // request/reply round trip would stall ~40 ms twice.
      socket.setNoDelay(true);
      aedes.handle(socket);
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException): void => {
        server.off('listening', onListening);
        if (err.code === 'EADDRINUSE') {
          reject(new EdgefleetError('EF_PORT_IN_USE', `MQTT port ${this.opts.host}:${this.opts.port} is already in use`, { cause: err }));
        } else reject(err);
      };
      const onListening = (): void => {
        server.off('error', onError);
        resolve();
      };
      server.once('error', onError);
      server.once('listening', onListening);
      server.listen(this.opts.port, this.opts.host);
    });
    const addr = server.address();
    this.boundPort = typeof addr === 'object' && addr ? addr.port : this.opts.port;
    this.log.info({ host: this.opts.host, port: this.boundPort }, 'embedded MQTT broker listening');
  }

  /** Drops the live connection of an identity (used when a device or operator is removed). */
  disconnect(name: string): void {
    const clients = (this.aedes as unknown as { clients?: Record<string, Client> } | null)?.clients ?? {};
    for (const client of Object.values(clients)) {
      if (this.identities.get(client)?.principal.name === name) client.close();
    }
  }

  async stop(): Promise<void> {
    const server = this.server;
    const aedes = this.aedes;
    this.server = null;
    this.aedes = null;
    // Stop accepting first, then close every client: server.close() only calls back once the last
    // connection is gone, and connected devices never leave on their own.
    const listenerClosed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    if (aedes) await new Promise<void>((resolve) => aedes.close(() => resolve()));
    await listenerClosed;
    // Reads of retained messages still running would fail on the closed database: end them first.
    await this.retained?.drain();
    this.retained = null;
    if (this.persistence) await this.persistence.destroy();
    this.persistence = null;
  }

  private authenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
    done: (err: AuthenticateError | null, ok: boolean | null) => void,
  ): void {
    const principal = username ? this.store.principals.get(username) : null;
    if (!principal || !password || !verifySecret(password, principal.secretHash)) {
      this.rejects.reject('EF_BROKER_REFUSED', username ?? '(anonymous)', { clientId: client.id });
      done(authError(AUTH_ERRORS.BAD_CREDENTIALS, 'bad user name or password'), false);
      return;
    }
    // A client id is bound to its identity, so nobody can take over another's session
    // (MQTT-3.1.4-2 would otherwise let them). Operators may run several CLIs at once: name~suffix.
    const idOk = client.id === principal.name || (principal.kind === 'operator' && client.id.startsWith(`${principal.name}~`));
    if (!idOk) {
      this.rejects.reject('EF_FORBIDDEN', principal.name, { clientId: client.id, reason: 'client id does not match identity' });
      done(authError(AUTH_ERRORS.IDENTIFIER_REJECTED, 'client id does not belong to this identity'), false);
      return;
    }
    this.identities.set(client, { principal, grants: grantsFor(principal.kind, principal.name) });
    done(null, true);
  }

  private authorizePublish(client: Client | null, packet: PublishPacket, done: (err?: Error | null) => void): void {
    // client is null for a will left by a previous run of the broker; judge it by its owner's grants,
    // so a will aimed at another identity's topics is never published.
    const id = client === null ? this.identityOf((packet as { clientId?: string }).clientId) : this.identities.get(client);
    if (!id || !mayPublish(id.grants, packet.topic)) {
      this.rejects.reject('EF_FORBIDDEN', id?.principal.name ?? client?.id ?? '(will)', { action: 'publish', topic: packet.topic });
      return done(new Error('publish not authorized'));
    }
    const size = typeof packet.payload === 'string' ? Buffer.byteLength(packet.payload) : packet.payload.length;
    const max = packet.topic.endsWith('/up/update') ? this.opts.maxUpdateBytes : this.opts.maxPayloadBytes;
    if (id.principal.kind !== 'fleet' && size > max) {
      this.rejects.reject('EF_PAYLOAD_TOO_LARGE', id.principal.name, { topic: packet.topic, size });
      return done(new Error('payload too large'));
    }
    done(null);
  }

  private identityOf(clientId: string | undefined): Identity | undefined {
    const principal = clientId === undefined ? null : this.store.principals.get(clientId);
    return principal ? { principal, grants: grantsFor(principal.kind, principal.name) } : undefined;
  }

  private authorizeSubscribe(client: Client, sub: Subscription, done: (err: Error | null, sub?: Subscription | null) => void): void {
    const id = this.identities.get(client);
    if (!id || !maySubscribe(id.grants, sub.topic)) {
      this.rejects.reject('EF_FORBIDDEN', id?.principal.name ?? client.id, { action: 'subscribe', topic: sub.topic });
      // A null subscription answers this filter with SUBACK 0x80 (failure) and keeps the connection.
      return done(null, null);
    }
    done(null, sub);
  }
}
