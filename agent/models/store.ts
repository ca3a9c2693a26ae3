import { existsSync, linkSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { z } from 'zod';
import {
  EdgefleetError,
  MAX_MANIFEST_BYTES,
  ModelVersion,
  SignedManifest,
  decodeJson,
  modelRef,
  type Manifest,
} from '../../proto/index.js';
import { fsyncDir, sha256File, writeFileAtomic } from '../../common/files.js';

/**
 * The device's model store, under `<stateDir>/models`:
 *
 *   blobs/<sha256>                  every file of every kept version, content-addressed, immutable
 *   manifests/<name>/<version>.json the signed manifest as received
 *   views/<name>/<version>/<path>   hard links into blobs/ at the paths the runtime expects
 *   slots/<name>.json               the slot's lifecycle state (see lifecycle.ts)
 *   partial/<sha256>.part           downloads in progress (resumed with Range)
 *
 * Every write is a temporary file, fsync, rename, fsync of the directory, so a SIGKILL or a power
 * cut leaves either the old state or the new one. Views are built in a temporary directory and
 * renamed into place whole. Nothing here trusts what is on disk: `verifyVersion` re-hashes.
 */
/** Patches and temporary files in partial/ younger than this are left to the download using them. */
const TRANSIENT_PARTIAL_MS = 60 * 60 * 1000;

export class ModelStore {
  readonly root: string;

  constructor(stateDir: string) {
    this.root = join(stateDir, 'models');
    for (const d of ['blobs', 'manifests', 'views', 'slots', 'partial']) mkdirSync(join(this.root, d), { recursive: true, mode: 0o700 });
    // Leftovers of a view being built, or of a view or manifest being removed, when the process died.
    for (const dir of ['views', 'manifests']) {
      for (const name of readdirSync(join(this.root, dir))) {
        for (const entry of readdirSync(join(this.root, dir, name))) if (entry.startsWith('.')) rmSync(join(this.root, dir, name, entry), { recursive: true, force: true });
      }
    }
  }

  blobPath(sha256: string): string {
    return join(this.root, 'blobs', sha256);
  }

  /** A delta patch being downloaded: resumed like a file, collected only when stale. */
  patchPath(sha256: string): string {
    return join(this.root, 'partial', `${sha256}.patch`);
  }

  partialPath(sha256: string): string {
    return join(this.root, 'partial', `${sha256}.part`);
  }

  hasBlob(sha256: string, size: number): boolean {
    try {
      return statSync(this.blobPath(sha256)).size === size;
    } catch {
      return false;
    }
  }

  /** Moves a verified download into the blob store (same file system: rename is atomic). */
  adoptBlob(tmpPath: string, sha256: string): void {
    renameSync(tmpPath, this.blobPath(sha256));
    fsyncDir(join(this.root, 'blobs'));
  }

  viewDir(name: string, version: number): string {
    return join(this.root, 'views', name, String(version));
  }

  manifestPath(name: string, version: number): string {
    return join(this.root, 'manifests', name, `${version}.json`);
  }

  saveManifest(signed: SignedManifest): void {
    writeFileAtomic(this.manifestPath(signed.manifest.name, signed.manifest.version), JSON.stringify(signed), 0o600);
  }

  /** The stored signed manifest, or null when absent or unreadable (a torn or tampered file counts as absent). */
  loadManifest(name: string, version: number): SignedManifest | null {
    const path = this.manifestPath(name, version);
    if (!existsSync(path)) return null;
    const decoded = decodeJson(SignedManifest, readFileSync(path), MAX_MANIFEST_BYTES);
    if (!decoded.ok) return null;
    const m = decoded.value.manifest;
    return m.name === name && m.version === version ? decoded.value : null;
  }

  /** Builds the runtime's view of a version from its blobs: hard links at the manifest's paths. */
  buildView(m: Manifest): string {
    const final = this.viewDir(m.name, m.version);
    if (existsSync(final)) return final;
    const parent = dirname(final);
    mkdirSync(parent, { recursive: true });
    const tmp = join(parent, `.${m.version}.${process.pid}.tmp`);
    rmSync(tmp, { recursive: true, force: true });
    for (const f of m.files) {
      const dest = join(tmp, f.path);
      mkdirSync(dirname(dest), { recursive: true });
      linkSync(this.blobPath(f.sha256), dest);
    }
    renameSync(tmp, final);
    fsyncDir(parent);
    return final;
  }

  /**
   * Re-reads every file of a version through its view and checks size and sha256 against the
   * manifest. Throws EF_ARTIFACT_MISSING or EF_ARTIFACT_MISMATCH naming the file.
   */
  verifyVersion(m: Manifest): void {
    const dir = this.viewDir(m.name, m.version);
    for (const f of m.files) {
      const path = join(dir, f.path);
      let size: number;
      try {
        size = statSync(path).size;
      } catch {
        throw new EdgefleetError('EF_ARTIFACT_MISSING', `${modelRef(m.name, m.version)}: ${f.path} is missing`);
      }
      if (size !== f.size) throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${modelRef(m.name, m.version)}: ${f.path} is ${size} bytes, the manifest says ${f.size}`);
      const digest = sha256File(path);
      if (digest !== f.sha256) throw new EdgefleetError('EF_ARTIFACT_MISMATCH', `${modelRef(m.name, m.version)}: ${f.path} does not match its sha256`);
    }
  }

  loadSlot<T>(name: string, schema: z.ZodType<T>): T | null {
    const path = join(this.root, 'slots', `${name}.json`);
    if (!existsSync(path)) return null;
    try {
      const parsed = schema.safeParse(JSON.parse(readFileSync(path, 'utf8')));
      return parsed.success ? parsed.data : null;
    } catch {
      return null;
    }
  }

  saveSlot(name: string, state: unknown): void {
    writeFileAtomic(join(this.root, 'slots', `${name}.json`), JSON.stringify(state), 0o600);
  }

  removeSlot(name: string): void {
    rmSync(join(this.root, 'slots', `${name}.json`), { force: true });
    fsyncDir(join(this.root, 'slots'));
  }

  slotNames(): string[] {
    return readdirSync(join(this.root, 'slots'))
      .filter((f) => f.endsWith('.json') && !f.startsWith('.'))
      .map((f) => f.slice(0, -5));
  }

  /**
   * Removes every version of `name` not in `keep`, then every blob no kept manifest of any model
   * names. Partial downloads of blobs still wanted survive.
   */
  collect(name: string, keep: ReadonlySet<number>, wantedBlobs: ReadonlySet<string> = new Set()): void {
    for (const dir of ['manifests', 'views']) {
      const base = join(this.root, dir, name);
      if (!existsSync(base)) continue;
      for (const entry of readdirSync(base)) {
        if (entry.startsWith('.')) continue;
        const v = Number(entry.replace(/\.json$/, ''));
        if (ModelVersion.safeParse(v).success && keep.has(v)) continue;
        // Renamed aside first, so a crash part-way leaves no half-deleted view under a version's
        // name (the constructor sweeps dot-entries).
        const aside = join(base, `.${entry}.${process.pid}.del`);
        renameSync(join(base, entry), aside);
        rmSync(aside, { recursive: true, force: true });
      }
    }
    const referenced = new Set(wantedBlobs);
    const manifests = join(this.root, 'manifests');
    for (const model of readdirSync(manifests)) {
      for (const entry of readdirSync(join(manifests, model))) {
        const s = this.loadManifest(model, Number(entry.replace(/\.json$/, '')));
        for (const f of s?.manifest.files ?? []) referenced.add(f.sha256);
      }
    }
    for (const blob of readdirSync(join(this.root, 'blobs'))) if (!referenced.has(blob)) rmSync(join(this.root, 'blobs', blob), { force: true });
    const stale = Date.now() - TRANSIENT_PARTIAL_MS;
    for (const part of readdirSync(join(this.root, 'partial'))) {
      const path = join(this.root, 'partial', part);
      // A patch being downloaded or applied (for another model, perhaps) is named by no manifest:
      // it goes only once nothing has touched it for a while.
      if (part.endsWith('.patch') || part.startsWith('.')) {
        if ((statSync(path, { throwIfNoEntry: false })?.mtimeMs ?? 0) < stale) rmSync(path, { force: true });
      } else if (!referenced.has(part.replace(/\.part$/, ''))) rmSync(path, { force: true });
    }
  }
}
