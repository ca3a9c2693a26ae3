import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { open } from 'node:fs/promises';
import jsonpatch from 'fast-json-patch';
import { pipeline } from 'node:stream/promises';
import { EdgefleetError, isEdgefleetError, roleAllows, type ErrorCode } from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { FleetStore } from '../store/types.js';
import type { ArtifactStore } from './blobs.js';
import type { DeltaService } from './deltas.js';
import { HttpAuthenticator, type HttpIdentity } from './http-auth.js';
import { noneMatch, parseRange, parseRoute } from './http-parse.js';
import type { Registry } from './registry.js';

export interface ArtifactServerOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  maxFileBytes: number;
  authCacheSec: number;
}

export interface ArtifactServerDeps {
  store: FleetStore;
  registry: Registry;
  blobs: ArtifactStore;
  /** Null when delta updates are off: every offer is then `full`. */
  deltas: DeltaService | null;
  log: Logger;
  now?: () => number;
}

/** A socket with no traffic for this long is dropped (a stalled download or upload). */
const IDLE_MS = 120_000;

/**
 * The artifact server: model files and signed manifests over HTTP, for devices (download, with
 * Range to resume and ETag to revalidate) and operators (upload).
 *
 *   GET|HEAD /v1/artifacts/{sha256}                 a file; Range (one range), If-Range, If-None-Match
 *   PUT      /v1/artifacts/{sha256}                 upload (role operator); hashed while streaming
 *   GET|HEAD /v1/models/{name}/{version}/manifest   the SignedManifest, canonical JSON; with
 *            ?base={version} an RFC 6902 patch from that version's manifest when it is smaller
 *   GET      /v1/deltas/{target}?base={sha256}       how best to get an artifact: a DeltaOffer
 *   GET|HEAD /v1/deltas/{target}/{patch sha256}      an offered patch or image; Range, ETag
 *
 * Everyone authenticates with HTTP Basic (RFC 7617) and the credential they use on the broker.
 * Devices get only what a version that is not quarantined names (404 unknown, 410 quarantined);
 * operators may read anything stored, which lets the CLI skip uploading what is already there.
 * Errors are JSON `{error: {code, message}}` with the catalog's codes.
 */
export class ArtifactServer {
  private server: Server | null = null;
  private readonly auth: HttpAuthenticator;
  private readonly now: () => number;

  constructor(
    private readonly opts: ArtifactServerOptions,
    private readonly deps: ArtifactServerDeps,
  ) {
    this.now = deps.now ?? Date.now;
    this.auth = new HttpAuthenticator(deps.store, opts.authCacheSec * 1000, this.now);
  }

  get port(): number {
    return (this.server?.address() as AddressInfo | null)?.port ?? 0;
  }

