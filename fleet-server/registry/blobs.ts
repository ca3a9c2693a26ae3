import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { EdgefleetError } from '../../proto/index.js';
import { fsyncDir } from '../../common/files.js';

const SHA256 = /^[0-9a-f]{64}$/;

export interface IngestResult {
  sha256: string;
  size: number;
  /** False when the artifact was already stored (the upload was read and dropped). */
  stored: boolean;
}

/**
 * Content-addressed artifact files: `<root>/ab/abcdef…` by sha256. A file appears only whole and
 * verified: uploads stream into `<root>/tmp/`, are hashed on the way, fsynced, renamed into place
 * and the directory fsynced. What is stored is therefore always what its name says.
 */
export class ArtifactStore {
  private readonly tmpDir: string;

  constructor(readonly root: string) {
    this.tmpDir = join(root, 'tmp');
    mkdirSync(this.tmpDir, { recursive: true, mode: 0o700 });
    // Uploads cut off by a crash; nobody else writes here.
    for (const f of readdirSync(this.tmpDir)) rmSync(join(this.tmpDir, f), { force: true });
  }

  /** Path of an artifact; `sha256` must already be validated (it is the only thing joined in). */
  pathOf(sha256: string): string {
    if (!SHA256.test(sha256)) throw new EdgefleetError('EF_BAD_PARAMS', 'not a sha256');
    return join(this.root, sha256.slice(0, 2), sha256);
  }

  /** Size of a stored artifact, or null. */
  sizeOf(sha256: string): number | null {
    try {
      const st = statSync(this.pathOf(sha256));
      return st.isFile() ? st.size : null;
    } catch {
      return null;
    }
  }

  /** Hashes a stored artifact again: what publishing checks before signing. */
  async rehash(sha256: string): Promise<{ sha256: string; size: number } | null> {
    if (this.sizeOf(sha256) === null) return null;
    const hash = createHash('sha256');
    let size = 0;
    for await (const chunk of createReadStream(this.pathOf(sha256))) {
      hash.update(chunk as Buffer);
      size += (chunk as Buffer).length;
    }
    return { sha256: hash.digest('hex'), size };
  }

  /**
   * Stores what `body` streams, if it hashes to `sha256` and stays within `maxBytes`. Refuses with
   * EF_ARTIFACT_TOO_LARGE or EF_ARTIFACT_MISMATCH and leaves nothing behind. An artifact already
   * stored is not written again.
   */
  async ingest(body: Readable, sha256: string, maxBytes: number): Promise<IngestResult> {
    const target = this.pathOf(sha256);
    const exists = this.sizeOf(sha256) !== null;
    const tmp = join(this.tmpDir, `${sha256.slice(0, 16)}.${randomBytes(6).toString('hex')}`);
    const fh = exists ? null : await open(tmp, 'wx', 0o644);
    const hash = createHash('sha256');
    let size = 0;
    try {
      // Not destroyed on a refusal, so that the server can still answer on the same connection.
      for await (const chunk of body.iterator({ destroyOnReturn: false })) {
        const buf = chunk as Buffer;
        size += buf.length;
        if (size > maxBytes) throw new EdgefleetError('EF_ARTIFACT_TOO_LARGE', `artifact exceeds ${maxBytes} bytes`);
        hash.update(buf);
        if (fh) {
          let off = 0;
          while (off < buf.length) off += (await fh.write(buf, off, buf.length - off)).bytesWritten;
        }
      }
      const actual = hash.digest('hex');
      if (actual !== sha256) throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `the upload hashes to ${actual}, not ${sha256}`);
      if (!fh) return { sha256, size, stored: false };
      await fh.sync();
      await fh.close();
      const dir = join(this.root, sha256.slice(0, 2));
      const fresh = !existsDir(dir);
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      await rename(tmp, target);
      fsyncDir(dir);
      if (fresh) fsyncDir(this.root);
      return { sha256, size, stored: true };
    } catch (e) {
      await fh?.close().catch(() => undefined);
      await rm(tmp, { force: true });
      throw e;
    }
  }
}

function existsDir(dir: string): boolean {
  try {
    return statSync(dir).isDirectory();
  } catch {
    return false;
  }
}
