import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { createPatch, layoutOf, type SectionReport, type TensorRange } from '../../common/delta/index.js';
import { SignedManifest, decodeJson, MAX_MANIFEST_BYTES } from '../../proto/index.js';
import type { LayoutKind } from '../../proto/delta.js';
import { sha256Hex } from '../../common/files.js';
import type { Logger } from '../../common/log.js';
import type { FleetStore } from '../store/types.js';
import type { ArtifactStore } from './blobs.js';

export interface DeltaOptions {
  dir: string;
  /** A patch is served only when it is at least this share smaller than the image, and the image only when this much smaller than the file. */
  minSavings: number;
  cacheMaxBytes: number;
}

/** What the fleet answers a device that asks how to get `target` while holding `base`. */
export interface DeltaOffer {
  /** patch: against the base; image: the target alone, compressed; full: download the artifact itself. */
  kind: 'patch' | 'image' | 'full';
  target: { sha256: string; size: number };
  base: string | null;
  /** For patch and image: the file to download from /v1/deltas/{target}/{sha256}. */
  delta: { sha256: string; size: number } | null;
  /** Sizes considered, for the device's report and for operators. */
  sizes: { full: number; image: number | null; patch: number | null };
}

interface Meta {
  sha256: string;
  size: number;
  createdAt: number;
  encodeMs: number;
  layout: LayoutKind;
  sections: SectionReport[];
}

/** A model.json larger than this is not read for a layout (the file is still served, just without one). */
const MAX_MODEL_JSON_BYTES = 16 * 1024 * 1024;

/**
 * Patches on demand, for the (base, target) pairs devices ask for, cached on disk as
 * `<dir>/<target>/<base>.efdp` (and `image.efdp`, the target against nothing) with a JSON meta
 * beside each. One patch is computed at a time; concurrent asks for the same pair share it.
 * The cache is trimmed, least recently served first, to `cacheMaxBytes`.
 */