  async start(): Promise<void> {
    // No overall request deadline: a 1 GiB upload over a field link takes what it takes; idle sockets are cut instead.
    const server = createServer({ requestTimeout: 0, headersTimeout: 30_000, keepAliveTimeout: 5_000 }, (req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        this.deps.log.error({ err, url: req.url?.slice(0, 200) }, 'artifact request failed');
        if (!res.headersSent) this.fail(req, res, 500, 'EF_INTERNAL', 'internal error');
        else res.destroy();
      });
    });
    server.setTimeout(IDLE_MS);
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        reject(
          err.code === 'EADDRINUSE'
            ? new EdgefleetError('EF_PORT_IN_USE', `artifact server port ${this.opts.port} on ${this.opts.host} is taken`, { cause: err })
            : err,
        );
      });
      server.listen(this.opts.port, this.opts.host, () => resolve());
    });
    server.on('error', (err) => this.deps.log.error({ err }, 'artifact server error'));
    this.server = server;
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = null;
    if (!server) return;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeAllConnections();
    await closed;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const method = req.method ?? '';
    const who = this.auth.identify(req.headers.authorization);
    if (!who) {
      res.setHeader('www-authenticate', 'Basic realm="edgefleet", charset="UTF-8"');
      return this.fail(req, res, 401, 'EF_FORBIDDEN', 'a device or operator credential is required (HTTP Basic)');
    }
    const route = parseRoute(req.url ?? '');
    if (!route) return this.fail(req, res, 404, 'EF_BAD_PARAMS', 'no such resource');
    const reads = method === 'GET' || method === 'HEAD';
    if (route.kind === 'artifact') {
      if (reads) return this.getArtifact(req, res, who, route.sha256);
      if (method === 'PUT') return this.putArtifact(req, res, who, route.sha256);
      res.setHeader('allow', 'GET, HEAD, PUT');
    } else if (route.kind === 'manifest') {
      if (reads) return this.getManifest(req, res, who, route.name, route.version, route.base);
      res.setHeader('allow', 'GET, HEAD');
    } else if (route.kind === 'delta-offer') {
      if (method === 'GET') return this.getOffer(req, res, who, route.target, route.base);
      res.setHeader('allow', 'GET');
    } else {
      if (reads) return this.getDelta(req, res, who, route.target, route.patch);
      res.setHeader('allow', 'GET, HEAD');
    }
    return this.fail(req, res, 405, 'EF_BAD_PARAMS', `${method.slice(0, 16)} is not allowed here`);
  }

  /** Whether a device may have this artifact: 404 unknown, 410 quarantined. Operators may read anything stored. */
  private refuseDevice(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, sha256: string): boolean {
    if (who.kind !== 'device') return false;
    const s = this.deps.registry.servability(sha256);
    if (s === 'unknown') this.fail(req, res, 404, 'EF_ARTIFACT_REFUSED', 'no published model version names this artifact');
    else if (s === 'quarantined') this.fail(req, res, 410, 'EF_ARTIFACT_REFUSED', 'every model version naming this artifact is quarantined');
    else return false;
    return true;
  }

  private async getArtifact(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, sha256: string): Promise<void> {
    if (this.refuseDevice(req, res, who, sha256)) return;
    return this.sendFile(req, res, this.deps.blobs.pathOf(sha256), sha256, () => {
      if (who.kind === 'device') this.deps.log.error({ sha256 }, 'a published artifact is missing from the store');
    });
  }

  private async getOffer(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, target: string, base: string | null): Promise<void> {
    if (this.refuseDevice(req, res, who, target)) return;
    const full = this.deps.blobs.sizeOf(target);
    if (full === null) return this.fail(req, res, 404, 'EF_ARTIFACT_MISSING', 'artifact not stored');
    // A base no model version names is not diffed against: the fleet patches only between its own artifacts.
    const b = base !== null && this.deps.registry.servability(base) !== 'unknown' ? base : null;
    const offer = this.deps.deltas
      ? await this.deps.deltas.offer(target, b)
      : { kind: 'full', target: { sha256: target, size: full }, base: null, delta: null, sizes: { full, image: null, patch: null } };
    const body = JSON.stringify(offer);
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), 'cache-control': 'private, no-cache' });
    res.end(body);
  }

  private async getDelta(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, target: string, patch: string): Promise<void> {
    if (this.refuseDevice(req, res, who, target)) return;
    const path = this.deps.deltas?.fileOf(target, patch) ?? null;
    if (path === null) return this.fail(req, res, 404, 'EF_ARTIFACT_MISSING', 'no such patch (it may have been evicted: ask for an offer again)');
    return this.sendFile(req, res, path, patch, () => undefined);
  }

  /** A file by its sha256 (the ETag), with one Range, If-Range and If-None-Match. */
  private async sendFile(req: IncomingMessage, res: ServerResponse, path: string, sha256: string, missing: () => void): Promise<void> {
    let fh;
    try {
      fh = await open(path, 'r');
    } catch {
      missing();
      return this.fail(req, res, 404, 'EF_ARTIFACT_MISSING', 'artifact not stored');
    }
    try {
      const size = (await fh.stat()).size;
      const etag = `"${sha256}"`;
      res.setHeader('etag', etag);
      res.setHeader('accept-ranges', 'bytes');
      // Immutable bytes, but whether they may be served can change (quarantine): revalidate every time.
      res.setHeader('cache-control', 'private, no-cache');
      if (noneMatch(req.headers['if-none-match'], etag)) {
        res.writeHead(304).end();
        return;
      }
      const ifRange = req.headers['if-range'];
      // RFC 9110 §13.1.5: a validator that is not our (strong) ETag means "send it all".
      const range = ifRange !== undefined && String(ifRange).trim() !== etag ? ({ kind: 'none' } as const) : parseRange(req.headers.range, size);
      if (range.kind === 'unsatisfiable') {
        res.setHeader('content-range', `bytes */${size}`);
        return this.fail(req, res, 416, 'EF_BAD_PARAMS', `range not satisfiable for ${size} bytes`);
      }
      const start = range.kind === 'range' ? range.start : 0;
      const end = range.kind === 'range' ? range.end : size - 1;
      res.setHeader('content-type', 'application/octet-stream');
      res.setHeader('content-length', String(Math.max(0, end - start + 1)));
      if (range.kind === 'range') res.setHeader('content-range', `bytes ${start}-${end}/${size}`);
      res.writeHead(range.kind === 'range' ? 206 : 200);
      if (req.method === 'HEAD' || size === 0) {
        res.end();
        return;
      }
      const stream = fh.createReadStream({ start, end, autoClose: false });
      await pipeline(stream, res).catch((err: unknown) => {
        // The client went away mid-download: nothing to answer, and it may resume with Range.
        this.deps.log.debug({ err: (err as Error).message, sha256 }, 'download cut short');
      });
    } finally {
      await fh.close();
    }
  }

  private getManifest(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, name: string, version: number, base: number | null): void {
    const row = this.deps.store.models.get(name, version);
    if (!row) return this.fail(req, res, 404, 'EF_UNKNOWN_MODEL', `no ${name}@${version}`);
    if (who.kind === 'device' && row.status === 'quarantined') return this.fail(req, res, 410, 'EF_ARTIFACT_REFUSED', `${name}@${version} is quarantined`);
    let body = Buffer.from(row.manifestJson, 'utf8');
    let etag = `"${row.manifestSha256}"`;
    let type = 'application/json';
    const from = base !== null && base !== version ? this.deps.store.models.get(name, base) : null;
    if (from) {
      // The device holds `base`: the differences alone are usually a fraction of the manifest.
      const patch = Buffer.from(JSON.stringify(jsonpatch.compare(JSON.parse(from.manifestJson) as object, JSON.parse(row.manifestJson) as object)), 'utf8');
      if (patch.length < body.length) {
        body = patch;
        etag = `"${row.manifestSha256}-from-${from.manifestSha256}"`;
        type = 'application/json-patch+json';
      }
    }
    res.setHeader('etag', etag);
    res.setHeader('cache-control', 'private, no-cache');
    if (noneMatch(req.headers['if-none-match'], etag)) {
      res.writeHead(304).end();
      return;
    }
    res.writeHead(200, { 'content-type': type, 'content-length': String(body.length) });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  private async putArtifact(req: IncomingMessage, res: ServerResponse, who: HttpIdentity, sha256: string): Promise<void> {
    if (who.kind !== 'operator' || !roleAllows(who.role, 'operator')) {
      return this.fail(req, res, 403, 'EF_FORBIDDEN', 'uploading needs an operator credential of role operator or admin');
    }
    const max = this.opts.maxFileBytes;
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (declared > max) return this.fail(req, res, 413, 'EF_ARTIFACT_TOO_LARGE', `artifact of ${declared} bytes exceeds ${max}`);
    try {
      const r = await this.deps.blobs.ingest(req, sha256, max);
      this.audit(who.name, sha256, true, { size: r.size, stored: r.stored });
      res.writeHead(r.stored ? 201 : 200, { 'content-type': 'application/json' }).end(JSON.stringify(r));
    } catch (e) {
      if (!isEdgefleetError(e)) {
        if (req.destroyed) return; // the client went away; the partial upload is already gone
        throw e;
      }
      this.audit(who.name, sha256, false, { code: e.code });
      const status = e.code === 'EF_ARTIFACT_TOO_LARGE' ? 413 : e.code === 'EF_ARTIFACT_MISMATCH' ? 400 : 500;
      return this.fail(req, res, status, e.code, e.message);
    }
  }

  private audit(actor: string, sha256: string, ok: boolean, detail: unknown): void {
    try {
      this.deps.store.audit.append({ ts: this.now(), actor, action: 'artifact.upload', target: sha256, ok, detail });
    } catch (err) {
      this.deps.log.error({ err }, 'audit write failed');
    }
  }

  /**
   * A JSON error. When the request body was not read (a refused upload), the connection is closed
   * after the answer rather than reading, and throwing away, what may be a gigabyte.
   */
  private fail(req: IncomingMessage, res: ServerResponse, status: number, code: ErrorCode, message: string): void {
    const body = JSON.stringify({ error: { code, message } });
    const hasBody = req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
    const unread = hasBody && !req.complete;
    if (unread) res.setHeader('connection', 'close');
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) });
    res.end(body, () => {
      if (unread) req.socket.destroySoon();
    });
  }
}
