import { randomBytes } from 'node:crypto';
import { lstatSync, unlinkSync, chmodSync } from 'node:fs';
import { createConnection } from 'node:net';
import { createServer, IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Logger } from '../../common/log.js';
import { VERSION } from '../../common/version.js';
import { EdgefleetError, ID_PATTERN, isEdgefleetError, type ErrorCode } from '../../proto/index.js';
import type { ModelHost } from '../models/host.js';
import { checkWanted, encodeInferResponse, MAX_REQUEST_ID_CHARS, modelMetadata, parseInferRequest } from './kserve.js';

/**
 * The Open Inference Protocol (KServe v2) REST API on node:http, over TCP or a unix socket.
 * No framework: one route switch, the body parsed once, tensors written straight into the
 * response text. Per-request state lives on the request object (a subclass of IncomingMessage),
 * so the hot path allocates no closures. Never logs per request; only 500s are logged.
 */

export const DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024;
/** Local clients reuse connections for long; the Node default (5 s) makes a bursty client reconnect. */
const KEEP_ALIVE_MS = 30_000;
/** How long close() lets in-flight requests finish before it drops their connections. */
const CLOSE_GRACE_MS = 2_000;
const SOCKET_MODE = 0o660;

export interface InferenceServerOptions {
  /** TCP address; default 127.0.0.1. Ignored when socketPath is given. */
  host?: string;
  /** TCP port; 0 picks a free one. Default 8080. */
  port?: number;
  /** Listen on this unix socket instead of TCP; a stale socket file there is removed first. */
  socketPath?: string;
  /** Largest request body accepted; larger ones get 413. Default 16 MiB. */
  maxBodyBytes?: number;
  log: Logger;
}

export interface InferenceServer {
  /** `http://host:port` when listening on TCP. */
  url?: string;
  socketPath?: string;
  close(): Promise<void>;
}

/** Status per catalog code; anything not listed is a 500. */
const STATUS: Partial<Record<ErrorCode, number>> = {
  EF_INFER_INVALID: 400,
  EF_BAD_PAYLOAD: 400,
  EF_BAD_PARAMS: 400,
  EF_PAYLOAD_TOO_LARGE: 413,
  EF_UNKNOWN_MODEL: 404,
  EF_UNKNOWN_METHOD: 404,
  EF_MODEL_NOT_READY: 503,
  EF_MODEL_EXPIRED: 503,
};

type Route = 'none' | 'infer' | 'feedback';

interface Ctx {
  host: ModelHost;
  log: Logger;
  maxBodyBytes: number;
  /** Generated request ids: a random prefix per server and a counter, unique without a syscall per request. */
  idPrefix: string;
  idCounter: number;
}

/** A request and what its body handler needs, so the data/end listeners can be shared functions. */
class Req extends IncomingMessage {
  ctx: Ctx | null = null;
  out: ServerResponse | null = null;
  route: Route = 'none';
  model = '';
  version: number | undefined = undefined;
  chunks: Buffer[] = [];
  size = 0;
  tooLarge = false;
}

export async function startInferenceServer(host: ModelHost, opts: InferenceServerOptions): Promise<InferenceServer> {
  const ctx: Ctx = {
    host,
    log: opts.log,
    maxBodyBytes: opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
    idPrefix: randomBytes(6).toString('base64url'),
    idCounter: 0,
  };
  const server = createServer({ IncomingMessage: Req, noDelay: true, keepAlive: true }, (req, res) => onRequest(ctx, req, res));
  server.keepAliveTimeout = KEEP_ALIVE_MS;
  const socketPath = opts.socketPath;
  if (socketPath !== undefined) {
    await removeStaleSocket(socketPath);
    await listen(server, () => server.listen(socketPath), socketPath);
    chmodSync(socketPath, SOCKET_MODE);
    opts.log.info({ socketPath }, `inference API listening on unix:${socketPath}`);
  } else {
    const address = opts.host ?? '127.0.0.1';
    await listen(server, () => server.listen(opts.port ?? 8080, address), `${address}:${opts.port ?? 8080}`);
    const port = (server.address() as { port: number }).port;
    const url = `http://${address.includes(':') ? `[${address}]` : address}:${port}`;
    opts.log.info({ url }, `inference API listening on ${url}`);
    return { url, close: closer(server, undefined) };
  }
  return { socketPath, close: closer(server, socketPath) };
}

