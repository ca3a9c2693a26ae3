import { createReadStream } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { EdgefleetError, ERROR_CODES, type ErrorCode } from '../../proto/index.js';

/**
 * The CLI's side of the fleet's artifact server: asks whether an artifact is stored (HEAD) and
 * uploads it (PUT, streamed from disk with its length, so a large model never sits in memory).
 */
export class ArtifactClient {
  private readonly authorization: string;

  constructor(
    private readonly baseUrl: string,
    username: string,
    password: string,
    private readonly timeoutMs = 30_000,
  ) {
    this.authorization = `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`;
  }

  async has(sha256: string): Promise<boolean> {
    const { res } = await this.send('HEAD', sha256, null, 0);
    res.resume();
    if (res.statusCode === 200) return true;
    if (res.statusCode === 404) return false;
    throw statusError(res.statusCode ?? 0, null, `asking for ${sha256}`);
  }

  /** Uploads a file, or bytes; true when the server stored it, false when it already had it. */
  async upload(sha256: string, source: { path: string; size: number } | Buffer): Promise<boolean> {
    const size = Buffer.isBuffer(source) ? source.length : source.size;
    const { res, body } = await this.send('PUT', sha256, source, size);
    if (res.statusCode === 201 || res.statusCode === 200) return res.statusCode === 201;
    throw statusError(res.statusCode ?? 0, body, `uploading ${sha256}`);
  }

  private send(method: 'HEAD' | 'PUT', sha256: string, source: { path: string } | Buffer | null, size: number): Promise<{ res: IncomingMessage; body: string }> {
    const url = new URL(`v1/artifacts/${sha256}`, this.baseUrl.endsWith('/') ? this.baseUrl : `${this.baseUrl}/`);
    const request = url.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const headers: Record<string, string> = { authorization: this.authorization };
      if (method === 'PUT') Object.assign(headers, { 'content-length': String(size), 'content-type': 'application/octet-stream' });
      const req = request(url, { method, headers, timeout: this.timeoutMs }, (res) => {
        const chunks: Buffer[] = [];
        if (method === 'HEAD') return resolve({ res, body: '' });
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ res, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new EdgefleetError('EF_TIMEOUT', `the artifact server at ${url.origin} went quiet`)));
      req.on('error', (err) => reject(isEdgefleet(err) ? err : new EdgefleetError('EF_BROKER_UNREACHABLE', `cannot reach the artifact server at ${url.origin}: ${err.message}`)));
      if (source === null) req.end();
      else if (Buffer.isBuffer(source)) req.end(source);
      else {
        const file = createReadStream(source.path);
        file.on('error', (err) => req.destroy(err));
        file.pipe(req);
      }
    });
  }
}

function isEdgefleet(e: unknown): e is EdgefleetError {
  return e instanceof EdgefleetError;
}

function statusError(status: number, body: string | null, what: string): EdgefleetError {
  let code: ErrorCode = status === 401 || status === 403 ? 'EF_FORBIDDEN' : status === 413 ? 'EF_ARTIFACT_TOO_LARGE' : 'EF_INTERNAL';
  let message = `${what}: HTTP ${status}`;
  try {
    const parsed = JSON.parse(body ?? '') as { error?: { code?: string; message?: string } };
    if (parsed.error?.code && (ERROR_CODES as string[]).includes(parsed.error.code)) code = parsed.error.code as ErrorCode;
    if (parsed.error?.message) message = `${what}: ${parsed.error.message}`;
  } catch {
    // not JSON: the status says enough
  }
  return new EdgefleetError(code, message);
}