export class DeltaService {
  private readonly inflight = new Map<string, Promise<Meta>>();
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly opts: DeltaOptions,
    private readonly deps: { store: FleetStore; blobs: ArtifactStore; log: Logger; now: () => number },
  ) {
    mkdirSync(opts.dir, { recursive: true, mode: 0o700 });
  }

  /** The way to `target` that costs the device the fewest bytes, computing what is not cached yet. */
  async offer(target: string, base: string | null): Promise<DeltaOffer> {
    const full = this.deps.blobs.sizeOf(target);
    if (full === null) throw new Error(`artifact ${target} is not stored`);
    const useBase = base !== null && base !== target && this.deps.blobs.sizeOf(base) !== null ? base : null;
    const patch = useBase ? await this.ensure(target, useBase) : null;
    // Images of float weights shrink by a quarter at best: a patch under half the file needs no comparison.
    const image = patch && patch.size <= full / 2 ? null : await this.ensure(target, null);
    const keep = 1 - this.opts.minSavings;
    const sizes = { full, image: image?.size ?? null, patch: patch?.size ?? null };
    const offer = (kind: DeltaOffer['kind'], m: Meta | null): DeltaOffer => ({
      kind,
      target: { sha256: target, size: full },
      base: kind === 'patch' ? useBase : null,
      delta: m ? { sha256: m.sha256, size: m.size } : null,
      sizes,
    });
    if (patch && (image === null || patch.size <= image.size * keep) && patch.size < full) return offer('patch', patch);
    if (image && image.size <= full * keep) return offer('image', image);
    return offer('full', null);
  }

  /** The cached patch file of `target` whose sha256 is `patch`, or null. Touches it for the LRU. */
  fileOf(target: string, patch: string): string | null {
    const dir = join(this.opts.dir, target);
    let names: string[];
    try {
      names = readdirSync(dir).filter((n) => n.endsWith('.json'));
    } catch {
      return null;
    }
    for (const n of names) {
      try {
        const meta = JSON.parse(readFileSync(join(dir, n), 'utf8')) as Meta;
        if (meta.sha256 !== patch) continue;
        const file = join(dir, n.replace(/\.json$/, '.efdp'));
        const now = new Date(this.deps.now());
        utimesSync(file, now, now);
        return file;
      } catch {
        // a meta being replaced, or a damaged one: not this patch
      }
    }
    return null;
  }

  private ensure(target: string, base: string | null): Promise<Meta> {
    const key = `${target}/${base ?? 'image'}`;
    const cached = this.cached(target, base);
    if (cached) return Promise.resolve(cached);
    const running = this.inflight.get(key);
    if (running) return running;
    const p = this.queue.then(() => this.compute(target, base));
    this.queue = p.catch(() => undefined);
    this.inflight.set(key, p);
    void p.finally(() => this.inflight.delete(key)).catch(() => undefined);
    return p;
  }

  private cached(target: string, base: string | null): Meta | null {
    const stem = join(this.opts.dir, target, base ?? 'image');
    try {
      const meta = JSON.parse(readFileSync(`${stem}.json`, 'utf8')) as Meta;
      return statSync(`${stem}.efdp`).size === meta.size ? meta : null;
    } catch {
      return null;
    }
  }

  private async compute(target: string, base: string | null): Promise<Meta> {
    const started = this.deps.now();
    const t = await readFile(this.deps.blobs.pathOf(target));
    const b = base ? await readFile(this.deps.blobs.pathOf(base)) : null;
    const tl = await this.layout(target, t);
    const bl = b && base ? await this.layout(base, b) : null;
    const { patch, report } = await createPatch(b, t, { targetLayout: tl.ranges, baseLayout: bl?.ranges ?? [], layoutKind: tl.kind });
    const dir = join(this.opts.dir, target);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const stem = join(dir, base ?? 'image');
    const meta: Meta = { sha256: sha256Hex(patch), size: patch.length, createdAt: this.deps.now(), encodeMs: this.deps.now() - started, layout: tl.kind, sections: report.sections };
    writeFileSync(`${stem}.efdp.tmp`, patch, { mode: 0o600 });
    renameSync(`${stem}.efdp.tmp`, `${stem}.efdp`);
    writeFileSync(`${stem}.json.tmp`, JSON.stringify(meta), { mode: 0o600 });
    renameSync(`${stem}.json.tmp`, `${stem}.json`);
    this.deps.log.info({ target, base, bytes: patch.length, of: t.length, encodeMs: meta.encodeMs, layout: tl.kind }, base ? 'delta patch computed' : 'delta image computed');
    this.trim(stem);
    return meta;
  }

  /** Where the tensors are in an artifact, from the runtime its model version names. */
  private async layout(sha256: string, bytes: Uint8Array): Promise<{ kind: LayoutKind; ranges: TensorRange[] }> {
    const use = this.deps.store.models.artifactUse(sha256);
    if (!use) return { kind: 'none', ranges: [] };
    let modelJson: unknown;
    if (use.runtime !== 'onnx') {
      const signed = decodeJson(SignedManifest, Buffer.from(use.manifestJson), MAX_MANIFEST_BYTES);
      const entry = signed.ok ? signed.value.manifest.files.find((f) => f.path === signed.value.manifest.entry) : undefined;
      if (entry && entry.size <= MAX_MODEL_JSON_BYTES && entry.sha256 !== sha256) {
        try {
          modelJson = JSON.parse(await readFile(this.deps.blobs.pathOf(entry.sha256), 'utf8'));
        } catch {
          modelJson = undefined;
        }
      }
    }
    return layoutOf(basename(use.path), bytes, modelJson);
  }

  /** Drops the least recently served patches until the cache fits; never the one just made. */
  private trim(keep: string): void {
    const files: { stem: string; size: number; mtime: number }[] = [];
    let total = 0;
    for (const t of readdirSync(this.opts.dir)) {
      let names: string[] = [];
      try {
        names = readdirSync(join(this.opts.dir, t));
      } catch {
        continue;
      }
      for (const n of names) {
        if (!n.endsWith('.efdp')) continue;
        const stem = join(this.opts.dir, t, n.slice(0, -5));
        const st = statSync(`${stem}.efdp`);
        files.push({ stem, size: st.size, mtime: st.mtimeMs });
        total += st.size;
      }
    }
    files.sort((a, b) => a.mtime - b.mtime);
    for (const f of files) {
      if (total <= this.opts.cacheMaxBytes) break;
      if (f.stem === keep) continue;
      rmSync(`${f.stem}.json`, { force: true });
      rmSync(`${f.stem}.efdp`, { force: true });
      total -= f.size;
    }
    for (const t of readdirSync(this.opts.dir)) {
      const d = join(this.opts.dir, t);
      if (existsSync(d) && readdirSync(d).length === 0) rmSync(d, { recursive: true, force: true });
    }
  }
}