function listen(server: Server, start: () => void, where: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      reject(err.code === 'EADDRINUSE' ? new EdgefleetError('EF_PORT_IN_USE', `inference API: ${where} is in use`, { cause: err }) : err);
    };
    server.once('error', onError);
    server.once('listening', () => {
      server.off('error', onError);
      resolve();
    });
    start();
  });
}

/** A socket file nobody answers on is left over from a crash; one somebody answers on belongs to a live process. */
async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!isSocket) throw new EdgefleetError('EF_CONFIG_INVALID', `inference API: ${path} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const s = createConnection(path);
    s.setTimeout(1000, () => {
      s.destroy();
      resolve(true);
    });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (alive) throw new EdgefleetError('EF_PORT_IN_USE', `inference API: another process serves on ${path}`);
  unlinkSync(path);
}

function closer(server: Server, socketPath: string | undefined): () => Promise<void> {
  let closing: Promise<void> | null = null;
  return () =>
    (closing ??= new Promise<void>((resolve) => {
      const timer = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
      timer.unref();
      server.close(() => {
        clearTimeout(timer);
        if (socketPath !== undefined) {
          try {
            unlinkSync(socketPath);
          } catch {
            // already gone: nothing to clean up
          }
        }
        resolve();
      });
      server.closeIdleConnections();
    }));
}

function onRequest(ctx: Ctx, req: Req, res: ServerResponse): void {
  try {
    route(ctx, req, res);
  } catch (err) {
    sendError(ctx, res, err, undefined);
  }
}

/**
 * /v2, /v2/health/{live,ready}, /v2/models/{name}[/versions/{v}][/ready|/infer], /v2/models/{name}/feedback.
 */
function route(ctx: Ctx, req: Req, res: ServerResponse): void {
  const url = req.url ?? '/';
  const q = url.indexOf('?');
  const parts = (q < 0 ? url : url.slice(0, q)).split('/');
  const method = req.method ?? 'GET';
  const get = method === 'GET' || method === 'HEAD';
  if (parts.length < 2 || parts[0] !== '' || parts[1] !== 'v2') return notFound(ctx, req, res);
  const n = parts.length;
  if (n === 2) return get ? sendJson(res, 200, `{"name":"edgefleet","version":${JSON.stringify(VERSION)},"extensions":[]}`) : notAllowed(ctx, req, res, 'GET');
  if (parts[2] === 'health' && n === 4) {
    if (parts[3] === 'live') return get ? sendJson(res, 200, '{"live":true}') : notAllowed(ctx, req, res, 'GET');
    if (parts[3] === 'ready') {
      if (!get) return notAllowed(ctx, req, res, 'GET');
      return ctx.host.ready() ? sendJson(res, 200, '{"ready":true}') : sendJson(res, 503, '{"ready":false}');
    }
    return notFound(ctx, req, res);
  }
  if (parts[2] !== 'models' || n < 4) return notFound(ctx, req, res);
  const model = decodeName(parts[3]!);
  if (model === null) return notFound(ctx, req, res);
  // No model can have another name (proto ModelName); refusing here keeps an 8 KiB URL out of messages.
  if (!ID_PATTERN.test(model)) return sendError(ctx, res, new EdgefleetError('EF_UNKNOWN_MODEL', 'no model of that name'), undefined);
  let i = 4;
  let version: number | undefined;
  if (parts[4] === 'versions' && n >= 6) {
    version = parseVersion(parts[5]!);
    if (version === undefined) return sendError(ctx, res, new EdgefleetError('EF_UNKNOWN_MODEL', `model ${model} has no version ${parts[5]!.slice(0, 32)}`), undefined);
    i = 6;
  }
  const action = i < n ? parts[i] : '';
  if (i + 1 < n && action !== '') return notFound(ctx, req, res);
  if (action === '' && i === n) return get ? metadata(ctx, res, model, version) : notAllowed(ctx, req, res, 'GET');
  if (action === 'ready' && i + 1 === n) return get ? modelReady(ctx, res, model, version) : notAllowed(ctx, req, res, 'GET');
  if (action === 'infer' && i + 1 === n) return method === 'POST' ? readBody(ctx, req, res, 'infer', model, version) : notAllowed(ctx, req, res, 'POST');
  if (action === 'feedback' && i + 1 === n && version === undefined) {
    return method === 'POST' ? readBody(ctx, req, res, 'feedback', model, undefined) : notAllowed(ctx, req, res, 'POST');
  }
  return notFound(ctx, req, res);
}

function decodeName(s: string): string | null {
  if (s === '') return null;
  if (!s.includes('%')) return s;
  try {
    return decodeURIComponent(s);
  } catch {
    return null;
  }
}

/** Model versions are positive 31-bit integers (proto ModelVersion); anything else names no version. */
function parseVersion(s: string): number | undefined {
  if (!/^[1-9][0-9]{0,9}$/.test(s)) return undefined;
  const v = Number(s);
  return v <= 2 ** 31 - 1 ? v : undefined;
}

/** 404 for a model that has no slot here, 503 for one that has a slot but nothing serving. */
function absentModel(ctx: Ctx, model: string, version: number | undefined): EdgefleetError {
  if (version === undefined && ctx.host.models().includes(model)) return new EdgefleetError('EF_MODEL_NOT_READY', `model ${model} has no verified version serving`);
  return new EdgefleetError('EF_UNKNOWN_MODEL', version === undefined ? `no model ${model}` : `model ${model} is not serving version ${version}`);
}

function metadata(ctx: Ctx, res: ServerResponse, model: string, version: number | undefined): void {
  const m = ctx.host.active(model);
  if (m === null || (version !== undefined && m.version !== version)) return sendError(ctx, res, absentModel(ctx, model, version), undefined);
  sendJson(res, 200, JSON.stringify(modelMetadata(m)));
}

function modelReady(ctx: Ctx, res: ServerResponse, model: string, version: number | undefined): void {
  const m = ctx.host.active(model);
  if (m !== null && (version === undefined || m.version === version)) return sendJson(res, 200, `{"name":${JSON.stringify(model)},"ready":true}`);
  const err = absentModel(ctx, model, version);
  if (err.code === 'EF_MODEL_NOT_READY') return sendJson(res, 503, `{"name":${JSON.stringify(model)},"ready":false}`);
  sendError(ctx, res, err, undefined);
}

function readBody(ctx: Ctx, req: Req, res: ServerResponse, route: Route, model: string, version: number | undefined): void {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > ctx.maxBodyBytes) return tooLarge(ctx, req, res);
  req.ctx = ctx;
  req.out = res;
  req.route = route;
  req.model = model;
  req.version = version;
  req.on('data', onData);
  req.on('end', onEnd);
  req.on('error', onReqError);
}

function onData(this: Req, chunk: Buffer): void {
  if (this.tooLarge) return;
  this.size += chunk.length;
  if (this.size > this.ctx!.maxBodyBytes) {
    this.chunks = [];
    tooLarge(this.ctx!, this, this.out!);
    return;
  }
  this.chunks.push(chunk);
}

/** The client went away mid-body; there is nobody to answer. */
function onReqError(this: Req): void {
  this.chunks = [];
}

function onEnd(this: Req): void {
  if (this.tooLarge) return;
  const ctx = this.ctx!;
  const res = this.out!;
  const chunks = this.chunks;
  this.chunks = [];
  let body: unknown;
  try {
    const buf = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, this.size);
    body = JSON.parse(buf.toString('utf8'));
  } catch {
    return sendError(ctx, res, new EdgefleetError('EF_BAD_PAYLOAD', 'the request body is not valid JSON'), undefined);
  }
  if (this.route === 'infer') void infer(ctx, this, res, body);
  else feedback(ctx, this, res, body);
}

/**
 * Refuses the body without reading it. The connection closes after the answer, so whatever the
 * client is still sending is never buffered.
 */
function tooLarge(ctx: Ctx, req: Req, res: ServerResponse): void {
  req.tooLarge = true;
  res.setHeader('connection', 'close');
  sendError(ctx, res, new EdgefleetError('EF_PAYLOAD_TOO_LARGE', `the request body exceeds ${ctx.maxBodyBytes} bytes`), undefined);
}

async function infer(ctx: Ctx, req: Req, res: ServerResponse, body: unknown): Promise<void> {
  let id: string | undefined;
  try {
    // Every element takes at least one byte of the body: a shape holding more cannot match its data.
    const request = parseInferRequest(body, req.size);
    id = request.id ?? `${ctx.idPrefix}-${(++ctx.idCounter).toString(36)}`;
    const result = await ctx.host.infer(req.model, request.inputs, { requestId: id, version: req.version });
    checkWanted(result.outputs, request.outputs);
    const text = encodeInferResponse(result.model, result.version, result.requestId, result.outputs, request.outputs);
    res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
      'x-request-id': id,
      'x-model-version': String(result.version),
    });
    res.end(text);
  } catch (err) {
    sendError(ctx, res, err, id);
  }
}

function feedback(ctx: Ctx, req: Req, res: ServerResponse, body: unknown): void {
  try {
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new EdgefleetError('EF_BAD_PAYLOAD', 'the body must be {id, label}');
    const { id, label } = body as { id?: unknown; label?: unknown };
    if (typeof id !== 'string' || id.length === 0 || id.length > MAX_REQUEST_ID_CHARS) {
      throw new EdgefleetError('EF_BAD_PAYLOAD', `id must be a request id of 1 to ${MAX_REQUEST_ID_CHARS} characters`, { details: { field: 'id' } });
    }
    if (label === undefined) throw new EdgefleetError('EF_BAD_PAYLOAD', 'label is missing', { details: { field: 'label' } });
    if (!ctx.host.models().includes(req.model)) throw new EdgefleetError('EF_UNKNOWN_MODEL', `no model ${req.model}`);
    if (!ctx.host.feedback(req.model, id, label)) {
      // No catalog code names an unknown request id; the field says which part of the body was not found.
      return sendJson(res, 404, JSON.stringify({ error: `request ${id} of model ${req.model} is not known (too old, or never seen)`, code: 'EF_BAD_PARAMS', field: 'id' }));
    }
    sendJson(res, 200, JSON.stringify({ id, recorded: true }));
  } catch (err) {
    sendError(ctx, res, err, undefined);
  }
}

function sendJson(res: ServerResponse, status: number, text: string): void {
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function notFound(ctx: Ctx, req: Req, res: ServerResponse): void {
  // No catalog code is "no such route"; EF_UNKNOWN_METHOD is the nearest (an unknown API method).
  const path = (req.url ?? '').slice(0, 200);
  sendError(ctx, res, new EdgefleetError('EF_UNKNOWN_METHOD', `no route ${req.method ?? ''} ${path}`), undefined);
}

/** RFC 9110 §15.5.6: a 405 lists the methods the resource takes. */
function notAllowed(ctx: Ctx, req: Req, res: ServerResponse, allow: string): void {
  res.setHeader('allow', allow === 'GET' ? 'GET, HEAD' : allow);
  sendError(ctx, res, new EdgefleetError('EF_UNKNOWN_METHOD', `${req.method ?? ''} is not allowed here; use ${allow}`), undefined, 405);
}

function sendError(ctx: Ctx, res: ServerResponse, err: unknown, requestId: string | undefined, status?: number): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const e = isEdgefleetError(err) ? err : null;
  const code: ErrorCode = e?.code ?? 'EF_INTERNAL';
  const st = status ?? STATUS[code] ?? 500;
  if (st >= 500 && st !== 503) ctx.log.error({ err }, `inference API: ${code}`);
  const details = e?.details as { field?: unknown } | undefined;
  const field = typeof details?.field === 'string' ? details.field : undefined;
  const text = JSON.stringify({ error: e ? e.message : 'internal error', code, field });
  res.setHeader('content-type', 'application/json');
  res.setHeader('content-length', Buffer.byteLength(text));
  if (requestId !== undefined) res.setHeader('x-request-id', requestId);
  res.writeHead(st);
  res.end(text);
}
