import { existsSync, readdirSync, readFileSync, statSync, writeFileSync, renameSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { applyPatchFile, createPatch, layoutOf, readPatchHeader, type TensorRange } from '../../common/delta/index.js';
import { tfjsWeightsFiles } from '../../common/delta/tfjs.js';
import { EdgefleetError } from '../../proto/index.js';
import type { LayoutKind } from '../../proto/delta.js';

export const DELTA_USAGE = `  delta create --base <file> --target <file> --out <patch> [--model-json <file>]
                                       a patch from base to target (no --base: a compressed image);
                                       prints sizes and the codec per section. TF.js weight files
                                       are read with the model.json beside them (or --model-json)
  delta apply --base <file> --patch <patch> --out <file>
                                       writes the target only if it matches the sha256 in the patch
  delta info <patch>                   what a patch is for: base and target sha256 and sizes`;

export interface DeltaFlags {
  base?: string;
  target?: string;
  patch?: string;
  out?: string;
  'model-json'?: string;
}

export interface DeltaContext {
  flags: DeltaFlags;
  out(data: unknown, human: () => string): void;
  usage(message: string): Error;
}

function readInput(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new EdgefleetError('EF_BAD_PARAMS', `cannot read the ${what} ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

/** The model.json that lists `file` as a weights shard: the one given, or one beside it. */
function modelJsonFor(file: string, given: string | undefined): unknown {
  const candidates = given ? [given] : readdirSync(dirname(file)).filter((n) => n.endsWith('.json')).map((n) => join(dirname(file), n));
  for (const c of candidates) {
    try {
      if (statSync(c).size > 16 * 1024 * 1024) continue;
      const json = JSON.parse(readFileSync(c, 'utf8')) as unknown;
      if (tfjsWeightsFiles(json).some((p) => basename(p) === basename(file))) return json;
    } catch {
      // not a model.json, or not one naming this file
    }
  }
  return undefined;
}

function layout(file: string, bytes: Uint8Array, modelJson: string | undefined): { kind: LayoutKind; ranges: TensorRange[] } {
  return layoutOf(basename(file), bytes, file.endsWith('.onnx') ? undefined : modelJsonFor(file, modelJson));
}

const mb = (n: number): string => (n >= 1e6 ? `${(n / 1e6).toFixed(2)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n} B`);

export async function runDeltaCommand(ctx: DeltaContext, args: readonly string[]): Promise<void> {
  const [verb, a1] = args;
  const f = ctx.flags;
  if (verb === 'create') {
    if (!f.target || !f.out) throw ctx.usage('delta create needs --target and --out (and --base, unless making an image)');
    const target = readInput(f.target, 'target');
    const base = f.base ? readInput(f.base, 'base') : null;
    const tl = layout(f.target, target, f['model-json']);
    const bl = base && f.base ? layout(f.base, base, undefined) : null;
    const started = performance.now();
    const { patch, report } = await createPatch(base, target, { baseLayout: bl?.ranges ?? [], targetLayout: tl.ranges, layoutKind: tl.kind });
    const ms = performance.now() - started;
    writeFileSync(`${f.out}.tmp`, patch);
    renameSync(`${f.out}.tmp`, f.out);
    const result = { out: f.out, baseBytes: base?.length ?? 0, targetBytes: target.length, patchBytes: patch.length, ratio: patch.length / Math.max(1, target.length), layout: tl.kind, tensors: tl.ranges.length, encodeMs: Math.round(ms), sections: report.sections };
    ctx.out(result, () =>
      [
        `${f.out}: ${mb(patch.length)} for a ${mb(target.length)} target (${(100 * result.ratio).toFixed(1)} %)${base ? ` from a ${mb(base.length)} base` : ', an image (no base)'}`,
        `layout      ${tl.kind}${tl.kind === 'none' ? ' (generic diff only)' : `, ${tl.ranges.length} tensors`} · encoded in ${result.encodeMs} ms`,
        'sections:',
        ...report.sections.map((s) => `  ${s.codec.padEnd(14)} ${String(s.frames).padStart(5)} frame(s)  ${mb(s.targetBytes).padStart(10)} → ${mb(s.patchBytes).padStart(10)}`),
      ].join('\n'),
    );
    return;
  }
  if (verb === 'apply') {
    if (!f.patch || !f.out) throw ctx.usage('delta apply needs --patch and --out (and --base, unless the patch is an image)');
    if (!existsSync(f.patch)) throw new EdgefleetError('EF_BAD_PARAMS', `no patch at ${f.patch}`);
    if (f.base && !existsSync(f.base)) throw new EdgefleetError('EF_BAD_PARAMS', `no base at ${f.base}`);
    const started = performance.now();
    const r = await applyPatchFile(f.base ?? null, f.patch, f.out);
    const ms = performance.now() - started;
    ctx.out({ out: f.out, sha256: r.sha256, size: r.size, applyMs: Math.round(ms) }, () => `${f.out}: ${mb(r.size)}, sha256 ${r.sha256} (verified) in ${Math.round(ms)} ms`);
    return;
  }
  if (verb === 'info') {
    if (!a1) throw ctx.usage('delta info needs a patch file');
    const fd = readInput(a1, 'patch');
    const h = readPatchHeader(fd);
    ctx.out({ ...h, patchBytes: fd.length }, () =>
      [
        `patch       ${a1}: ${mb(fd.length)}, format version ${h.version}, layout ${h.layout}`,
        `base        ${h.baseSha256 === null ? 'none (an image)' : `${h.baseSha256} (${mb(h.baseSize)})`}`,
        `target      ${h.targetSha256} (${mb(h.targetSize)})`,
      ].join('\n'),
    );
    return;
  }
  throw ctx.usage(`unknown delta command ${verb ?? ''}`.trim());
}
