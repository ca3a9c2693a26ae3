/**
 * A real HTTP proxy in front of the fleet's artifact server that corrupts what one model version's
 * device receives: its manifest (unsigned, re-signed, forged key chain, edited, swapped for another
 * version's) or its files (a flipped byte, cut short, grown). Everything else passes through
 * untouched: method, path, headers (authorization, range), status and body.
 */
import { createServer, request, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { endorseKey, rawPublicKey, signManifest, type SignedManifest } from '../../proto/index.js';
import { onCleanup } from './fleet.js';

export const EVIL_MODES = [
  'pass',
  'tamper-file',
  'truncate-file',
  'oversize-file',
  'unsigned',
  'wrong-signer',
  'forged-chain',
  'forged-endorsement',
  'tampered-manifest',
  'swap-version',
  /** Every connection is cut before an answer: a link that is down. */
  'drop',
] as const;
export type EvilMode = (typeof EVIL_MODES)[number];

export interface EvilTarget {
  name: string;
  /** The version whose manifest is corrupted. */
  version: number;
  /** The artifacts whose bodies are corrupted (files of `version` the device does not hold yet). */
  sha256s: readonly string[];
  /** `swap-version`: whose signed manifest answers the request for `version`. */
  swapWith?: number;
  /** `forged-endorsement`: the key id of a key the device trusts (the endorsement pretends to come from it). */
  trustedKeyId?: string;
}

export interface ProxiedRequest {
  method: string;
  path: string;
  status: number;
  /** True when this response was corrupted. */
  corrupted: boolean;
}

export interface EvilProxy {
  url: string;
  /** Mutable: applies to the next response. */
  mode: EvilMode;
  readonly target: EvilTarget;
  readonly requests: ProxiedRequest[];
  /** How many responses were corrupted so far. */
  corrupted(): number;
  close(): Promise<void>;
}

const MANIFEST_MODES: ReadonlySet<EvilMode> = new Set(['unsigned', 'wrong-signer', 'forged-chain', 'forged-endorsement', 'tampered-manifest', 'swap-version']);
const FILE_MODES: ReadonlySet<EvilMode> = new Set(['tamper-file', 'truncate-file', 'oversize-file']);

/** Starts the proxy on 127.0.0.1 (any free port) in front of `upstream`; stopped by `cleanup()`. */
export async function startEvilProxy(upstream: string, target: EvilTarget, mode: EvilMode = 'pass'): Promise<EvilProxy> {
  const base = new URL(upstream);
  const requests: ProxiedRequest[] = [];
  const proxy: EvilProxy = {
    url: '',
    mode,
    target,
    requests,
    corrupted: () => requests.filter((r) => r.corrupted).length,
    close: async () => {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };

  const forward = (method: string, path: string, headers: IncomingHttpHeaders, body: Buffer): Promise<{ status: number; headers: IncomingHttpHeaders; body: Buffer }> =>
    new Promise((resolve, reject) => {
      const req = request(
        { host: base.hostname, port: base.port, method, path, headers: { ...headers, host: base.host, connection: 'close' } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 502, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const method = req.method ?? 'GET';
    const path = req.url ?? '/';
    const mode = proxy.mode;
    if (mode === 'drop') {
      requests.push({ method, path, status: 0, corrupted: false });
      req.socket.destroy();
      return;
    }
    const manifestPath = `/v1/models/${encodeURIComponent(target.name)}/${target.version}/manifest`;
    // With or without `?base=` (the agent offers a base to get a JSON patch): asked upstream
    // without it, so that what comes back is a whole manifest to corrupt.
    const isManifest = method === 'GET' && path.split('?')[0] === manifestPath && MANIFEST_MODES.has(mode);
    // A file comes whole from /v1/artifacts, or as a patch or image from /v1/deltas/{file}/{patch}.
    const sha = /^\/v1\/(?:artifacts|deltas)\/([0-9a-f]{64})(?:\/[0-9a-f]{64})?$/.exec(path)?.[1];
    const isFile = method === 'GET' && sha !== undefined && target.sha256s.includes(sha) && FILE_MODES.has(mode);

    let upstreamPath = isManifest ? manifestPath : path;
    if (isManifest && mode === 'swap-version') {
      if (target.swapWith === undefined) throw new Error('swap-version needs target.swapWith');
      upstreamPath = `/v1/models/${encodeURIComponent(target.name)}/${target.swapWith}/manifest`;
    }
    const up = await forward(method, upstreamPath, req.headers, Buffer.concat(chunks));
    let body = up.body;
    let corrupted = false;
    if (up.status === 200 || up.status === 206) {
      if (isManifest && mode !== 'swap-version') {
        body = Buffer.from(JSON.stringify(corruptManifest(JSON.parse(up.body.toString('utf8')) as SignedManifest, mode, target)), 'utf8');
        corrupted = true;
      } else if (isManifest) {
        corrupted = true; // swapped upstream
      } else if (isFile && body.length > 0) {
        body = corruptFile(body, mode);
        corrupted = true;
      }
    }
    requests.push({ method, path, status: up.status, corrupted });
    const headers: Record<string, string | string[]> = {};
    for (const [k, v] of Object.entries(up.headers)) {
      if (v === undefined || k === 'connection' || k === 'keep-alive' || k === 'transfer-encoding') continue;
      headers[k] = v;
    }
    // The lie is consistent: the length header always matches the (corrupted) body.
    headers['content-length'] = String(body.length);
    res.writeHead(up.status, headers);
    res.end(method === 'HEAD' ? undefined : body);
  };

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      requests.push({ method: req.method ?? '', path: req.url ?? '', status: 502, corrupted: false });
      if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`evil proxy: ${(err as Error).message}`);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  proxy.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  onCleanup(() => proxy.close());
  return proxy;
}

function corruptFile(body: Buffer, mode: EvilMode): Buffer {
  switch (mode) {
    case 'tamper-file': {
      // One flipped bit in the middle: same length, different bytes.
      const out = Buffer.from(body);
      const i = Math.floor(out.length / 2);
      out[i] = (out[i] as number) ^ 0x01;
      return out;
    }
    case 'truncate-file':
      return body.subarray(0, Math.floor(body.length / 2));
    case 'oversize-file':
      return Buffer.concat([body, Buffer.alloc(4096, 0x42)]);
    default:
      return body;
  }
}

/** A fresh Ed25519 key pair that no device trusts. */
function freshKey(): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync('ed25519');
}

function corruptManifest(signed: SignedManifest, mode: EvilMode, target: EvilTarget): unknown {
  switch (mode) {
    case 'unsigned': {
      const { signature: _signature, ...rest } = signed;
      return rest;
    }
    case 'wrong-signer':
      // A well-formed signature by a key nobody trusts.
      return signManifest(signed.manifest, freshKey().privateKey);
    case 'forged-chain': {
      // The signing key comes with an endorsement, but by another key nobody trusts.
      const signer = freshKey();
      const endorser = freshKey();
      const endorsement = endorseKey(endorser.privateKey, rawPublicKey(createPublicKey(signer.privateKey)), Date.now());
      return signManifest(signed.manifest, signer.privateKey, [endorsement]);
    }
    case 'forged-endorsement': {
      // The endorsement claims the device's trusted key vouched for the signer; an untrusted key signed it.
      if (!target.trustedKeyId) throw new Error('forged-endorsement needs target.trustedKeyId');
      const signer = freshKey();
      const endorser = freshKey();
      const endorsement = { ...endorseKey(endorser.privateKey, rawPublicKey(createPublicKey(signer.privateKey)), Date.now()), endorsedBy: target.trustedKeyId };
      return signManifest(signed.manifest, signer.privateKey, [endorsement]);
    }
    case 'tampered-manifest':
      // Looser golden tolerance, so a wrong model would pass staging; the fleet's signature stays.
      return { ...signed, manifest: { ...signed.manifest, golden: { ...signed.manifest.golden, tolerance: { ...signed.manifest.golden.tolerance, abs: 1 } } } };
    default:
      return signed;
  }
}

